"""Export back to diffusers: full transformer weights (SD3 / SD3.5, FLUX.1, FLUX.2) and LoRA adapters in the
PEFT/diffusers format.

Full weights (:func:`transformer_state_dict`, :func:`save_transformer`): the exact inverse of
``convert/sd3.py``'s declarative key map. Every ``Entry`` is walked backwards: Linear kernels transposed back
to torch's (out, in), the patchify conv HWIO -> OIHW, slices of a scanned (stacked) group unstacked to
per-layer keys, and the persistent ``pos_embed.pos_embed`` buffer written from the table recomputed from the
config (the converter checks it against that same table). The result is a ``transformer/`` directory
(``config.json`` + ``diffusion_pytorch_model.safetensors``, or shards with an index) that
``SD3Transformer2DModel.from_pretrained`` loads.

LoRA (:func:`lora_state_dict`, :func:`save_lora`): our ``lora`` collection (models/lora.py: A (in, r, J),
B (r, out, J), adapters on the last axis, scale alpha / r) -> PEFT keys
``transformer.transformer_blocks.{i}.{site}.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), where the
site is the diffusers path inside the block (``attn.to_q``, ``attn2.to_out.0``, ``ff.net.0.proj``, ...; the model
modules' ``lora_modules(cfg)`` list them). PEFT computes ``lora_alpha / r * B(A(x))``, as we do.
:func:`merge_lora` folds an adapter into the base kernels instead (W + alpha / r A B), for a plain diffusers
transformer dir.
With ``fold_alpha`` (the default) the scale is multiplied into B and the adapter config says
``lora_alpha = r``, so any loader (diffusers without metadata, kohya-style tools) reproduces our output;
without it B is written as trained and the adapter config (``lora_adapter_metadata`` in the safetensors
header, as diffusers' ``save_lora_weights`` writes it) carries ``lora_alpha``. diffusers'
``load_lora_adapter`` / ``pipe.load_lora_weights`` read that metadata.

Everything is strict: a param tree that is not exactly the one the config implies raises ConversionError
naming every missing, extra or misshapen leaf. No torch is needed (safetensors' numpy API).

FLUX (models/flux.py, convert/flux.py) goes through the same code: the family is picked from the config's
type (:func:`family_of`). FLUX LoRA keys are ``transformer.transformer_blocks.{i}.{site}`` (double blocks:
attention ``attn.*`` with ``to_out.0``, MLPs ``ff[_context].net.0.proj`` / ``.net.2`` (FLUX.1) or
``ff[_context].linear_in`` / ``.linear_out`` (FLUX.2)) and ``transformer.single_transformer_blocks.{i}.attn.{proj}``
(FLUX.1 to_q/k/v; FLUX.2 ``to_qkv_mlp_proj`` and ``to_out``, which has no ``.0`` there). The saved
``config.json`` is ``FluxTransformer2DModel`` / ``Flux2Transformer2DModel``.
"""

import dataclasses
import functools
import json
import os
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from normguard_jax.convert import flux as convert_flux
from normguard_jax.convert import sd3 as convert_sd3
from normguard_jax.convert.safetensors_io import ConversionError, _leaf_paths
from normguard_jax.models import flux, mmdit

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY


@dataclasses.dataclass(frozen=True)
class Family:
  """One transformer family: its diffusers class names, converter module, model module and the ``lora_targets``
  entries it accepts."""
  name: str
  label: str
  class_names: Tuple[str, ...]
  converter: object
  model: object
  lora_targets: Tuple[str, ...]


FAMILIES = (
    Family("sd3", "SD3 transformer", convert_sd3.CLASS_NAMES, convert_sd3, mmdit, mmdit.LORA_TARGETS),
    Family("flux", "FLUX.1 transformer", (convert_flux.FLUX1_CLASS,), convert_flux, flux, flux.FLUX1_LORA_TARGETS),
    Family("flux2", "FLUX.2 transformer", (convert_flux.FLUX2_CLASS,), convert_flux, flux, flux.FLUX2_LORA_TARGETS),
)
CLASS_NAMES = tuple(c for f in FAMILIES for c in f.class_names)


def family_of(cfg) -> Family:
  """The family of a model config (MMDiTConfig, FluxConfig or Flux2Config)."""
  name = getattr(cfg, "family", "sd3")
  return next(f for f in FAMILIES if f.name == name)


def family_of_class(class_name) -> Family:
  """The family of a diffusers ``_class_name`` (ConversionError if none)."""
  for f in FAMILIES:
    if class_name in f.class_names:
      return f
  raise ConversionError("config", [f"_class_name {class_name!r} is not one of {CLASS_NAMES}"])


@functools.lru_cache(maxsize=16)
def _shapes(cfg):
  """Abstract variables of ``cfg`` (traced once per config)."""
  return family_of(cfg).model.param_shapes(cfg)


def _to_numpy(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)


def _check_tree(what, tree, targets, *, last_axis_free=False):
  """Our tree must have exactly the leaves of ``targets`` with their shapes (the last axis free for LoRA)."""
  got, want = _leaf_paths(tree), _leaf_paths(targets)
  problems = [f"missing leaf {'/'.join(p)} {tuple(want[p].shape)}" for p in sorted(set(want) - set(got))]
  problems += [f"extra leaf {'/'.join(p)} {tuple(np.shape(got[p]))} (not in the model for this config)"
               for p in sorted(set(got) - set(want))]
  for p in sorted(set(got) & set(want)):
    shape, expect = tuple(np.shape(got[p])), tuple(want[p].shape)
    ok = shape[:-1] == expect[:-1] if last_axis_free else shape == expect
    if not ok or (last_axis_free and len(shape) != len(expect)):
      problems.append(f"wrong shape for {'/'.join(p)}: {list(shape)}, expected {list(expect)}"
                      + (" (any adapter count on the last axis)" if last_axis_free else ""))
    elif not np.all(np.isfinite(np.asarray(got[p], np.float32))):
      problems.append(f"{'/'.join(p)}: non-finite values")
  if problems:
    raise ConversionError(what, problems)
  return got


# ----------------------------------------------------------------------------------------------- full weights

def diffusers_config(cfg, base: Optional[dict] = None) -> dict:
  """``config.json`` of the diffusers model with ``cfg``'s architecture (``base``'s other fields kept)."""
  if family_of(cfg).name != "sd3":
    out = convert_flux.diffusers_config(cfg, base)
    out.setdefault("_diffusers_version", _diffusers_version())
    return out
  out = dict(base or {})
  out.pop("_name_or_path", None)
  out["_class_name"] = "SD3Transformer2DModel"
  out.setdefault("_diffusers_version", _diffusers_version())
  for k in convert_sd3._ARCH_FIELDS:
    v = getattr(cfg, k)
    out[k] = list(v) if isinstance(v, tuple) else v
  return out


def _diffusers_version():
  try:
    from importlib.metadata import version
    return version("diffusers")
  except Exception:  # diffusers is optional here: the file format does not depend on it
    return "0.30.0"


def transformer_state_dict(cfg, params, *, dtype=np.float32) -> Dict[str, np.ndarray]:
  """diffusers ``state_dict()`` (numpy, torch layouts) of the SD3 / FLUX transformer, from our ``params``.

  The inverse of the converter's ``key_map(cfg)``; ``params`` may be scanned or not, as ``cfg.scan_layers`` says.
  """
  fam = family_of(cfg)
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  got = _check_tree(f"{fam.label} export", _to_numpy(params), _shapes(base_cfg)["params"])
  out = {}
  for e in fam.converter.key_map(cfg):
    if e.layout == "check":
      a = np.asarray(e.expected)
    else:
      a = got[e.dst]
      if e.index is not None:
        a = a[e.index]
      if e.layout == "linear":
        a = a.T
      elif e.layout == "conv":
        a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    out[e.src] = np.ascontiguousarray(a).astype(dtype)
  return out


def _save_safetensors(path, tensors, metadata=None):
  from safetensors.numpy import save_file
  tmp = path + ".tmp"
  save_file(tensors, tmp, metadata=metadata)
  os.replace(tmp, path)  # never leave a half-written file under the real name


def save_transformer(directory, cfg, params, *, base_config: Optional[dict] = None,
                     dtype=np.float32, max_shard_bytes: Optional[int] = None) -> str:
  """Writes ``<directory>/config.json`` and the weights (sharded with an index above ``max_shard_bytes``).

  Returns ``directory``. ``SD3Transformer2DModel`` / ``Flux[2]Transformer2DModel.from_pretrained`` loads it.
  """
  directory = os.fspath(directory)
  tensors = transformer_state_dict(cfg, params, dtype=dtype)
  os.makedirs(directory, exist_ok=True)
  for stale in (WEIGHTS_NAME, INDEX_NAME):
    if os.path.exists(os.path.join(directory, stale)):
      os.remove(os.path.join(directory, stale))
  total = sum(a.nbytes for a in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    _save_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors, {"format": "pt"})
  else:
    shards, cur, size = [], {}, 0
    for k, a in tensors.items():
      if cur and size + a.nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[k], size = a, size + a.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
      name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _save_safetensors(os.path.join(directory, name), shard, {"format": "pt"})
      weight_map.update({k: name for k in shard})
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
      json.dump({"metadata": {"total_size": int(total)}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(diffusers_config(cfg, base_config), f, indent=2, sort_keys=True)
  return directory


# ----------------------------------------------------------------------------------------------- LoRA

def _lora_modules(cfg):
  """[(diffusers module path, our tree path to the LoRADense, stacked index or None)] in layer order."""
  return family_of(cfg).model.lora_modules(cfg)


def lora_targets_from_tree(cfg, lora) -> Tuple[str, ...]:
  """The ``lora_targets`` (diffusers site names) that give exactly the adapted modules of a ``lora`` tree, for a
  tree saved without its config; ``cfg`` gives the architecture and scan layout. ConversionError for a leaf that
  is no LoRA site of this architecture."""
  fam = family_of(cfg)
  every = dataclasses.replace(cfg, lora_rank=max(cfg.lora_rank, 1), lora_targets=fam.lora_targets)
  site_of = {path: module.split(".", 2)[2] for module, path, _ in _lora_modules(every)}
  paths = {p[:-1] for p in _leaf_paths(lora) if p[-1] in ("lora_a", "lora_b")}
  unknown = sorted("/".join(p) for p in paths if p not in site_of)
  if unknown or not paths:
    raise ConversionError("LoRA tree", [f"{p}: not a LoRA site of this {fam.label}" for p in unknown]
                          or ["no lora_a / lora_b leaves (is it a LoRA tree?)"])
  return tuple(sorted({site_of[p] for p in paths}))


def merge_lora(cfg, params, lora, *, adapter=0):
  """Base ``params`` with adapter ``adapter`` of ``lora`` folded in: each adapted kernel W (in, out) becomes
  W + (alpha / r) A_j B_j (models/lora.py: y = x W + b + (alpha / r) (x A_j) B_j), so the LoRA-free model with the
  merged params computes the adapted velocity (up to rounding). The sum is formed in float64 and cast back to
  W's dtype. Returns a numpy tree with the structure of ``params``; both trees are checked strictly."""
  from flax import traverse_util
  fam = family_of(cfg)
  if cfg.lora_rank <= 0:
    raise ValueError("cfg.lora_rank must be > 0 to merge a LoRA (the config the adapters were trained with)")
  got = _check_tree("LoRA merge", _to_numpy(lora), _shapes(cfg)["lora"], last_axis_free=True)
  base = _check_tree(f"{fam.label} merge", _to_numpy(params), _shapes(dataclasses.replace(cfg, lora_rank=0))["params"])
  n_adapters = {np.shape(a)[-1] for a in got.values()}
  if len(n_adapters) != 1 or not 0 <= adapter < min(n_adapters):
    raise ConversionError("LoRA merge", [f"adapter index {adapter} out of range for adapter counts "
                                         f"{sorted(n_adapters)} on the last axis"])
  scale = cfg.lora_alpha / cfg.lora_rank
  out = dict(base)
  for path in {p[:-1] for p in got}:
    a = got[path + ("lora_a",)][..., adapter].astype(np.float64)  # ([L,] in, r)
    b = got[path + ("lora_b",)][..., adapter].astype(np.float64)  # ([L,] r, out)
    w = base[path + ("kernel",)]
    out[path + ("kernel",)] = (w.astype(np.float64) + scale * np.einsum("...ir,...ro->...io", a, b)).astype(w.dtype)
  return traverse_util.unflatten_dict(out)


def lora_config(cfg, *, fold_alpha=True) -> dict:
  """peft ``LoraConfig`` kwargs for the exported adapter (what diffusers' ``get_peft_kwargs`` would infer)."""
  r = cfg.lora_rank
  return {"r": r, "lora_alpha": float(r) if fold_alpha else float(cfg.lora_alpha), "rank_pattern": {},
          "alpha_pattern": {}, "target_modules": sorted(m for m, _, _ in _lora_modules(cfg)), "use_dora": False,
          "lora_bias": False}


def lora_state_dict(cfg, lora, *, adapter=0, fold_alpha=True, prefix="transformer",
                    dtype=np.float32) -> Tuple[Dict[str, np.ndarray], dict]:
  """-> (PEFT state dict, LoraConfig kwargs) of adapter ``adapter`` (index on the last axis) of ``lora``.

  Keys are ``{prefix}.{diffusers module}.lora_{A,B}.weight`` (e.g. ``transformer_blocks.{i}.attn.to_q``);
  scanned groups are unstacked.
  """
  if cfg.lora_rank <= 0:
    raise ValueError("cfg.lora_rank must be > 0 to export a LoRA (the config the adapters were trained with)")
  got = _check_tree("LoRA export", _to_numpy(lora), _shapes(cfg)["lora"], last_axis_free=True)
  n_adapters = {np.shape(a)[-1] for a in got.values()}
  if len(n_adapters) != 1 or not 0 <= adapter < min(n_adapters):
    raise ConversionError("LoRA export", [f"adapter index {adapter} out of range for adapter counts "
                                          f"{sorted(n_adapters)} on the last axis"])
  scale = cfg.lora_alpha / cfg.lora_rank if fold_alpha else 1.0
  pre = f"{prefix}." if prefix else ""
  out = {}
  for module, path, idx in _lora_modules(cfg):
    a, b = got[path + ("lora_a",)], got[path + ("lora_b",)]
    if idx is not None:
      a, b = a[idx], b[idx]
    out[f"{pre}{module}.lora_A.weight"] = np.ascontiguousarray(a[..., adapter].T).astype(dtype)
    out[f"{pre}{module}.lora_B.weight"] = np.ascontiguousarray(
        (b[..., adapter].astype(np.float64) * scale).T).astype(dtype)
  return out, lora_config(cfg, fold_alpha=fold_alpha)


def save_lora(path, cfg, lora, *, adapter=0, fold_alpha=True, prefix="transformer",
              dtype=np.float32) -> str:
  """Writes ``pytorch_lora_weights.safetensors`` (``path`` is a directory, or the file name itself).

  The adapter config goes in the header under ``lora_adapter_metadata`` with ``{prefix}.``-prefixed keys, as
  diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline.save_lora_weights`` write it. Returns the file path.
  """
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, LORA_WEIGHT_NAME)
  tensors, config = lora_state_dict(cfg, lora, adapter=adapter, fold_alpha=fold_alpha, prefix=prefix, dtype=dtype)
  pre = f"{prefix}." if prefix else ""
  meta = {"format": "pt", LORA_METADATA_KEY: json.dumps({pre + k: v for k, v in config.items()}, indent=2,
                                                          sort_keys=True)}
  _save_safetensors(path, tensors, meta)
  return path
