"""Tier-3 parity: our FLUX.1 / FLUX.2 port (models/flux.py) against diffusers' ``FluxTransformer2DModel`` and
``Flux2Transformer2DModel``, fp32 on CPU; plus the strict converter (convert/flux.py) and the LoRA export.

Tiny random-init diffusers models (every weight randomised, zero-initialised ones included) are saved with
``save_pretrained`` (one of them sharded) and converted by our converter from that directory. The torch
reference is driven exactly as the pipelines drive it: latents packed / position ids built / output unpacked
with the pipelines' own static helpers, ``timestep = t`` (the model multiplies by 1000), guidance the scale.
Tolerances (DESIGN.md §8): 2e-5 abs and 1e-5 rel (max|a-b| / max|b|) for a full forward; RoPE tables equal
bit for bit; LoRA export 1e-4.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax.convert import export  # noqa: E402
from normguard_jax.convert import flux as convert_flux  # noqa: E402
from normguard_jax.convert.safetensors_io import ConversionError  # noqa: E402
from normguard_jax.models import flux  # noqa: E402
from tests.torch_helpers import errors, randomize_torch  # noqa: E402

ABS_TOL, REL_TOL, LORA_TOL = 2e-5, 1e-5, 1e-4

# Two double and two single blocks, so that scan_layers stacks both kinds.
_F1 = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6))
_F2 = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
           num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=3.0,
           axes_dims_rope=(4, 4, 4, 4))
CONFIGS = {  # name: (diffusers class name, kwargs, save sharded)
    "flux1_dev": ("FluxTransformer2DModel", dict(_F1, guidance_embeds=True), True),
    "flux1_schnell": ("FluxTransformer2DModel", dict(_F1, guidance_embeds=False), False),
    "flux2_klein": ("Flux2Transformer2DModel", dict(_F2, guidance_embeds=False), False),
    "flux2_dev": ("Flux2Transformer2DModel", dict(_F2, guidance_embeds=True), False),
}


def assert_close(name, ours, ref, abs_tol=ABS_TOL, rel_tol=REL_TOL):
  abs_err, rel_err = errors(ours, ref)
  print(f"[parity] {name}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}")
  assert abs_err <= abs_tol and rel_err <= rel_tol, (name, abs_err, rel_err)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{name: (torch model, pipeline dir)}: saved as <dir>/transformer like a diffusers pipeline."""
  out = {}
  for i, (name, (cls, kwargs, sharded)) in enumerate(CONFIGS.items()):
    model = randomize_torch(getattr(diffusers, cls)(**kwargs), seed=i)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "transformer", max_shard_size="40KB" if sharded else "10GB")
    out[name] = (model, root)
  return out


def make_inputs(cfg, batch=2, text_len=5, h=8, w=6, seed=0, t=(0.25, 0.9), guidance=(3.5, 1.0)):
  """NHWC latents (non-square, to catch row / column mix-ups) and the cond dict."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cfg.latent_channels)).astype(np.float32)
  cond = dict(prompt_embeds=rng.standard_normal((batch, text_len, cfg.joint_attention_dim)).astype(np.float32))
  if isinstance(cfg, flux.FluxConfig):
    cond["pooled"] = rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32)
  if cfg.guidance_embeds:
    cond["guidance"] = np.asarray(guidance, np.float32)[:batch]
  return x, np.asarray(t, np.float32)[:batch], cond


def torch_velocity(model, cfg, x, t, cond):
  """diffusers' transformer, fed and read back as FluxPipeline / Flux2KleinPipeline do."""
  b, h, w, c = x.shape
  lat = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  pe = torch.from_numpy(cond["prompt_embeds"])
  kwargs = {}
  if cfg.guidance_embeds:
    kwargs["guidance"] = torch.from_numpy(cond["guidance"])
  with torch.no_grad():
    if isinstance(cfg, flux.FluxConfig):
      pipe = diffusers.FluxPipeline
      tokens = pipe._pack_latents(lat, b, c, h, w)
      img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
      txt_ids = torch.zeros(pe.shape[1], 3)
      out = model(hidden_states=tokens, encoder_hidden_states=pe, pooled_projections=torch.from_numpy(cond["pooled"]),
                  timestep=torch.from_numpy(t), img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kwargs)[0]
      out = pipe._unpack_latents(out, h * 8, w * 8, 8)
    else:
      pipe = diffusers.Flux2KleinPipeline
      patched = pipe._patchify_latents(lat)
      img_ids = pipe._prepare_latent_ids(patched)
      txt_ids = pipe._prepare_text_ids(pe)
      out = model(hidden_states=pipe._pack_latents(patched), encoder_hidden_states=pe, timestep=torch.from_numpy(t),
                  img_ids=img_ids, txt_ids=txt_ids, return_dict=False, **kwargs)[0]
      out = pipe._unpatchify_latents(pipe._unpack_latents_with_ids(out, img_ids))
  return out.numpy().transpose(0, 2, 3, 1)


def _jit_velocity(cfg):
  return jax.jit(lambda variables, x, t, c, gate=None: flux.velocity(variables, x, t, c, cfg=cfg, lora_gate=gate))


def _random_lora(cfg, n_adapters, seed=1):
  """Random nonzero adapters (B too) for every LoRA leaf, from the abstract shapes (nothing compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda l: (0.3 * rng.standard_normal(l.shape[:-1] + (n_adapters,))).astype(np.float32),
                                flux.param_shapes(cfg)["lora"])


# LoRA targets of the LoRA cases: FLUX.1 Flow-Factory's (attention + GELU MLPs); FLUX.2 Flow-Factory's (attention,
# SwiGLU MLPs, fused single-block projection) plus the single blocks' plain to_out: every LoRA-able site.
LORA_TARGETS = {"flux1_dev": flux.FLUX1_LORA_PRESETS["reference"],
                "flux2_klein": flux.FLUX2_LORA_PRESETS["reference"] + ("to_out",)}


@pytest.fixture(scope="module")
def lora_cases(models):
  """name -> (cfg, variables, jitted velocity): scanned, rank-2 alpha-3 adapters (two stacked) on LORA_TARGETS.

  Compiled once and shared by the gate-0 parity cases and the LoRA export test.
  """
  cache = {}

  def get(name):
    if name not in cache:
      cfg, params = convert_flux.load_transformer(models[name][1], scan_layers=True, lora_rank=2, lora_alpha=3.0,
                                                  lora_targets=LORA_TARGETS[name])
      cache[name] = (cfg, {"params": params, "lora": _random_lora(cfg, n_adapters=2)}, _jit_velocity(cfg))
    return cache[name]
  return get


# Each family runs once unscanned without LoRA and once scanned with random adapters at gate 0 (so gate 0 is
# checked against diffusers' plain model too); guidance embedding on and off for both.
@pytest.mark.parametrize("name,scan_layers", [("flux1_dev", True), ("flux1_schnell", False), ("flux2_klein", True),
                                              ("flux2_dev", False)])
def test_velocity_parity(models, lora_cases, name, scan_layers):
  model, root = models[name]
  if scan_layers:
    cfg, variables, v = lora_cases(name)
  else:
    cfg, params = convert_flux.load_transformer(root, scan_layers=False)
    variables, v = {"params": params}, _jit_velocity(cfg)
  assert cfg.class_name == CONFIGS[name][0] and cfg.guidance_embeds == CONFIGS[name][1]["guidance_embeds"]
  assert any(g.scanned for g in flux.block_layout(cfg)) == scan_layers
  for t in ((0.25, 0.9), (0.7, 1.0)):
    x, t, cond = make_inputs(cfg, t=t)
    gate = jnp.zeros((2, 2)) if scan_layers else None
    ours = v(variables, x, t, cond, gate)
    assert ours.shape == x.shape[:3] + (cfg.out_channels // 4,) and ours.dtype == jnp.float32
    label = f"velocity {name} scan={scan_layers}{' lora gate 0' if scan_layers else ''} t=({t[0]:.2f}, {t[1]:.2f})"
    assert_close(label, ours, torch_velocity(model, cfg, x, t, cond))


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_rope_tables_bit_exact(family):
  """Our (cos, sin) tables vs diffusers' FluxPosEmbed / Flux2PosEmbed on the pipelines' own ids, at the real
  models' axes (FLUX.1 (16, 56, 56), theta 1e4; FLUX.2 (32, 32, 32, 32), theta 2000) and a 40 x 24 grid."""
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed
  from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed
  h, w, text_len = 40, 24, 77
  if family == "flux1":
    cfg = flux.FluxConfig()
    ids = torch.cat([torch.zeros(text_len, 3), diffusers.FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu",
                                                                                                 torch.float32)])
    ref = FluxPosEmbed(theta=10000, axes_dim=list(cfg.axes_dims_rope))(ids)
  else:
    cfg = flux.Flux2Config()
    pipe = diffusers.Flux2KleinPipeline
    ids = torch.cat([pipe._prepare_text_ids(torch.zeros(1, text_len, 1))[0],
                     pipe._prepare_latent_ids(torch.zeros(1, 1, h, w))[0]]).float()
    ref = Flux2PosEmbed(theta=cfg.rope_theta, axes_dim=list(cfg.axes_dims_rope))(ids)
  np.testing.assert_array_equal(flux.position_ids(cfg, text_len, h, w), ids.numpy())
  ours = flux.rope_tables(cfg, text_len, h, w)
  for label, a, b in zip(("cos", "sin"), ours, ref):
    assert a.dtype == np.float32 and a.shape == tuple(b.shape)
    np.testing.assert_array_equal(a, b.numpy())
  print(f"[parity] rope {family}: cos/sin tables {ours[0].shape} bit-identical to diffusers")


def test_timestep_freqs_within_one_ulp():
  """Our constant frequency table is within 1 ulp of torch's float32 exp (equal on all but a couple)."""
  import math
  for dim in (256, 32):
    half = dim // 2
    ref = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half).numpy()
    ours = np.asarray(flux.timestep_freqs(dim))
    np.testing.assert_array_max_ulp(ours, ref, maxulp=1)
    print(f"[parity] timestep freqs dim {dim}: {(ours != ref).sum()} of {half} entries differ by 1 ulp")


# ----------------------------------------------------------------------------------------------- converter

def _fault_dir(root, tmp_path, mutate):
  """A copy of <root>/transformer (single file) with its tensors passed through ``mutate``."""
  from safetensors.numpy import load_file, save_file
  src = root / "transformer"
  dst = tmp_path / "transformer"
  os.makedirs(dst)
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = load_file(str(src / export.WEIGHTS_NAME))
  mutate(tensors)
  save_file(tensors, str(dst / export.WEIGHTS_NAME))
  return dst


FAULTS = {
    "missing": (lambda t: t.pop("single_transformer_blocks.1.attn.norm_k.weight"),
                "missing key 'single_transformer_blocks.1.attn.norm_k.weight'"),
    "extra": (lambda t: t.__setitem__("transformer_blocks.0.attn.to_bogus.weight", np.zeros((2, 2), np.float32)),
              "extra key 'transformer_blocks.0.attn.to_bogus.weight'"),
    "shape": (lambda t: t.__setitem__("context_embedder.weight", t["context_embedder.weight"].T.copy()),
              "wrong shape for 'context_embedder.weight': [24, 32], expected [32, 24]"),
    "dtype": (lambda t: t.__setitem__("proj_out.weight", t["proj_out.weight"].astype(np.float64)),
              "wrong dtype for 'proj_out.weight': F64"),
}


@pytest.mark.parametrize("name", ["flux1_dev", "flux2_klein"])
def test_converter_faults(models, tmp_path, name):
  """Each fault alone names its key; all four at once are reported together in one ConversionError."""
  _, root = models[name]
  if CONFIGS[name][2]:  # the sharded one: read its shards into one file first
    from safetensors.numpy import save_file
    from normguard_jax.convert.safetensors_io import open_checkpoint
    ckpt = open_checkpoint(root / "transformer")
    assert len(ckpt.files) > 1
    single = tmp_path / "single"
    os.makedirs(single / "transformer")
    (single / "transformer" / "config.json").write_text((root / "transformer" / "config.json").read_text())
    save_file({k: ckpt.load(k) for k in ckpt.keys()}, str(single / "transformer" / export.WEIGHTS_NAME))
    root = single
  for i, (kind, (mutate, needle)) in enumerate(FAULTS.items()):
    d = _fault_dir(root, tmp_path / kind, mutate)
    with pytest.raises(ConversionError) as e:
      convert_flux.load_transformer(d, scan_layers=True)
    assert needle in str(e.value) and len(e.value.problems) == 1, (kind, str(e.value))

  def all_four(t):
    for mutate, _ in FAULTS.values():
      mutate(t)

  with pytest.raises(ConversionError) as e:
    convert_flux.load_transformer(_fault_dir(root, tmp_path / "all", all_four), scan_layers=False)
  assert len(e.value.problems) == 4 and all(needle in str(e.value) for _, needle in FAULTS.values())
  # wrong family: an SD3 converter refuses a FLUX dir (and vice versa), naming the class
  from normguard_jax.convert import sd3 as convert_sd3
  with pytest.raises(ConversionError, match=CONFIGS[name][0]):
    convert_sd3.load_transformer(root)


def test_sharded_and_scanned_trees(models):
  """The sharded checkpoint converts; the scanned tree is the stacked unscanned one."""
  _, root = models["flux1_dev"]
  _, p_u = convert_flux.load_transformer(root, scan_layers=False)
  cfg_s, p_s = convert_flux.load_transformer(root, scan_layers=True)
  for kind in ("double", "single"):
    stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), p_u[f"{kind}_0"], p_u[f"{kind}_1"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_s[f"{kind}_blocks"], stacked)
  assert flux.param_count(p_s) == flux.param_count(p_u) == sum(p.numel() for p in models["flux1_dev"][0].parameters())


# ----------------------------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("name,how,fold_alpha", [("flux1_dev", "pipeline", False), ("flux2_klein", "file", True)])
def test_lora_export_roundtrip(models, lora_cases, tmp_path, name, how, fold_alpha):
  """Random nonzero LoRA (two stacked adapters) on every LoRA-able Linear -> PEFT safetensors -> diffusers.

  The loaded diffusers model reproduces our adapter-0 velocity; gates act per row, exactly.
  how: 'pipeline' = FluxPipeline.lora_state_dict + load_lora_into_transformer (what pipe.load_lora_weights does
  for the transformer, alpha from the metadata); 'file' = transformer.load_lora_adapter(dir).
  """
  pytest.importorskip("peft")
  model, _ = models[name]
  cfg, variables, v = lora_cases(name)
  lora = variables["lora"]
  x, t, cond = make_inputs(cfg)
  gates = {"policy": [[1., 0.]] * 2, "other": [[0., 1.]] * 2, "base": [[0., 0.]] * 2, "mixed": [[0., 0.], [1., 0.]]}
  ours = {k: np.asarray(v(variables, x, t, cond, jnp.array(g))) for k, g in gates.items()}
  # Within one program (what the fused policy/reference forward relies on) gates act per row, exactly, and
  # zeroed adapters with gate 1 give the gate-0 output exactly.
  np.testing.assert_array_equal(ours["mixed"][0], ours["base"][0])
  np.testing.assert_array_equal(ours["mixed"][1], ours["policy"][1])
  zeroed = dict(variables, lora=jax.tree_util.tree_map(np.zeros_like, lora))
  np.testing.assert_array_equal(np.asarray(v(zeroed, x, t, cond, jnp.array(gates["policy"]))), ours["base"])

  path = export.save_lora(tmp_path, cfg, lora, fold_alpha=fold_alpha)
  m = copy.deepcopy(model)
  if how == "file":
    m.load_lora_adapter(str(tmp_path), weight_name=os.path.basename(path), adapter_name="ng", prefix="transformer")
  else:
    sd, alphas, meta = diffusers.FluxPipeline.lora_state_dict(str(tmp_path), return_alphas=True,
                                                              return_lora_metadata=True)
    assert meta["transformer.lora_alpha"] == 3.0
    diffusers.FluxPipeline.load_lora_into_transformer(sd, alphas, transformer=m, adapter_name="ng", metadata=meta)
  assert m.peft_config["ng"].r == 2 and m.peft_config["ng"].lora_alpha == (2.0 if fold_alpha else 3.0)
  # every adapted Linear exists: 8 attention + 4 MLP per double block; single blocks 3 (FLUX.1 q/k/v) or 2 (FLUX.2
  # fused in/out projections)
  n_single = 3 if isinstance(cfg, flux.FluxConfig) else 2
  assert sum(1 for n, _ in m.named_modules() if n.endswith("lora_A.ng")) == 2 * 12 + 2 * n_single
  theirs = torch_velocity(m, cfg, x, t, cond)
  err = float(np.max(np.abs(theirs - ours["policy"])))
  effect = float(np.max(np.abs(ours["policy"] - ours["base"])))
  err_other = float(np.max(np.abs(theirs - ours["other"])))
  print(f"[export] lora {name} via {how} fold_alpha={fold_alpha}: max abs err {err:.3g} "
        f"(LoRA effect {effect:.3g}; vs adapter 1 {err_other:.3g})")
  assert err <= LORA_TOL and effect > 100 * LORA_TOL and err_other > 100 * LORA_TOL
  m.disable_lora()
  assert float(np.max(np.abs(torch_velocity(m, cfg, x, t, cond) - ours["base"]))) <= ABS_TOL


def test_full_export_and_cli(models, tmp_path):
  """to-jax picks the class from config.json; export-full gives diffusers back its state dict exactly."""
  from normguard_jax.convert.__main__ import main as cli
  model, root = models["flux2_dev"]
  out = tmp_path / "jax"
  manifest = cli(["to-jax", str(root), str(out), "--no-hash"])
  assert manifest["model_family"] == "flux2" and manifest["format"] == "normguard_jax.flux/orbax-standard/v1"
  assert manifest["flux_config"]["guidance_embeds"] is True
  assert manifest["param_count"] == sum(p.numel() for p in model.parameters())
  with open(out / "manifest.json") as f:
    assert json.load(f)["diffusers_config"]["_class_name"] == "Flux2Transformer2DModel"
  cli(["export-full", str(out), str(tmp_path / "full")])
  back = diffusers.Flux2Transformer2DModel.from_pretrained(tmp_path / "full")
  ref = model.state_dict()
  assert sorted(back.state_dict()) == sorted(ref)
  for k, v in back.state_dict().items():
    assert torch.equal(v, ref[k]), k
