"""Strict converter: diffusers ``AutoencoderKL`` (safetensors) -> models/vae.py params (encoder + decoder).

Accepts a diffusers pipeline directory (reads ``<dir>/vae``) or the vae directory itself. Conv weights go
OIHW -> HWIO, the mid-block attention's Linear weights are transposed. Every key is consumed: the encoder
is converted too (drop ``params['encoder']`` afterwards for a decoder-only footprint).
"""

import dataclasses
from typing import Optional

import jax
import numpy as np

from normguard_jax.convert.safetensors_io import (ConversionError, Entry, apply_key_map, open_checkpoint,
                                                  read_config, resolve_component_dir)
from normguard_jax.models import vae as vae_lib

CLASS_NAMES = ("AutoencoderKL",)
_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
           "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
           "mid_block_add_attention")


def config_from_diffusers(config: dict, **overrides) -> vae_lib.VAEConfig:
  defaults = {f.name: f.default for f in dataclasses.fields(vae_lib.VAEConfig)}
  problems = []
  n = len(config.get("block_out_channels", defaults["block_out_channels"]))
  for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
    types = config.get(key, [want] * n)
    if any(t != want for t in types) or len(types) != n:
      problems.append(f"unsupported {key} {types}: expected {n} x {want}")
  if config.get("act_fn", "silu") != "silu":
    problems.append(f"unsupported act_fn {config['act_fn']!r}")
  if problems:
    raise ConversionError("config", problems)
  # diffusers' own defaults where config.json omits a field (our defaults are SD3's).
  fields = {k: config.get(k, defaults[k]) for k in _FIELDS}
  for k, v in (("use_quant_conv", True), ("use_post_quant_conv", True), ("shift_factor", None),
               ("scaling_factor", 0.18215)):
    fields[k] = config.get(k, v)
  try:
    return vae_lib.VAEConfig(**fields, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError("config", [f"unsupported AutoencoderKL config: {e}"]) from e


def _conv(src, dst):
  return [Entry(f"{src}.weight", dst + ("kernel",), "conv"), Entry(f"{src}.bias", dst + ("bias",))]


def _linear(src, dst):
  return [Entry(f"{src}.weight", dst + ("kernel",), "linear"), Entry(f"{src}.bias", dst + ("bias",))]


def _norm(src, dst):
  return [Entry(f"{src}.weight", dst + ("scale",)), Entry(f"{src}.bias", dst + ("bias",))]


def _resnet(src, dst, shortcut):
  out = _norm(f"{src}.norm1", dst + ("norm1",)) + _conv(f"{src}.conv1", dst + ("conv1",))
  out += _norm(f"{src}.norm2", dst + ("norm2",)) + _conv(f"{src}.conv2", dst + ("conv2",))
  if shortcut:
    out += _conv(f"{src}.conv_shortcut", dst + ("conv_shortcut",))
  return out


def _mid(cfg, src, dst):
  out = _resnet(f"{src}.resnets.0", dst + ("resnets_0",), False)
  if cfg.mid_block_add_attention:
    a, d = f"{src}.attentions.0", dst + ("attentions_0",)
    out += _norm(f"{a}.group_norm", d + ("group_norm",))
    for proj in ("to_q", "to_k", "to_v"):
      out += _linear(f"{a}.{proj}", d + (proj,))
    out += _linear(f"{a}.to_out.0", d + ("to_out",))
  return out + _resnet(f"{src}.resnets.1", dst + ("resnets_1",), False)


def key_map(cfg: vae_lib.VAEConfig):
  chans = cfg.block_out_channels
  entries = _conv("encoder.conv_in", ("encoder", "conv_in"))
  prev = chans[0]
  for i, c in enumerate(chans):
    for j in range(cfg.layers_per_block):
      entries += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", ("encoder", f"down_blocks_{i}_resnets_{j}"),
                         (prev if j == 0 else c) != c)
    prev = c
    if i < len(chans) - 1:
      entries += _conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", ("encoder", f"down_blocks_{i}_downsampler"))
  entries += _mid(cfg, "encoder.mid_block", ("encoder", "mid_block"))
  entries += _norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
  entries += _conv("encoder.conv_out", ("encoder", "conv_out"))

  rev = list(reversed(chans))
  entries += _conv("decoder.conv_in", ("decoder", "conv_in"))
  entries += _mid(cfg, "decoder.mid_block", ("decoder", "mid_block"))
  prev = rev[0]
  for i, c in enumerate(rev):
    for j in range(cfg.layers_per_block + 1):
      entries += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", ("decoder", f"up_blocks_{i}_resnets_{j}"),
                         (prev if j == 0 else c) != c)
    prev = c
    if i < len(rev) - 1:
      entries += _conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", ("decoder", f"up_blocks_{i}_upsampler"))
  entries += _norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"))
  entries += _conv("decoder.conv_out", ("decoder", "conv_out"))
  if cfg.use_quant_conv:
    entries += _conv("quant_conv", ("quant_conv",))
  if cfg.use_post_quant_conv:
    entries += _conv("post_quant_conv", ("post_quant_conv",))
  return entries


def convert_checkpoint(checkpoint, cfg: vae_lib.VAEConfig, *, source_dtype: Optional[str] = None,
                       param_dtype=np.float32):
  targets = vae_lib.param_shapes(cfg)["params"]
  return apply_key_map("AutoencoderKL", key_map(cfg), checkpoint, targets, source_dtype=source_dtype,
                       param_dtype=param_dtype)


def load_vae(path, *, variant: Optional[str] = None, source_dtype: Optional[str] = None, param_dtype=np.float32,
             as_jax=True, **overrides):
  """(cfg, params) from a diffusers pipeline dir or its ``vae`` dir; strict like ``sd3.load_transformer``."""
  directory = resolve_component_dir(path, "vae", CLASS_NAMES)
  cfg = config_from_diffusers(read_config(directory), **overrides)
  params = convert_checkpoint(open_checkpoint(directory, variant=variant), cfg, source_dtype=source_dtype,
                              param_dtype=param_dtype)
  if as_jax:
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
  return cfg, params
