"""FLUX.1 and FLUX.2 (klein / dev) transformers: pure-JAX ports of diffusers' ``FluxTransformer2DModel`` and
``Flux2Transformer2DModel``, with the mmdit velocity contract (DESIGN.md §1, §3).

``velocity(variables, x_t, t, cond, *, cfg, lora_gate=None)`` takes NHWC latents with ``in_channels // 4``
channels. The 2x2 packing of the pipelines (channel order (c, p, q), as ``FluxPipeline._pack_latents`` and
``Flux2Pipeline._patchify_latents`` + ``_pack_latents`` both give) and the position ids happen inside, from
the latent shape; the output is unpacked back to NHWC float32. ``t`` in [0, 1]: the pipelines pass
``timestep / 1000`` and the models multiply by 1000, so the sinusoid sees 1000 t; a guidance scale ``g`` is
likewise embedded at 1000 g.

``cond``:
  * FLUX.1: ``prompt_embeds`` (B, L, joint_attention_dim), ``pooled`` (B, pooled_projection_dim), plus
    ``guidance`` (B,) (the guidance scale, e.g. 3.5) when ``guidance_embeds`` (FLUX.1-dev); ignored otherwise.
  * FLUX.2: ``prompt_embeds`` (B, L, joint_attention_dim) (no pooled vector), plus ``guidance`` (B,) when
    ``guidance_embeds`` (FLUX.2-dev); klein (``guidance_embeds=False``) ignores it, as diffusers does.

Reference behaviour (diffusers 0.42 ``transformer_flux.py``, ``transformer_flux2.py``, ``embeddings.py``):
  * Position ids. FLUX.1: text (0, 0, 0), image (0, row, col) on the packed grid. FLUX.2: text
    (0, 0, 0, l) with l = 0..L-1, image (0, row, col, 0). Tokens are ordered [text; image] everywhere.
  * RoPE (``FluxPosEmbed`` / ``Flux2PosEmbed`` -> ``get_1d_rotary_pos_embed(use_real, repeat_interleave_real)``):
    per axis i, angles pos_i * theta^(-2k / d_i) in float64, cos / sin each repeated twice (interleaved),
    cast to float32, axes concatenated. Applied to (real, imag) = (even, odd) lanes of q and k, after the
    q/k RMSNorm, in float32. theta = 10000 (FLUX.1) or ``rope_theta`` (FLUX.2, 2000).
  * FLUX.1 double block (``FluxTransformerBlock``): adaLN-zero (6 chunks, LayerNorm eps 1e-6) on both
    streams, joint attention with per-head RMSNorm on q/k (eps 1e-6), tanh-GELU 4x MLPs. Single block
    (``FluxSingleTransformerBlock``): adaLN-zero-single (shift, scale, gate); attention (q/k/v, no out
    projection) and a tanh-GELU MLP in parallel, ``proj_out`` over [attn; mlp], gated residual.
    temb = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled).
  * FLUX.2 (``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``): no biases anywhere; the
    modulations are shared by all blocks of a kind (``double_stream_modulation_img`` / ``_txt`` with 2 sets
    of (shift, scale, gate), ``single_stream_modulation`` with 1), computed once from temb; SwiGLU MLPs
    (``linear_in`` -> silu(first half) * second half -> ``linear_out``, hidden mlp_ratio * dim); the single
    block fuses q/k/v and the MLP input into ``to_qkv_mlp_proj`` and attention + MLP outputs into ``to_out``.
    temb = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))], sinusoid width ``timestep_guidance_channels``.
  * ``norm_out`` (AdaLayerNormContinuous, chunks (scale, shift)) and ``proj_out``.

Block layout: double blocks then single blocks. With ``scan_layers`` a run of >= 2 blocks runs under
``nn.scan`` with stacked params (``double_blocks`` / ``single_blocks``); otherwise each block is its own
module (``double_{i}`` / ``single_{i}``). :func:`block_layout` is the one source of this layout.

LoRA adapters (models/lora.py, per-row gate; gate 0 = base model exactly) sit on the Linears that ``lora_targets``
names as PEFT ``target_modules`` do: suffixes of diffusers module paths (models/lora.py, "targets"). LoRA-able sites
(``FLUX1_LORA_SITES`` / ``FLUX2_LORA_SITES``): double blocks ``attn.{to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,
add_v_proj,to_add_out}`` and the MLPs (FLUX.1 ``ff[_context].net.0.proj`` / ``.net.2``, FLUX.2
``ff[_context].linear_in`` / ``.linear_out``); single blocks FLUX.1 ``attn.to_q/k/v``, FLUX.2 ``attn.to_qkv_mlp_proj``
and the plain Linear ``attn.to_out`` (not matched by "attn.to_out.0"). ``LORA_PRESETS[family]``: "reference",
Flow-Factory's default targets (``models/flux/flux1.py``:77-84, ``flux2_klein.py``:92-104), and "all_attention", our
earlier default (every attention projection, FLUX.2's single-block ``to_out`` included; no MLP).
"""

import dataclasses
import functools
import math
from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.models import attention as attention_lib
from normguard_jax.models import lora as lora_lib
from normguard_jax.models import mmdit
from normguard_jax.models.lora import LoRADense

_JOINT = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out")
_FF = {"flux": ("fc1", "fc2"), "flux2": ("linear_in", "linear_out")}  # our MLP Linears per family
_SINGLE = {"flux": ("to_q", "to_k", "to_v"), "flux2": ("to_qkv_mlp_proj", "to_out")}  # single-block attn Linears
_FF_LEAF = {"fc1": "net.0.proj", "fc2": "net.2"}  # mmdit.FeedForward's Linears in diffusers' FeedForward


def site_name(kind, module, name):
  """Diffusers path inside a ``kind`` block of our Linear ``name`` in ``module`` (attn, ff, ff_context). The single
  FLUX.2 block's ``to_out`` is a plain Linear; the double blocks' is ``to_out.0``."""
  if name == "to_out":
    return f"{module}.to_out.0" if kind == "double" else f"{module}.to_out"
  return f"{module}.{_FF_LEAF.get(name, name)}"


def block_lora_sites(family, kind):
  """[(diffusers path inside the block, our path inside DoubleBlock / SingleBlock)] of its LoRA-able Linears."""
  if kind == "single":
    return [(site_name(kind, "attn", n), ("attn", n)) for n in _SINGLE[family]]
  out = [(site_name(kind, "attn", n), ("attn", n)) for n in _JOINT]
  return out + [(site_name(kind, ff, n), (ff, n)) for ff in ("ff", "ff_context") for n in _FF[family]]


def _sites(family):
  return tuple(s for kind in ("double", "single") for s, _ in block_lora_sites(family, kind))


_OTHER_COMMON = ("x_embedder", "context_embedder", "norm_out.linear", "proj_out")
_OTHER_MODULES = {  # the transformers' other Linears (suffixes that would also match these are not targets)
    "flux": _OTHER_COMMON + ("norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp") + tuple(
        f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder", "text_embedder")
        for i in (1, 2)),
    "flux2": _OTHER_COMMON + ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                              "single_stream_modulation.linear") + tuple(
        f"time_guidance_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder") for i in (1, 2)),
}
FLUX1_LORA_SITES, FLUX2_LORA_SITES = _sites("flux"), _sites("flux2")
FLUX1_LORA_TARGETS = lora_lib.target_vocabulary(FLUX1_LORA_SITES, _OTHER_MODULES["flux"])  # accepted entries
FLUX2_LORA_TARGETS = lora_lib.target_vocabulary(FLUX2_LORA_SITES, _OTHER_MODULES["flux2"])
LORA_TARGETS = tuple(sorted(set(FLUX1_LORA_TARGETS) | set(FLUX2_LORA_TARGETS)))  # every entry either family accepts
_FF_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out")
_ALL_ATTENTION = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX1_LORA_PRESETS = {
    # Flow-Factory models/flux/flux1.py:77-84 (default_target_modules): attention + double-block MLPs
    "reference": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2"),
    "all_attention": _ALL_ATTENTION,  # our earlier default
}
FLUX2_LORA_PRESETS = {
    # Flow-Factory models/flux/flux2_klein.py:92-104 (its second "attn.to_out.0" dropped: it matches no
    # single-block module, whose to_out is a plain Linear)
    "reference": _FF_ATTN + ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                             "attn.to_qkv_mlp_proj"),
    "all_attention": _ALL_ATTENTION + ("to_qkv_mlp_proj",),  # our earlier default (single-block to_out included)
}
LORA_PRESETS = {"flux": FLUX1_LORA_PRESETS, "flux2": FLUX2_LORA_PRESETS}  # by config ``family``
FLUX1_THETA = 10000
PACK = 2  # the pipelines' 2x2 latent packing


def _check_common(cfg, n_axes_ok, targets_ok, family):
  lora_lib.check_targets(cfg.lora_targets, targets_ok, LORA_PRESETS[cfg.family], family)
  if cfg.patch_size != 1:
    raise ValueError(f"{family}: patch_size {cfg.patch_size} unsupported (the pipelines pack 2x2 outside; "
                     f"the transformer has patch_size 1)")
  for name in ("in_channels", "out_channels"):
    if getattr(cfg, name) % (PACK * PACK):
      raise ValueError(f"{family}: {name} {getattr(cfg, name)} must be divisible by 4 (2x2 packed latents)")
  if not n_axes_ok(len(cfg.axes_dims_rope)) or any(d % 2 for d in cfg.axes_dims_rope):
    raise ValueError(f"{family}: bad axes_dims_rope {cfg.axes_dims_rope}")
  if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
    raise ValueError(f"{family}: sum(axes_dims_rope) = {sum(cfg.axes_dims_rope)} must equal attention_head_dim "
                     f"{cfg.attention_head_dim}")
  if cfg.attention_impl not in attention_lib.IMPLEMENTATIONS:
    raise ValueError(f"unknown attention_impl {cfg.attention_impl!r}")


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """Mirrors diffusers' ``FluxTransformer2DModel`` config (FLUX.1), plus our runtime switches."""
  patch_size: int = 1
  in_channels: int = 64
  out_channels: Optional[int] = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: Tuple[int, ...] = (16, 56, 56)
  # runtime
  scan_layers: bool = True
  remat: bool = False
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: Tuple[str, ...] = FLUX1_LORA_PRESETS["all_attention"]
  attention_impl: str = "xla"
  dtype: str = "float32"

  family = "flux"
  class_name = "FluxTransformer2DModel"

  def __post_init__(self):
    object.__setattr__(self, "out_channels", int(self.out_channels or self.in_channels))
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "guidance_embeds", bool(self.guidance_embeds))
    _check_common(self, lambda n: n == 3, FLUX1_LORA_TARGETS, "FLUX.1")

  @property
  def inner_dim(self):
    return self.num_attention_heads * self.attention_head_dim

  @property
  def latent_channels(self):
    return self.in_channels // (PACK * PACK)

  @property
  def rope_theta(self):
    return FLUX1_THETA

  def lora_rank_for(self, site):
    """The LoRA rank of the Linear at ``site`` (its diffusers path inside a block, e.g. ``ff.net.2``)."""
    return self.lora_rank if lora_lib.target_matches(self.lora_targets, site) else 0


@dataclasses.dataclass(frozen=True)
class Flux2Config:
  """Mirrors diffusers' ``Flux2Transformer2DModel`` config (FLUX.2 dev / klein), plus our runtime switches."""
  patch_size: int = 1
  in_channels: int = 128
  out_channels: Optional[int] = None
  num_layers: int = 8
  num_single_layers: int = 48
  attention_head_dim: int = 128
  num_attention_heads: int = 48
  joint_attention_dim: int = 15360
  timestep_guidance_channels: int = 256
  mlp_ratio: float = 3.0
  axes_dims_rope: Tuple[int, ...] = (32, 32, 32, 32)
  rope_theta: int = 2000
  eps: float = 1e-6
  guidance_embeds: bool = True
  # runtime
  scan_layers: bool = True
  remat: bool = False
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: Tuple[str, ...] = FLUX2_LORA_PRESETS["all_attention"]
  attention_impl: str = "xla"
  dtype: str = "float32"

  family = "flux2"
  class_name = "Flux2Transformer2DModel"

  def __post_init__(self):
    object.__setattr__(self, "out_channels", int(self.out_channels or self.in_channels))
    object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "guidance_embeds", bool(self.guidance_embeds))
    # diffusers loops over len(axes_dims_rope) columns of the 4-column ids (t, h, w, l)
    _check_common(self, lambda n: 1 <= n <= 4, FLUX2_LORA_TARGETS, "FLUX.2")

  @property
  def inner_dim(self):
    return self.num_attention_heads * self.attention_head_dim

  @property
  def latent_channels(self):
    return self.in_channels // (PACK * PACK)

  @property
  def mlp_hidden_dim(self):
    return int(self.inner_dim * self.mlp_ratio)

  def lora_rank_for(self, site):
    """The LoRA rank of the Linear at ``site`` (its diffusers path inside a block, e.g. ``ff.net.2``)."""
    return self.lora_rank if lora_lib.target_matches(self.lora_targets, site) else 0


AnyFluxConfig = Union[FluxConfig, Flux2Config]


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """A run of blocks [start, stop) of one kind ('double' or 'single'); ``scanned`` groups have stacked params."""
  name: str
  kind: str
  start: int
  stop: int
  scanned: bool


def block_layout(cfg: AnyFluxConfig) -> Tuple[BlockGroup, ...]:
  groups = []
  for kind, n in (("double", cfg.num_layers), ("single", cfg.num_single_layers)):
    if cfg.scan_layers and n >= 2:
      groups.append(BlockGroup(f"{kind}_blocks", kind, 0, n, True))
    else:
      groups.extend(BlockGroup(f"{kind}_{i}", kind, i, i + 1, False) for i in range(n))
  return tuple(groups)


# ----------------------------------------------------------------------------------------------- positions

def _position_ids(flux2, text_len, grid_h, grid_w) -> np.ndarray:
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  rows, cols = rows.reshape(-1), cols.reshape(-1)
  zeros = np.zeros_like(rows)
  if flux2:  # Flux2Pipeline._prepare_text_ids / _prepare_latent_ids: (t, h, w, l)
    txt = np.zeros((text_len, 4))
    txt[:, 3] = np.arange(text_len)
    img = np.stack([zeros, rows, cols, zeros], axis=-1)
  else:  # FluxPipeline: text ids all zero, _prepare_latent_image_ids (0, row, col)
    txt = np.zeros((text_len, 3))
    img = np.stack([zeros, rows, cols], axis=-1)
  return np.concatenate([txt, img], axis=0).astype(np.float32)


def position_ids(cfg: AnyFluxConfig, text_len, grid_h, grid_w) -> np.ndarray:
  """[text ids; image ids] as the pipelines build them, (text_len + grid_h * grid_w, 3 or 4) float32."""
  return _position_ids(isinstance(cfg, Flux2Config), text_len, grid_h, grid_w)


@functools.lru_cache(maxsize=64)
def _rope_tables(axes_dims, theta, flux2, text_len, grid_h, grid_w):
  ids = _position_ids(flux2, text_len, grid_h, grid_w).astype(np.float64)
  cos, sin = [], []
  for i, d in enumerate(axes_dims):
    freqs = 1.0 / (float(theta) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.outer(ids[:, i], freqs)
    cos.append(np.repeat(np.cos(angles), 2, axis=1).astype(np.float32))
    sin.append(np.repeat(np.sin(angles), 2, axis=1).astype(np.float32))
  cos, sin = np.concatenate(cos, axis=1), np.concatenate(sin, axis=1)
  cos.setflags(write=False)
  sin.setflags(write=False)
  return cos, sin


def rope_tables(cfg: AnyFluxConfig, text_len, grid_h, grid_w):
  """(cos, sin), each (text_len + grid_h * grid_w, attention_head_dim) float32: diffusers' ``FluxPosEmbed``
  / ``Flux2PosEmbed`` of the pipeline ids (float64 angles, interleaved repeat, cast to float32)."""
  return _rope_tables(cfg.axes_dims_rope, cfg.rope_theta, isinstance(cfg, Flux2Config), int(text_len),
                      int(grid_h), int(grid_w))


def apply_rope(x, cos, sin):
  """``apply_rotary_emb(use_real_unbind_dim=-1)`` on (B, S, H, Dh): pairs (even, odd) = (real, imag), in float32."""
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- timesteps

@functools.lru_cache(maxsize=None)
def _timestep_freqs(dim, max_period):
  half = dim // 2
  exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  freqs.setflags(write=False)
  return freqs


def timestep_freqs(dim=256, max_period=10000):
  """diffusers' float32 frequency table exp(-log(P) * k / (dim / 2)) as a constant, correctly rounded.

  diffusers forms the exponent in float32 and calls torch's float32 ``exp`` (within 1 ulp); we round the
  exact exp of the same float32 exponent once. That agrees with torch's table on all but 2 of 128 entries
  (each 1 ulp) at dim 256, where XLA's float32 ``exp`` (mmdit.timestep_freqs) differs on 17. At 1000-step
  timesteps and guidance 1000 g, one ulp of a frequency moves the sinusoid by up to ~1e-4.
  """
  return jnp.asarray(_timestep_freqs(int(dim), max_period))


def timestep_proj(timesteps, dim=256, max_period=10000):
  """``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)``: [cos, sin] of steps x freqs."""
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * timestep_freqs(dim, max_period)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------- packing

def pack(x):
  """(B, H, W, C) -> (B, H/2 * W/2, 4C) tokens, channel order (c, p, q) as diffusers' FLUX pipelines."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // PACK, PACK, w // PACK, PACK, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens, h, w):
  """Inverse of :func:`pack`: (B, H/2 * W/2, 4C) -> (B, H, W, C)."""
  b, _, d = tokens.shape
  c = d // (PACK * PACK)
  x = tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h, w, c)


# ----------------------------------------------------------------------------------------------- layers

class MLPEmbedder(nn.Module):
  """``TimestepEmbedding`` / ``PixArtAlphaTextProjection(act_fn='silu')``: linear_2(silu(linear_1(x)))."""
  features: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, name="linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
  """FLUX.1 ``CombinedTimestep[Guidance]TextProjEmbeddings``: MLP(sin(1000 t)) [+ MLP(sin(1000 g))] + MLP(pooled)."""
  cfg: FluxConfig

  @nn.compact
  def __call__(self, t, guidance, pooled):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    emb = MLPEmbedder(cfg.inner_dim, dtype=dtype, name="timestep_embedder")(
        timestep_proj(t * 1000.0, 256).astype(dtype))
    if cfg.guidance_embeds:
      emb = emb + MLPEmbedder(cfg.inner_dim, dtype=dtype, name="guidance_embedder")(
          timestep_proj(guidance * 1000.0, 256).astype(dtype))
    return emb + MLPEmbedder(cfg.inner_dim, dtype=dtype, name="text_embedder")(pooled.astype(dtype))


class TimeGuidanceEmbed(nn.Module):
  """FLUX.2 ``Flux2TimestepGuidanceEmbeddings``: MLP(sin(1000 t)) [+ MLP(sin(1000 g))], no biases."""
  cfg: Flux2Config

  @nn.compact
  def __call__(self, t, guidance):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    ch = cfg.timestep_guidance_channels
    emb = MLPEmbedder(cfg.inner_dim, False, dtype, name="timestep_embedder")(
        timestep_proj(t * 1000.0, ch).astype(dtype))
    if cfg.guidance_embeds:
      emb = emb + MLPEmbedder(cfg.inner_dim, False, dtype, name="guidance_embedder")(
          timestep_proj(guidance * 1000.0, ch).astype(dtype))
    return emb


def _use_bias(cfg):
  return isinstance(cfg, FluxConfig)  # FLUX.2 has no biases at all


def _eps(cfg):
  return cfg.eps if isinstance(cfg, Flux2Config) else mmdit.LN_EPS


def _lora_dense(cfg, kind, module, name, features, **kwargs):
  """Our Linear ``name`` in ``module`` of a ``kind`` block, adapted when ``lora_targets`` names its site."""
  return LoRADense(features, lora_rank=cfg.lora_rank_for(site_name(kind, module, name)),
                   lora_alpha=cfg.lora_alpha, use_bias=_use_bias(cfg), name=name, **kwargs)


def lora_modules(cfg: AnyFluxConfig):
  """[(diffusers module path, our path in the ``lora`` tree, index in the scanned stack or None)] of every adapted
  Linear, double blocks then single blocks: what PEFT's ``target_modules`` would select on the diffusers model."""
  out = []
  for g in block_layout(cfg):
    prefix = "transformer_blocks" if g.kind == "double" else "single_transformer_blocks"
    for site, path in block_lora_sites(cfg.family, g.kind):
      if cfg.lora_rank_for(site):
        out += [(f"{prefix}.{i}.{site}", (g.name,) + path, i - g.start if g.scanned else None)
                for i in range(g.start, g.stop)]
  return out


def _heads(cfg, x):
  return x.reshape(x.shape[:2] + (cfg.num_attention_heads, cfg.attention_head_dim))


def _attend(cfg, q, k, v, rope):
  """RoPE on q, k then the one attention dispatcher; (B, S, H, Dh) -> (B, S, H * Dh)."""
  cos, sin = rope
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  o = attention_lib.dot_product_attention(q, k, v, impl=cfg.attention_impl)
  return o.reshape(o.shape[:2] + (cfg.inner_dim,))


class JointAttention(nn.Module):
  """``FluxAttention`` / ``Flux2Attention`` with added (text) projections: joint attention over [ctx; x].

  Returns (x_out, ctx_out) after ``to_out`` / ``to_add_out``.
  """
  cfg: AnyFluxConfig

  @nn.compact
  def __call__(self, x, ctx, rope, lora_gate):
    cfg, d, eps = self.cfg, self.cfg.inner_dim, _eps(self.cfg)

    def proj(target, inp):
      return _heads(cfg, _lora_dense(cfg, "double", self.name, target, d)(inp, lora_gate))

    q = mmdit.RMSNorm(eps, name="norm_q")(proj("to_q", x))
    k = mmdit.RMSNorm(eps, name="norm_k")(proj("to_k", x))
    v = proj("to_v", x)
    cq = mmdit.RMSNorm(eps, name="norm_added_q")(proj("add_q_proj", ctx))
    ck = mmdit.RMSNorm(eps, name="norm_added_k")(proj("add_k_proj", ctx))
    cv = proj("add_v_proj", ctx)
    q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    o = _attend(cfg, q, k, v, rope).astype(x.dtype)
    m = ctx.shape[1]
    return (_lora_dense(cfg, "double", self.name, "to_out", d)(o[:, m:], lora_gate),
            _lora_dense(cfg, "double", self.name, "to_add_out", d)(o[:, :m], lora_gate))


class SwiGLUFeedForward(nn.Module):
  """``Flux2FeedForward``: linear_out(silu(a) * b) with [a; b] = linear_in(x), no biases; LoRA on
  ``ff[_context].linear_in`` / ``.linear_out`` when ``cfg.lora_targets`` names them."""
  cfg: Flux2Config

  @nn.compact
  def __call__(self, x, lora_gate):
    cfg, hidden = self.cfg, self.cfg.mlp_hidden_dim
    dense = lambda name, features: _lora_dense(cfg, "double", self.name, name, features,
                                               kernel_init=nn.initializers.lecun_normal())  # nn.Dense's init
    h = dense("linear_in", 2 * hidden)(x.astype(jnp.dtype(cfg.dtype)), lora_gate)
    return dense("linear_out", cfg.inner_dim)(nn.silu(h[..., :hidden]) * h[..., hidden:], lora_gate)


def _split_mod(mod, n):
  return jnp.split(mod, n, axis=-1)


class DoubleBlock(nn.Module):
  """``FluxTransformerBlock`` / ``Flux2TransformerBlock``: carry (x, ctx) -> (x, ctx), returns (carry, None).

  ``mod`` is temb for FLUX.1 (each block has its own adaLN-zero linears) or the pair of shared FLUX.2
  modulations (img, txt), each (B, 6 D).
  """
  cfg: AnyFluxConfig

  @nn.compact
  def __call__(self, carry, mod, rope, lora_gate):
    cfg = self.cfg
    d, dtype, eps = cfg.inner_dim, jnp.dtype(cfg.dtype), _eps(cfg)
    x, ctx = carry
    if isinstance(cfg, FluxConfig):
      emb = nn.silu(mod)
      img_mod = _split_mod(nn.Dense(6 * d, dtype=dtype, name="norm1")(emb), 6)
      txt_mod = _split_mod(nn.Dense(6 * d, dtype=dtype, name="norm1_context")(emb), 6)
    else:
      img_mod, txt_mod = _split_mod(mod[0], 6), _split_mod(mod[1], 6)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = img_mod
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = txt_mod

    attn_out, c_attn_out = JointAttention(cfg, name="attn")(
        mmdit.modulate(mmdit.layer_norm(x, eps), shift_msa, scale_msa),
        mmdit.modulate(mmdit.layer_norm(ctx, eps), c_shift_msa, c_scale_msa), rope, lora_gate)

    if isinstance(cfg, FluxConfig):
      ff, ff_ctx = mmdit.FeedForward(cfg, name="ff"), mmdit.FeedForward(cfg, name="ff_context")
    else:
      ff, ff_ctx = SwiGLUFeedForward(cfg, name="ff"), SwiGLUFeedForward(cfg, name="ff_context")
    x = x + gate_msa[:, None] * attn_out
    x = x + gate_mlp[:, None] * ff(mmdit.modulate(mmdit.layer_norm(x, eps), shift_mlp, scale_mlp), lora_gate)
    ctx = ctx + c_gate_msa[:, None] * c_attn_out
    ctx = ctx + c_gate_mlp[:, None] * ff_ctx(
        mmdit.modulate(mmdit.layer_norm(ctx, eps), c_shift_mlp, c_scale_mlp), lora_gate)
    return (x, ctx), None


class SingleBlock(nn.Module):
  """``FluxSingleTransformerBlock`` / ``Flux2SingleTransformerBlock`` on the joint sequence [ctx; x].

  Carry h -> h, returns (h, None). ``mod``: temb (FLUX.1) or the shared FLUX.2 modulation (B, 3 D).
  """
  cfg: AnyFluxConfig

  @nn.compact
  def __call__(self, h, mod, rope, lora_gate):
    cfg = self.cfg
    d, dtype, eps = cfg.inner_dim, jnp.dtype(cfg.dtype), _eps(cfg)
    if isinstance(cfg, FluxConfig):
      mod = nn.Dense(3 * d, dtype=dtype, name="norm")(nn.silu(mod))
    shift, scale, gate = _split_mod(mod, 3)
    nh = mmdit.modulate(mmdit.layer_norm(h, eps), shift, scale)

    if isinstance(cfg, FluxConfig):
      mlp = nn.gelu(nn.Dense(int(d * 4.0), dtype=dtype, name="proj_mlp")(nh), approximate=True)
      o = SelfAttention(cfg, name="attn")(nh, rope, lora_gate)
      out = nn.Dense(d, dtype=dtype, name="proj_out")(jnp.concatenate([o, mlp], axis=-1))
    else:
      out = SingleParallelAttention(cfg, name="attn")(nh, rope, lora_gate)
    return h + gate[:, None] * out, None


class SelfAttention(nn.Module):
  """FLUX.1 single-block ``FluxAttention(pre_only=True)``: q/k/v (+ RMSNorm, RoPE), no output projection."""
  cfg: FluxConfig

  @nn.compact
  def __call__(self, x, rope, lora_gate):
    cfg, d = self.cfg, self.cfg.inner_dim
    q, k, v = (_heads(cfg, _lora_dense(cfg, "single", self.name, t, d)(x, lora_gate)) for t in ("to_q", "to_k", "to_v"))
    q = mmdit.RMSNorm(mmdit.LN_EPS, name="norm_q")(q)
    k = mmdit.RMSNorm(mmdit.LN_EPS, name="norm_k")(k)
    return _attend(cfg, q, k, v, rope).astype(x.dtype)


class SingleParallelAttention(nn.Module):
  """FLUX.2 ``Flux2ParallelSelfAttention``: to_qkv_mlp_proj -> (attention, SwiGLU) -> to_out([attn; mlp])."""
  cfg: Flux2Config

  @nn.compact
  def __call__(self, x, rope, lora_gate):
    cfg, d, m = self.cfg, self.cfg.inner_dim, self.cfg.mlp_hidden_dim
    fused = _lora_dense(cfg, "single", self.name, "to_qkv_mlp_proj", 3 * d + 2 * m)(x, lora_gate)
    q, k, v = (_heads(cfg, fused[..., i * d:(i + 1) * d]) for i in range(3))
    q = mmdit.RMSNorm(cfg.eps, name="norm_q")(q)
    k = mmdit.RMSNorm(cfg.eps, name="norm_k")(k)
    o = _attend(cfg, q, k, v, rope).astype(x.dtype)
    mlp = fused[..., 3 * d:]
    mlp = nn.silu(mlp[..., :m]) * mlp[..., m:]
    return _lora_dense(cfg, "single", self.name, "to_out", d)(jnp.concatenate([o, mlp], axis=-1), lora_gate)


def _run_groups(cfg, kind, block_cls, carry, mod, rope, lora_gate):
  if cfg.remat:
    block_cls = nn.remat(block_cls)
  for g in block_layout(cfg):
    if g.kind != kind:
      continue
    if g.scanned:
      blocks = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=g.stop - g.start)
      carry, _ = blocks(cfg, name=g.name)(carry, mod, rope, lora_gate)
    else:
      carry, _ = block_cls(cfg, name=g.name)(carry, mod, rope, lora_gate)
  return carry


class FluxTransformer(nn.Module):
  """Both families; ``pooled`` is None and ``guidance`` optional for FLUX.2."""
  cfg: AnyFluxConfig

  @nn.compact
  def __call__(self, x_t, t, prompt_embeds, pooled=None, guidance=None, lora_gate=None):
    cfg = self.cfg
    flux2 = isinstance(cfg, Flux2Config)
    dtype, bias = jnp.dtype(cfg.dtype), _use_bias(cfg)
    b, h, w, c = x_t.shape
    if h % PACK or w % PACK:
      raise ValueError(f"latent size {h}x{w} is not divisible by 2 (2x2 packing)")
    if c != cfg.latent_channels:
      raise ValueError(f"latents have {c} channels, expected in_channels // 4 = {cfg.latent_channels}")
    text_len = prompt_embeds.shape[1]
    cos, sin = rope_tables(cfg, text_len, h // PACK, w // PACK)
    rope = (jnp.asarray(cos), jnp.asarray(sin))

    x = nn.Dense(cfg.inner_dim, use_bias=bias, dtype=dtype, name="x_embedder")(pack(x_t.astype(dtype)))
    if flux2:
      temb = TimeGuidanceEmbed(cfg, name="time_guidance_embed")(t, guidance)
      silu = nn.silu(temb)
      mod_img = nn.Dense(6 * cfg.inner_dim, use_bias=False, dtype=dtype, name="double_stream_modulation_img")(silu)
      mod_txt = nn.Dense(6 * cfg.inner_dim, use_bias=False, dtype=dtype, name="double_stream_modulation_txt")(silu)
      mod_single = nn.Dense(3 * cfg.inner_dim, use_bias=False, dtype=dtype, name="single_stream_modulation")(silu)
      double_mod = (mod_img, mod_txt)
    else:
      temb = TimeTextEmbed(cfg, name="time_text_embed")(t, guidance, pooled)
      double_mod = mod_single = temb
    ctx = nn.Dense(cfg.inner_dim, use_bias=bias, dtype=dtype, name="context_embedder")(prompt_embeds.astype(dtype))

    x, ctx = _run_groups(cfg, "double", DoubleBlock, (x, ctx), double_mod, rope, lora_gate)
    hs = _run_groups(cfg, "single", SingleBlock, jnp.concatenate([ctx, x], axis=1), mod_single, rope, lora_gate)
    x = hs[:, text_len:]

    scale, shift = jnp.split(nn.Dense(2 * cfg.inner_dim, use_bias=bias, dtype=dtype, name="norm_out")(
        nn.silu(temb)), 2, axis=-1)
    x = mmdit.modulate(mmdit.layer_norm(x, _eps(cfg)), shift, scale)
    x = nn.Dense(cfg.out_channels, use_bias=bias, dtype=dtype, name="proj_out")(x)
    return unpack(x, h, w).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _module(cfg: AnyFluxConfig) -> FluxTransformer:
  return FluxTransformer(cfg)


def _cond_args(cfg, cond, batch):
  """(prompt_embeds, pooled, guidance) from the ``cond`` dict; clear errors for missing keys."""
  missing = [k for k in ("prompt_embeds",) + (("pooled",) if isinstance(cfg, FluxConfig) else ())
             + (("guidance",) if cfg.guidance_embeds else ()) if k not in cond]
  if missing:
    raise KeyError(f"{cfg.class_name} velocity: cond is missing {missing} (has {sorted(cond)})")
  pooled = cond["pooled"] if isinstance(cfg, FluxConfig) else None
  guidance = None
  if cfg.guidance_embeds:
    guidance = jnp.broadcast_to(jnp.asarray(cond["guidance"], jnp.float32), (batch,))
  return cond["prompt_embeds"], pooled, guidance


def dummy_inputs(cfg: AnyFluxConfig, batch_size=1, text_len=8, latent_size=4):
  x = jnp.zeros((batch_size, latent_size, latent_size, cfg.latent_channels), jnp.float32)
  cond = dict(prompt_embeds=jnp.zeros((batch_size, text_len, cfg.joint_attention_dim), jnp.float32))
  if isinstance(cfg, FluxConfig):
    cond["pooled"] = jnp.zeros((batch_size, cfg.pooled_projection_dim), jnp.float32)
  if cfg.guidance_embeds:
    cond["guidance"] = jnp.zeros((batch_size,), jnp.float32)
  return x, jnp.zeros((batch_size,), jnp.float32), cond


def init(cfg: AnyFluxConfig, key):
  """Returns the variables dict {'params': ..., ['lora': ...]} for a fresh (random) model."""
  x, t, cond = dummy_inputs(cfg, latent_size=2 * PACK)
  return _module(cfg).init({"params": key}, x, t, *_cond_args(cfg, cond, x.shape[0]))


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: AnyFluxConfig):
  return jax.eval_shape(functools.partial(init, cfg), jax.random.PRNGKey(0))


def param_shapes(cfg: AnyFluxConfig):
  """Abstract variables (ShapeDtypeStructs) without allocating anything; traced once per config (the converter,
  the exporter and the trainer all ask), returned in fresh containers."""
  return jax.tree_util.tree_map(lambda x: x, _param_shapes(cfg))


def init_lora(cfg: AnyFluxConfig, key):
  """Only the ``lora`` collection of a fresh model (the base params are traced away, not allocated)."""
  if cfg.lora_rank <= 0:
    return {}
  return jax.jit(lambda k: init(cfg, k)["lora"])(key)


def velocity(variables, x_t, t, cond, *, cfg: AnyFluxConfig, lora_gate=None):
  """The model contract: v_theta(x_t, t, c) as NHWC float32.

  ``x_t`` (B, H, W, in_channels // 4) with even H, W; ``t`` in [0, 1] (scalar or (B,)), embedded at 1000 t;
  ``cond`` as in the module docstring. ``lora_gate`` (B, J) selects per row which stacked adapters are on.
  """
  b = x_t.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  prompt_embeds, pooled, guidance = _cond_args(cfg, cond, b)
  return _module(cfg).apply(variables, x_t, t, prompt_embeds, pooled, guidance, lora_gate)


def param_count(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))
