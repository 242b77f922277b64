"""Strict converter: diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` (safetensors) -> models/vae.py params.

``AutoencoderKLFlux2`` adds ``bn.running_mean`` / ``bn.running_var`` (-> params ``bn``, used by
``vae.decode_flux2``) and ``bn.num_batches_tracked``, an int64 scalar consumed with its shape and dtype
checked but its value ignored (only train-mode BatchNorm reads it; the pipelines use the running stats only).

Accepts a diffusers pipeline directory (reads ``<dir>/vae``) or the vae directory itself. Conv weights go
OIHW -> HWIO, the mid-block attention's Linear weights are transposed. Every key is consumed: the encoder
is converted too (drop ``params['encoder']`` afterwards for a decoder-only footprint).
"""

import dataclasses
from typing import Optional

import numpy as np

from normguard_jax.convert.safetensors_io import (ConversionError, Entry, apply_key_map, load_component)
from normguard_jax.models import vae as vae_lib

CLASS_NAMES = ("AutoencoderKL", "AutoencoderKLFlux2")
FLUX2 = "AutoencoderKLFlux2"
_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
           "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "use_post_quant_conv",
           "mid_block_add_attention")


def config_from_diffusers(config: dict, **overrides) -> vae_lib.VAEConfig:
  """Our config from a diffusers ``config.json``; ``_class_name`` picks AutoencoderKL (default) or Flux2."""
  defaults = {f.name: f.default for f in dataclasses.fields(vae_lib.VAEConfig)}
  flux2 = config.get("_class_name", "AutoencoderKL") == FLUX2
  problems = []
  n = len(config.get("block_out_channels", defaults["block_out_channels"]))
  n_dec = len(config.get("decoder_block_out_channels") or [None] * n) if flux2 else n
  for key, want, count in (("down_block_types", "DownEncoderBlock2D", n),
                           ("up_block_types", "UpDecoderBlock2D", n_dec)):
    types = config.get(key, [want] * count)
    if any(t != want for t in types) or len(types) != count:
      problems.append(f"unsupported {key} {types}: expected {count} x {want}")
  if config.get("act_fn", "silu") != "silu":
    problems.append(f"unsupported act_fn {config['act_fn']!r}")
  if flux2 and list(config.get("patch_size", [2, 2])) != [2, 2]:
    problems.append(f"unsupported patch_size {config['patch_size']}: Flux2Pipeline patchifies 2x2")
  if problems:
    raise ConversionError("config", problems)
  # diffusers' own defaults where config.json omits a field (our defaults are SD3's).
  fields = {k: config.get(k, defaults[k]) for k in _FIELDS}
  for k, v in (("use_quant_conv", True), ("use_post_quant_conv", True), ("shift_factor", None),
               ("scaling_factor", 0.18215)):
    fields[k] = config.get(k, v)
  if flux2:  # AutoencoderKLFlux2.__init__ defaults; it has no scaling / shift factor (the bn stats replace them)
    fields.update(latent_channels=config.get("latent_channels", 32), scaling_factor=1.0, shift_factor=None,
                  decoder_block_out_channels=config.get("decoder_block_out_channels"), latent_batch_norm=True,
                  batch_norm_eps=float(config.get("batch_norm_eps", 1e-4)))
  try:
    return vae_lib.VAEConfig(**fields, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError("config", [f"unsupported {FLUX2 if flux2 else 'AutoencoderKL'} config: {e}"]) from e


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

  rev = list(reversed(cfg.decoder_channels))
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
  if cfg.latent_batch_norm:
    entries += [Entry("bn.running_mean", ("bn", "running_mean")), Entry("bn.running_var", ("bn", "running_var")),
                Entry("bn.num_batches_tracked", layout="ignore", shape=(), dtypes=("I64",))]
  return entries


def convert_checkpoint(checkpoint, cfg: vae_lib.VAEConfig, *, source_dtype: Optional[str] = None,
                       param_dtype=np.float32):
  what = FLUX2 if cfg.latent_batch_norm else "AutoencoderKL"
  targets = vae_lib.param_shapes(cfg)["params"]
  params = apply_key_map(what, key_map(cfg), checkpoint, targets, source_dtype=source_dtype, param_dtype=param_dtype)
  if cfg.latent_batch_norm:
    var = np.asarray(params["bn"]["running_var"], np.float64)
    if np.any(var + cfg.batch_norm_eps <= 0):
      raise ConversionError(what, [f"bn.running_var: {int(np.sum(var + cfg.batch_norm_eps <= 0))} entries "
                                   f"<= -batch_norm_eps (sqrt(running_var + eps) undefined)"])
  return params


def load_vae(path, *, variant: Optional[str] = None, source_dtype: Optional[str] = None, param_dtype=np.float32,
             as_jax=True, **overrides):
  """(cfg, params) from a diffusers pipeline dir or its ``vae`` dir; strict like ``sd3.load_transformer``."""
  return load_component(path, "vae", CLASS_NAMES, config_from_diffusers, convert_checkpoint, variant=variant,
                        source_dtype=source_dtype, param_dtype=param_dtype, as_jax=as_jax, **overrides)
