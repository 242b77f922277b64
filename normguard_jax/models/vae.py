"""AutoencoderKL (diffusers ``autoencoder_kl.py`` / ``vae.py``) in pure JAX, NHWC.

Reference behaviour: ``Decoder`` = conv_in -> ``UNetMidBlock2D`` (resnet, single-head spatial self-attention
with GroupNorm and a residual, resnet) -> ``UpDecoderBlock2D`` x N (layers_per_block + 1 resnets, then a
nearest-2x upsample + 3x3 conv on all but the last) -> GroupNorm -> SiLU -> conv_out. ``ResnetBlock2D`` is
GroupNorm -> SiLU -> conv3x3, twice, with a 1x1 shortcut when the width changes. All GroupNorms use eps
1e-6. The encoder mirrors it (``DownEncoderBlock2D`` with an asymmetric (0, 1) pad before the stride-2
conv). SD3's VAE has no quant_conv / post_quant_conv (``use_quant_conv=False``).

``decode`` applies SD3's latent normalisation inverse: x = latents / scaling_factor + shift_factor.

FLUX.2 (diffusers ``AutoencoderKLFlux2``, ``latent_batch_norm=True``): the same encoder / decoder blocks with
32 latent channels, quant / post-quant 1x1 convs, optional separate ``decoder_block_out_channels``, and an
affine-free ``BatchNorm2d(4 * latent_channels, eps=batch_norm_eps)`` whose running stats (params ``bn``:
``running_mean`` / ``running_var``) normalise the 2x2-patchified latents. ``Flux2Pipeline`` decodes with
``_unpatchify_latents(z * sqrt(running_var + eps) + running_mean)`` and encodes with the inverse
(``_encode_vae_image``); :func:`decode_flux2` / :func:`encode_flux2` do that on the NHWC latents our FLUX.2
transformer (models/flux.py) takes and returns (in_channels // 4 channels at 1/8 pixel resolution; the
patchified channel order is (c, p, q), as ``Flux2Pipeline._patchify_latents``).
"""

import dataclasses
import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from normguard_jax.models import attention as attention_lib

GN_EPS = 1e-6
PATCH = 2  # Flux2Pipeline._patchify_latents: 2x2, hard-coded there


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
  decoder_block_out_channels: Optional[Tuple[int, ...]] = None  # AutoencoderKLFlux2; None = block_out_channels
  latent_batch_norm: bool = False  # AutoencoderKLFlux2's ``bn`` over 2x2-patchified latents
  batch_norm_eps: float = 1e-4
  attention_impl: str = "xla"
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if self.decoder_block_out_channels is not None:
      object.__setattr__(self, "decoder_block_out_channels", tuple(int(c) for c in self.decoder_block_out_channels))
    bad = [c for c in self.block_out_channels + self.decoder_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}")

  @property
  def decoder_channels(self) -> Tuple[int, ...]:
    """diffusers: ``Decoder(block_out_channels=decoder_block_out_channels or block_out_channels)``."""
    return self.decoder_block_out_channels or self.block_out_channels

  @property
  def downsample_factor(self):
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def upsample_factor(self):
    return 2 ** (len(self.decoder_channels) - 1)


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
    chans = list(reversed(cfg.decoder_channels))
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


class LatentBatchNormStats(nn.Module):
  """The running stats of ``AutoencoderKLFlux2.bn`` (affine=False, so nothing else); constants, never trained.

  Initialised as torch's BatchNorm2d: mean 0, var 1. Returned as float32 (C * 4,) vectors in (c, p, q) order.
  """
  features: int

  @nn.compact
  def __call__(self):
    mean = self.param("running_mean", nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param("running_var", nn.initializers.ones, (self.features,), jnp.float32)
    return mean, var


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
    if cfg.latent_batch_norm:
      self.bn = LatentBatchNormStats(PATCH * PATCH * cfg.latent_channels)

  def latent_stats(self):
    return self.bn()

  def encode_moments(self, x):
    h = self.encoder(x)
    return self.quant_conv(h) if self.cfg.use_quant_conv else h

  def decode_raw(self, z):
    if self.cfg.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(jnp.dtype(self.cfg.dtype)))
    return self.decoder(z)

  def __call__(self, x):
    if self.cfg.latent_batch_norm:
      self.latent_stats()  # creates params["bn"] at init
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


def _sd3_only(cfg, fn):
  if cfg.latent_batch_norm:
    raise ValueError(f"{fn}: this is an AutoencoderKLFlux2 config (latent_batch_norm); use {fn}_flux2")


def decode(params, latents, cfg: VAEConfig):
  """Model latents (B, h, w, latent_channels) -> pixels (B, 8h, 8w, 3) in about [-1, 1], float32.

  Undoes SD3's latent normalisation first: z = latents / scaling_factor + shift_factor.
  """
  _sd3_only(cfg, "decode")
  z = jnp.asarray(latents, jnp.float32) / cfg.scaling_factor + _shift(cfg)
  return _module(cfg).apply({"params": params}, z, method=AutoencoderKL.decode_raw).astype(jnp.float32)


def encode(params, pixels, cfg: VAEConfig, key=None):
  """Pixels (B, H, W, 3) in [-1, 1] -> model latents (latent - shift_factor) * scaling_factor.

  The posterior mean, or a sample from it when ``key`` is given (logvar clipped to [-30, 20] as diffusers).
  """
  _sd3_only(cfg, "encode")
  return (_posterior(params, pixels, cfg, key) - _shift(cfg)) * cfg.scaling_factor


def _posterior(params, pixels, cfg, key):
  moments = _module(cfg).apply({"params": params}, jnp.asarray(pixels), method=AutoencoderKL.encode_moments)
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  if key is None:
    return mean
  return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jax.random.normal(key, mean.shape)


# ----------------------------------------------------------------------------------------------- FLUX.2

def patchify(x):
  """NHWC (B, H, W, C) -> (B, H/2, W/2, 4C), channel order (c, p, q) as ``Flux2Pipeline._patchify_latents``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // PATCH, w // PATCH, c * PATCH * PATCH)


def unpatchify(x):
  """Inverse of :func:`patchify` (``Flux2Pipeline._unpatchify_latents``): (B, h, w, 4C) -> (B, 2h, 2w, C)."""
  b, h, w, c4 = x.shape
  c = c4 // (PATCH * PATCH)
  x = x.reshape(b, h, w, c, PATCH, PATCH).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * PATCH, w * PATCH, c)


def _bn_stats(params, cfg):
  if not cfg.latent_batch_norm:
    raise ValueError("decode_flux2 / encode_flux2 need an AutoencoderKLFlux2 config (latent_batch_norm=True)")
  mean = jnp.asarray(params["bn"]["running_mean"], jnp.float32)
  std = jnp.sqrt(jnp.asarray(params["bn"]["running_var"], jnp.float32) + cfg.batch_norm_eps)
  return mean, std


def decode_flux2(params, latents, cfg: VAEConfig):
  """FLUX.2 transformer latents (B, h, w, latent_channels), NHWC as models/flux.py -> pixels (B, 8h, 8w, 3).

  As ``Flux2Pipeline.__call__`` after sampling: patchify 2x2 to the 128-channel space the transformer saw,
  z * sqrt(running_var + batch_norm_eps) + running_mean, unpatchify, ``vae.decode`` (post_quant_conv,
  decoder). Pixels in about [-1, 1] (before the image processor's clamp / rescale), float32.
  """
  mean, std = _bn_stats(params, cfg)
  lat = jnp.asarray(latents, jnp.float32)
  if lat.shape[-1] != cfg.latent_channels or lat.shape[1] % PATCH or lat.shape[2] % PATCH:
    raise ValueError(f"latents {lat.shape}: expected (B, even h, even w, {cfg.latent_channels})")
  z = unpatchify(patchify(lat) * std + mean)
  return _module(cfg).apply({"params": params}, z, method=AutoencoderKL.decode_raw).astype(jnp.float32)


def encode_flux2(params, pixels, cfg: VAEConfig, key=None):
  """Pixels (B, H, W, 3) in [-1, 1] -> FLUX.2 transformer latents (B, H/8, W/8, latent_channels), NHWC.

  As ``Flux2Pipeline._encode_vae_image``: posterior mean (``sample_mode="argmax"``; a sample when ``key``),
  patchify, (z - running_mean) / sqrt(running_var + batch_norm_eps), then unpatchified to our NHWC layout.
  """
  mean, std = _bn_stats(params, cfg)
  z = _posterior(params, pixels, cfg, key)
  return unpatchify((patchify(z) - mean) / std)
