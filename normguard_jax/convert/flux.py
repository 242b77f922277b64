"""Strict converters: diffusers ``FluxTransformer2DModel`` (FLUX.1) and ``Flux2Transformer2DModel`` (FLUX.2)
safetensors -> models/flux.py params.

Accepts a diffusers pipeline directory (reads ``<dir>/transformer``) or the transformer directory itself,
single-file or sharded. The family comes from ``config.json``'s ``_class_name``. The key maps are declarative
(:func:`key_map`) and run through the same engine as SD3 (``safetensors_io.apply_key_map``): every source key
used once, every target leaf set, shapes and dtypes checked, all problems raised together. Linear weights are
transposed; blocks of a scanned run are stacked on axis 0 (``flux.block_layout``). FLUX.2 has no biases.
"""

import dataclasses
from typing import Optional

import numpy as np

from normguard_jax.convert.safetensors_io import (ConversionError, Entry, apply_key_map, load_component)
from normguard_jax.models import flux

FLUX1_CLASS = "FluxTransformer2DModel"
FLUX2_CLASS = "Flux2Transformer2DModel"
CLASS_NAMES = (FLUX1_CLASS, FLUX2_CLASS)
ARCH_FIELDS = {
    FLUX1_CLASS: ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                  "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                  "guidance_embeds", "axes_dims_rope"),
    FLUX2_CLASS: ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                  "attention_head_dim", "num_attention_heads", "joint_attention_dim", "timestep_guidance_channels",
                  "mlp_ratio", "axes_dims_rope", "rope_theta", "eps", "guidance_embeds"),
}
_CONFIG_CLS = {FLUX1_CLASS: flux.FluxConfig, FLUX2_CLASS: flux.Flux2Config}


def class_name_of(config: dict) -> str:
  """``_class_name``, or (when absent) a guess from fields only FLUX.2 has."""
  name = config.get("_class_name")
  if name is None:
    return FLUX2_CLASS if "timestep_guidance_channels" in config or "rope_theta" in config else FLUX1_CLASS
  if name not in CLASS_NAMES:
    raise ConversionError("config", [f"_class_name {name!r} is not a FLUX transformer {CLASS_NAMES}"])
  return name


def config_from_diffusers(config: dict, **overrides) -> flux.AnyFluxConfig:
  """Our FluxConfig / Flux2Config from diffusers' ``config.json`` plus runtime ``overrides`` (scan, lora...)."""
  name = class_name_of(config)
  cls = _CONFIG_CLS[name]
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  arch = {k: config.get(k, defaults[k]) for k in ARCH_FIELDS[name]}
  arch["axes_dims_rope"] = tuple(arch["axes_dims_rope"])
  bad = set(overrides) & set(ARCH_FIELDS[name])
  if bad:
    raise ValueError(f"architecture fields come from config.json, not overrides: {sorted(bad)}")
  try:
    return cls(**arch, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError("config", [f"unsupported {name} config: {e}"]) from e


def diffusers_config(cfg: flux.AnyFluxConfig, base: Optional[dict] = None) -> dict:
  """``config.json`` fields of the diffusers model with ``cfg``'s architecture (``base``'s other fields kept)."""
  out = dict(base or {})
  out.pop("_name_or_path", None)
  out.pop("_use_default_values", None)
  out["_class_name"] = cfg.class_name
  for k in ARCH_FIELDS[cfg.class_name]:
    v = getattr(cfg, k)
    out[k] = list(v) if isinstance(v, tuple) else v
  return out


def _linear(src, dst, index=None, bias=True):
  out = [Entry(f"{src}.weight", dst + ("kernel",), "linear", index)]
  if bias:
    out.append(Entry(f"{src}.bias", dst + ("bias",), "copy", index))
  return out


def _norms(src, dst, names, index):
  return [Entry(f"{src}.{n}.weight", dst + (n, "scale"), "copy", index) for n in names]


def _double_entries(cfg, i, group):
  """diffusers ``transformer_blocks.{i}`` -> our double block (a stacked slice when scanned)."""
  src, dst = f"transformer_blocks.{i}", (group.name,)
  idx = i - group.start if group.scanned else None
  bias = isinstance(cfg, flux.FluxConfig)
  out = []
  if bias:  # FLUX.1: per-block adaLN-zero linears (FLUX.2 shares its modulations at the top level)
    out += _linear(f"{src}.norm1.linear", dst + ("norm1",), idx)
    out += _linear(f"{src}.norm1_context.linear", dst + ("norm1_context",), idx)
  a, d = f"{src}.attn", dst + ("attn",)
  for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
    out += _linear(f"{a}.{proj}", d + (proj,), idx, bias)
  out += _linear(f"{a}.to_out.0", d + ("to_out",), idx, bias)
  out += _norms(a, d, ("norm_q", "norm_k", "norm_added_q", "norm_added_k"), idx)
  for ff in ("ff", "ff_context"):
    if bias:
      out += _linear(f"{src}.{ff}.net.0.proj", dst + (ff, "fc1"), idx)
      out += _linear(f"{src}.{ff}.net.2", dst + (ff, "fc2"), idx)
    else:
      out += _linear(f"{src}.{ff}.linear_in", dst + (ff, "linear_in"), idx, False)
      out += _linear(f"{src}.{ff}.linear_out", dst + (ff, "linear_out"), idx, False)
  return out


def _single_entries(cfg, i, group):
  """diffusers ``single_transformer_blocks.{i}`` -> our single block."""
  src, dst = f"single_transformer_blocks.{i}", (group.name,)
  idx = i - group.start if group.scanned else None
  a, d = f"{src}.attn", dst + ("attn",)
  out = _norms(a, d, ("norm_q", "norm_k"), idx)
  if isinstance(cfg, flux.FluxConfig):
    out += _linear(f"{src}.norm.linear", dst + ("norm",), idx)
    out += _linear(f"{src}.proj_mlp", dst + ("proj_mlp",), idx)
    out += _linear(f"{src}.proj_out", dst + ("proj_out",), idx)
    for proj in ("to_q", "to_k", "to_v"):
      out += _linear(f"{a}.{proj}", d + (proj,), idx)
  else:
    out += _linear(f"{a}.to_qkv_mlp_proj", d + ("to_qkv_mlp_proj",), idx, False)
    out += _linear(f"{a}.to_out", d + ("to_out",), idx, False)
  return out


def key_map(cfg: flux.AnyFluxConfig):
  """Every diffusers key of the model with this config -> its place in our param tree."""
  flux1 = isinstance(cfg, flux.FluxConfig)
  entries = _linear("x_embedder", ("x_embedder",), bias=flux1)
  entries += _linear("context_embedder", ("context_embedder",), bias=flux1)
  if flux1:
    embedders = ("timestep_embedder",) + (("guidance_embedder",) if cfg.guidance_embeds else ()) + ("text_embedder",)
    for emb in embedders:
      for lin in ("linear_1", "linear_2"):
        entries += _linear(f"time_text_embed.{emb}.{lin}", ("time_text_embed", emb, lin))
  else:
    embedders = ("timestep_embedder",) + (("guidance_embedder",) if cfg.guidance_embeds else ())
    for emb in embedders:
      for lin in ("linear_1", "linear_2"):
        entries += _linear(f"time_guidance_embed.{emb}.{lin}", ("time_guidance_embed", emb, lin), bias=False)
    for mod in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
      entries += _linear(f"{mod}.linear", (mod,), bias=False)
  for group in flux.block_layout(cfg):
    fn = _double_entries if group.kind == "double" else _single_entries
    for i in range(group.start, group.stop):
      entries += fn(cfg, i, group)
  entries += _linear("norm_out.linear", ("norm_out",), bias=flux1)
  entries += _linear("proj_out", ("proj_out",), bias=flux1)
  return entries


def convert_checkpoint(checkpoint, cfg: flux.AnyFluxConfig, *, source_dtype: Optional[str] = None,
                       param_dtype=np.float32):
  """Param tree for ``cfg`` from an opened checkpoint (anything with keys / info / load)."""
  targets = flux.param_shapes(dataclasses.replace(cfg, lora_rank=0))["params"]
  what = "FLUX.1 transformer" if isinstance(cfg, flux.FluxConfig) else "FLUX.2 transformer"
  return apply_key_map(what, key_map(cfg), checkpoint, targets, source_dtype=source_dtype, param_dtype=param_dtype)


def load_transformer(path, *, variant: Optional[str] = None, source_dtype: Optional[str] = None,
                     param_dtype=np.float32, as_jax=True, **overrides):
  """(cfg, params) from a diffusers pipeline dir or its ``transformer`` dir, FLUX.1 or FLUX.2 by config.

  Raises ConversionError (all problems at once) on a wrong directory, a missing / extra / misshapen /
  mistyped key, or a truncated or corrupt file. LoRA params are not in the checkpoint: add
  ``flux.init_lora(cfg, key)`` as the ``lora`` collection.
  """
  return load_component(path, "transformer", CLASS_NAMES, config_from_diffusers, convert_checkpoint, variant=variant,
                        source_dtype=source_dtype, param_dtype=param_dtype, as_jax=as_jax, **overrides)
