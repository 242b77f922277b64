"""AutoencoderKL (diffusers ``autoencoder_kl.py`` / ``vae.py``) in pure JAX, NHWC.

Reference behaviour: ``Decoder`` = conv_in -> ``UNetMidBlock2D`` (resnet, single-head spatial self-attention
with GroupNorm and a residual, resnet) -> ``UpDecoderBlock2D`` x N (layers_per_block + 1 resnets, then a
nearest-2x upsample + 3x3 conv on all but the last) -> GroupNorm -> SiLU -> conv_out. ``ResnetBlock2D`` is
GroupNorm -> SiLU -> conv3x3, twice, with a 1x1 shortcut when the width changes. All GroupNorms use eps
1e-6. The encoder mirrors it (``DownEncoderBlock2D`` with an asymmetric (0, 1) pad before the stride-2
conv). SD3's VAE has no quant_conv / post_quant_conv (``use_quant_conv=False``).

``decode`` applies SD3's latent normalisation inverse: x = latents / scaling_factor + shift_factor.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from normguard_jax.models import attention as attention_lib

GN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Mirrors diffusers' ``AutoencoderKL`` config (defaults: SD3's VAE)."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 16
  norm_num_groups: int = 32
  scaling_factor: float = 1.5305
  shift_factor: Optional[float] = 0.0609
  use_quant_conv: bool = False
  use_post_quant_conv: bool = False
  mid_block_add_attention: bool = True
  attention_impl: str = "xla"
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}")

  @property
  def downsample_factor(self):
    return 2 ** (len(self.block_out_channels) - 1)


def _conv(features, kernel=3, name=None, dtype=jnp.float32):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _group_norm(cfg, name):
  return nn.GroupNorm(num_groups=cfg.norm_num_groups, epsilon=GN_EPS, use_fast_variance=False,
                      dtype=jnp.dtype(cfg.dtype), name=name)


class ResnetBlock(nn.Module):
  """``ResnetBlock2D`` (temb None, output_scale_factor 1)."""
  cfg: VAEConfig
  features: int

  @nn.compact
  def __call__(self, x):
    dtype = jnp.dtype(self.cfg.dtype)
    h = _conv(self.features, name="conv1", dtype=dtype)(nn.silu(_group_norm(self.cfg, "norm1")(x)))
    h = _conv(self.features, name="conv2", dtype=dtype)(nn.silu(_group_norm(self.cfg, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, name="conv_shortcut", dtype=dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Mid-block ``Attention`` (AttnProcessor2_0): one head of width C over H*W tokens, residual."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    dtype = jnp.dtype(self.cfg.dtype)
    h = _group_norm(self.cfg, "group_norm")(x).reshape(b, hgt * wid, c)
    q, k, v = (nn.Dense(c, dtype=dtype, name=n)(h).reshape(b, hgt * wid, 1, c) for n in ("to_q", "to_k", "to_v"))
    o = attention_lib.dot_product_attention(q, k, v, impl=self.cfg.attention_impl).reshape(b, hgt * wid, c)
    return x + nn.Dense(c, dtype=dtype, name="to_out")(o).reshape(x.shape)


class MidBlock(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(self.cfg, c, name="resnets_0")(x)
    if self.cfg.mid_block_add_attention:
      x = AttentionBlock(self.cfg, name="attentions_0")(x)
    return ResnetBlock(self.cfg, c, name="resnets_1")(x)


class Decoder(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    chans = list(reversed(cfg.block_out_channels))
    x = _conv(chans[0], name="conv_in", dtype=dtype)(z.astype(dtype))
    x = MidBlock(cfg, name="mid_block")(x)
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block + 1):
        x = ResnetBlock(cfg, c, name=f"up_blocks_{i}_resnets_{j}")(x)
      if i < len(chans) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # F.interpolate(scale_factor=2, mode="nearest")
        x = _conv(c, name=f"up_blocks_{i}_upsampler", dtype=dtype)(x)
    x = nn.silu(_group_norm(cfg, "conv_norm_out")(x))
    return _conv(cfg.out_channels, name="conv_out", dtype=dtype)(x)


class Encoder(nn.Module):
  """``Encoder(double_z=True)``: returns the (mean, logvar) moments, 2 * latent_channels wide."""
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    chans = cfg.block_out_channels
    x = _conv(chans[0], name="conv_in", dtype=dtype)(x.astype(dtype))
    for i, c in enumerate(chans):
      for j in range(cfg.layers_per_block):
        x = ResnetBlock(cfg, c, name=f"down_blocks_{i}_resnets_{j}")(x)
      if i < len(chans) - 1:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # Downsample2D(padding=0): F.pad (0, 1, 0, 1)
        x = nn.Conv(c, (3, 3), strides=(2, 2), padding="VALID", dtype=dtype, name=f"down_blocks_{i}_downsampler")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = nn.silu(_group_norm(cfg, "conv_norm_out")(x))
    return _conv(2 * cfg.latent_channels, name="conv_out", dtype=dtype)(x)


class AutoencoderKL(nn.Module):
  cfg: VAEConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, dtype=jnp.dtype(cfg.dtype))
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, dtype=jnp.dtype(cfg.dtype))

  def encode_moments(self, x):
    h = self.encoder(x)
    return self.quant_conv(h) if self.cfg.use_quant_conv else h

  def decode_raw(self, z):
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(jnp.dtype(self.cfg.dtype)))
    return self.decoder(z)

  def __call__(self, x):
    mean, _ = jnp.split(self.encode_moments(x), 2, axis=-1)
    return self.decode_raw(mean)


@functools.lru_cache(maxsize=None)
def _module(cfg: VAEConfig) -> AutoencoderKL:
  return AutoencoderKL(cfg)


def init(cfg: VAEConfig, key):
  size = 2 * cfg.downsample_factor
  return _module(cfg).init({"params": key}, jnp.zeros((1, size, size, cfg.in_channels), jnp.float32))


def param_shapes(cfg: VAEConfig):
  return jax.eval_shape(functools.partial(init, cfg), jax.random.PRNGKey(0))


def _shift(cfg):
  return 0.0 if cfg.shift_factor is None else cfg.shift_factor


def decode(params, latents, cfg: VAEConfig):
  """Model latents (B, h, w, latent_channels) -> pixels (B, 8h, 8w, 3) in about [-1, 1], float32.

  Undoes SD3's latent normalisation first: z = latents / scaling_factor + shift_factor.
  """
  z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + _shift(cfg)
  return _module(cfg).apply({"params": params}, z, method=AutoencoderKL.decode_raw).astype(jnp.float32)


def encode(params, pixels, cfg: VAEConfig, key=None):
  """Pixels (B, H, W, 3) in [-1, 1] -> model latents (latent - shift_factor) * scaling_factor.

  The posterior mean, or a sample from it when ``key`` is given (logvar clipped to [-30, 20] as diffusers).
  """
  moments = _module(cfg).apply({"params": params}, jnp.asarray(pixels), method=AutoencoderKL.encode_moments)
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  z = mean
  if key is not None:
    z = mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mean.shape)
  return (z - _shift(cfg)) * cfg.scaling_factor
