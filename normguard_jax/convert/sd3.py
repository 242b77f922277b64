"""Strict converter: diffusers ``SD3Transformer2DModel`` (safetensors) -> models/mmdit.py params.

Accepts a diffusers pipeline directory (reads ``<dir>/transformer``) or the transformer directory itself.
The key map is declarative (:func:`key_map`): diffusers names on the left, our tree on the right; Linear
weights are transposed, the patchify conv goes OIHW -> HWIO, and layers of a scanned run are stacked on
axis 0 (``mmdit.block_layout``). The persistent ``pos_embed.pos_embed`` buffer is consumed as a check: it
must equal the table we recompute from the config (we never train it).
"""

import dataclasses
from typing import Optional

import numpy as np

from normguard_jax.convert.safetensors_io import (ConversionError, Entry, apply_key_map, load_component)
from normguard_jax.models import mmdit

CLASS_NAMES = ("SD3Transformer2DModel",)
_ARCH_FIELDS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                "out_channels", "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def config_from_diffusers(config: dict, **overrides) -> mmdit.MMDiTConfig:
  """Our config from diffusers' ``config.json`` (architecture), plus runtime ``overrides`` (scan_layers, lora...)."""
  defaults = {f.name: f.default for f in dataclasses.fields(mmdit.MMDiTConfig)}
  arch = {k: config.get(k, defaults[k]) for k in _ARCH_FIELDS}
  if arch["out_channels"] is None:
    arch["out_channels"] = arch["in_channels"]
  arch["dual_attention_layers"] = tuple(arch["dual_attention_layers"] or ())
  bad = set(overrides) & set(_ARCH_FIELDS)
  if bad:
    raise ValueError(f"architecture fields come from config.json, not overrides: {sorted(bad)}")
  try:
    return mmdit.MMDiTConfig(**arch, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError("config", [f"unsupported SD3 transformer config: {e}"]) from e


def _linear(src, dst, index=None):
  return [Entry(f"{src}.weight", dst + ("kernel",), "linear", index), Entry(f"{src}.bias", dst + ("bias",), "copy", index)]


def _block_entries(cfg, i, group):
  """diffusers ``transformer_blocks.{i}`` -> our block group (stacked slice when scanned)."""
  src, dst = f"transformer_blocks.{i}", (group.name,)
  idx = i - group.start if group.scanned else None
  out = _linear(f"{src}.norm1.linear", dst + ("norm1",), idx)
  out += _linear(f"{src}.norm1_context.linear", dst + ("norm1_context",), idx)

  def attention(name, joint):
    a, d = f"{src}.{name}", dst + (name,)
    res = []
    for proj in ("to_q", "to_k", "to_v"):
      res += _linear(f"{a}.{proj}", d + (proj,), idx)
    res += _linear(f"{a}.to_out.0", d + ("to_out",), idx)
    if joint:
      for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
        res += _linear(f"{a}.{proj}", d + (proj,), idx)
      if not group.context_pre_only:
        res += _linear(f"{a}.to_add_out", d + ("to_add_out",), idx)
    if cfg.qk_norm == "rms_norm":
      norms = ("norm_q", "norm_k") + (("norm_added_q", "norm_added_k") if joint else ())
      res += [Entry(f"{a}.{n}.weight", d + (n, "scale"), "copy", idx) for n in norms]
    return res

  out += attention("attn", joint=True)
  if group.dual:
    out += attention("attn2", joint=False)
  ffs = ("ff",) if group.context_pre_only else ("ff", "ff_context")
  for ff in ffs:
    out += _linear(f"{src}.{ff}.net.0.proj", dst + (ff, "fc1"), idx)
    out += _linear(f"{src}.{ff}.net.2", dst + (ff, "fc2"), idx)
  return out


def key_map(cfg: mmdit.MMDiTConfig):
  """Every diffusers key of an SD3Transformer2DModel with this config -> its place in our param tree."""
  entries = [
      Entry("pos_embed.proj.weight", ("pos_embed", "proj", "kernel"), "conv"),
      Entry("pos_embed.proj.bias", ("pos_embed", "proj", "bias")),
      Entry("pos_embed.pos_embed", layout="check", expected=mmdit.pos_embed_table(cfg)),
  ]
  for emb in ("timestep_embedder", "text_embedder"):
    for lin in ("linear_1", "linear_2"):
      entries += _linear(f"time_text_embed.{emb}.{lin}", ("time_text_embed", emb, lin))
  entries += _linear("context_embedder", ("context_embedder",))
  for group in mmdit.block_layout(cfg):
    for i in range(group.start, group.stop):
      entries += _block_entries(cfg, i, group)
  entries += _linear("norm_out.linear", ("norm_out",))
  entries += _linear("proj_out", ("proj_out",))
  return entries


def convert_checkpoint(checkpoint, cfg: mmdit.MMDiTConfig, *, source_dtype: Optional[str] = None,
                       param_dtype=np.float32):
  """Param tree for ``cfg`` from an opened checkpoint (anything with keys / info / load)."""
  targets = mmdit.param_shapes(dataclasses.replace(cfg, lora_rank=0))["params"]
  return apply_key_map("SD3 transformer", key_map(cfg), checkpoint, targets, source_dtype=source_dtype,
                       param_dtype=param_dtype)


def load_transformer(path, *, variant: Optional[str] = None, source_dtype: Optional[str] = None,
                     param_dtype=np.float32, as_jax=True, **overrides):
  """(cfg, params) from a diffusers pipeline dir or its ``transformer`` dir. ``overrides``: runtime fields.

  Raises ConversionError (all problems at once) on a wrong directory, a missing / extra / misshapen /
  mistyped key, or a truncated or corrupt file. LoRA params are not in the checkpoint: add
  ``mmdit.init_lora(cfg, key)`` as the ``lora`` collection.
  """
  return load_component(path, "transformer", CLASS_NAMES, config_from_diffusers, convert_checkpoint, variant=variant,
                        source_dtype=source_dtype, param_dtype=param_dtype, as_jax=as_jax, **overrides)
