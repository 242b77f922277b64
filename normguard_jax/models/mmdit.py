"""SD3 / SD3.5 MMDiT (Esser et al. 2024), a pure-JAX port of diffusers' ``SD3Transformer2DModel``.

The network predicts the flow-matching velocity v(x_t, t, c) ~ eps - x0 (DESIGN.md §1) on NHWC latents;
diffusers' NCHW and 1000-step timesteps appear only at the converter / test boundary.

Reference behaviour (diffusers ``transformer_sd3.py``, ``attention.py``, ``normalization.py``, ``embeddings.py``):
  * ``PatchEmbed``: a p x p stride-p conv, plus a fixed 2D sin-cos table of size pos_embed_max_size^2,
    centre-cropped to the latent grid. Its first half encodes the column (w), the second the row (h).
  * ``CombinedTimestepTextProjEmbeddings``: temb = MLP(sinusoid(1000 t)) + MLP(pooled), SiLU inside.
  * ``JointTransformerBlock``: adaLN-zero (LayerNorm eps 1e-6, no affine) on both streams, one joint
    attention over [image tokens, text tokens], tanh-GELU MLPs. The last block is ``context_pre_only``: its
    context stream uses ``AdaLayerNormContinuous`` (scale, shift) and stops after attention (no to_add_out,
    no ff_context). SD3.5 adds RMSNorm on q/k per head (``qk_norm='rms_norm'``) and, on the blocks listed in
    ``dual_attention_layers``, a second image-only attention (attn2) fed by ``SD35AdaLayerNormZeroX``
    (9 chunks: the 6 of adaLN-zero, then shift, scale, gate of attn2).
  * ``norm_out`` (AdaLayerNormContinuous, chunks (scale, shift)) and ``proj_out``, then unpatchify.

Block layout: the layer list is split into maximal runs of identical structure (dual attention or not, the
context_pre_only last block). With ``scan_layers`` every run of length >= 2 runs under ``nn.scan`` with
stacked params, named ``blocks_{first}``; everything else runs unscanned as ``block_{i}``.
:func:`block_layout` is the one source of this layout (the converter uses it too).

LoRA adapters (models/lora.py; gate 0 gives the base model exactly) sit on the Linears that ``lora_targets`` names
as PEFT ``target_modules`` do (models/lora.py, "targets"): suffixes of diffusers module paths, so "attn.to_q" is the
joint attention only, "attn2.to_q" the dual attention only, "to_q" both. LoRA-able sites inside a block
(:func:`block_lora_sites`): ``attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out}``,
``attn2.{to_q,to_k,to_v,to_out.0}`` on dual layers, and the MLPs ``ff[_context].net.0.proj`` / ``.net.2``.
``LORA_PRESETS``: "reference", the list of every SD3.5 reference (DiffusionNFT ``scripts/train_nft_sd3.py``:420-431,
AWM, flow_grpo DPO, Flow-Factory ``models/stable_diffusion/sd3_5.py``:75-80): joint attention only, 191 modules and
18.78 M parameters at r32 on SD3.5-Medium; "all_attention", our earlier default, which adds attn2 (243, 23.89 M).
"""

import dataclasses
import functools
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.models import attention as attention_lib
from normguard_jax.models import layers
from normguard_jax.models import lora as lora_lib
from normguard_jax.models.lora import LoRADense
from normguard_jax.parallel import rules

_ATTN = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out", "to_add_out")
_DIFFUSERS_LEAF = {"to_out": "to_out.0", "fc1": "net.0.proj", "fc2": "net.2"}  # our module name -> diffusers'
# every LoRA-able Linear inside a JointTransformerBlock (diffusers paths)
LORA_SITES = (tuple(f"attn.{_DIFFUSERS_LEAF.get(n, n)}" for n in _ATTN)
              + ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
              + tuple(f"{ff}.{leaf}" for ff in ("ff", "ff_context") for leaf in ("net.0.proj", "net.2")))
# the transformer's other Linear / Conv modules (suffixes that would also match these are not targets)
_OTHER_MODULES = ("pos_embed.proj", "time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                  "time_text_embed.text_embedder.linear_2", "context_embedder", "norm1.linear", "norm1_context.linear",
                  "norm_out.linear", "proj_out")
LORA_TARGETS = lora_lib.target_vocabulary(LORA_SITES, _OTHER_MODULES)  # every accepted ``lora_targets`` entry
LORA_PRESETS = {
    # DiffusionNFT train_nft_sd3.py:420-431, AWM, flow_grpo DPO, Flow-Factory sd3_5.py:75-80 (verbatim order)
    "reference": ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                  "attn.to_out.0", "attn.to_q", "attn.to_v"),
    # our earlier default: every attention projection, attn2 of the dual layers included
    "all_attention": ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}
QK_NORMS = (None, "rms_norm")
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
  """Mirrors diffusers' ``SD3Transformer2DModel`` config, plus our runtime switches."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: Tuple[int, ...] = ()
  qk_norm: Optional[str] = None
  # runtime
  scan_layers: bool = True
  remat: bool = False
  remat_policy: str = "full"  # models/layers.py REMAT_POLICIES: what a rematerialised block keeps
  lora_rank: int = 0
  lora_alpha: float = 1.0
  lora_targets: Tuple[str, ...] = LORA_PRESETS["all_attention"]
  attention_impl: str = "xla"
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "dual_attention_layers", tuple(int(i) for i in self.dual_attention_layers))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.caption_projection_dim != self.inner_dim:
      raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal num_attention_heads * "
                       f"attention_head_dim = {self.inner_dim} (the joint blocks run the context at that width)")
    if self.inner_dim % 4:
      raise ValueError(f"inner_dim {self.inner_dim} must be divisible by 4 for the 2D sin-cos embedding")
    if self.qk_norm not in QK_NORMS:
      raise ValueError(f"unsupported qk_norm {self.qk_norm!r}; expected one of {QK_NORMS}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"dual_attention_layers {bad} out of range for num_layers {self.num_layers}")
    lora_lib.check_targets(self.lora_targets, LORA_TARGETS, LORA_PRESETS, "SD3")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}")

  @property
  def inner_dim(self):
    return self.num_attention_heads * self.attention_head_dim

  def lora_rank_for(self, site):
    """The LoRA rank of the Linear at ``site`` (its diffusers path inside a block, e.g. ``attn2.to_q``)."""
    return self.lora_rank if lora_lib.target_matches(self.lora_targets, site) else 0


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """A run of layers [start, stop) with one structure; ``scanned`` groups have stacked params."""
  name: str
  start: int
  stop: int
  dual: bool
  context_pre_only: bool
  scanned: bool


def site_name(module, name):
  """Diffusers path inside a block of our Linear ``name`` in submodule ``module`` (attn, attn2, ff, ff_context)."""
  return f"{module}.{_DIFFUSERS_LEAF.get(name, name)}"


def block_lora_sites(dual, context_pre_only):
  """[(diffusers path inside the block, our path inside JointBlock)] of the block's LoRA-able Linears."""
  attn = _ATTN[:-1] if context_pre_only else _ATTN  # the last block has no to_add_out and no ff_context
  out = [(site_name("attn", n), ("attn", n)) for n in attn]
  if dual:
    out += [(site_name("attn2", n), ("attn2", n)) for n in ("to_q", "to_k", "to_v", "to_out")]
  for ff in ("ff",) if context_pre_only else ("ff", "ff_context"):
    out += [(site_name(ff, n), (ff, n)) for n in ("fc1", "fc2")]
  return out


def lora_modules(cfg: MMDiTConfig):
  """[(diffusers module path, our path in the ``lora`` tree, index in the scanned stack or None)] of every adapted
  Linear, in layer order: what PEFT's ``target_modules`` would select on ``SD3Transformer2DModel``."""
  out = []
  for g in block_layout(cfg):
    for site, path in block_lora_sites(g.dual, g.context_pre_only):
      if cfg.lora_rank_for(site):
        out += [(f"transformer_blocks.{i}.{site}", (g.name,) + path, i - g.start if g.scanned else None)
                for i in range(g.start, g.stop)]
  return out


def block_layout(cfg: MMDiTConfig) -> Tuple[BlockGroup, ...]:
  kinds = [(i in cfg.dual_attention_layers, i == cfg.num_layers - 1) for i in range(cfg.num_layers)]
  groups, start = [], 0
  for i in range(1, cfg.num_layers + 1):
    if i == cfg.num_layers or kinds[i] != kinds[start]:
      dual, pre_only = kinds[start]
      if cfg.scan_layers and i - start >= 2:
        groups.append(BlockGroup(f"blocks_{start}", start, i, dual, pre_only, True))
      else:
        groups.extend(BlockGroup(f"block_{j}", j, j + 1, dual, pre_only, False) for j in range(start, i))
      start = i
  return tuple(groups)


# ----------------------------------------------------------------------------------------------- embeddings

@functools.lru_cache(maxsize=None)
def _pos_embed_table(dim, max_size, base_size):
  """diffusers ``get_2d_sincos_pos_embed(dim, max_size, base_size=base_size)``: (max_size^2, dim) float32.

  Positions are arange(M) / (M / base_size) in float32; frequencies and sin/cos in float64, as in diffusers.
  """
  pos = (np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)).astype(np.float64)

  def one_axis(d, p):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.outer(p.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(pos, pos, indexing="ij")  # token (i, j) at row-major position i * M + j
  emb = np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)  # w first, then h
  return emb.astype(np.float32)


def pos_embed_table(cfg: MMDiTConfig):
  """The full (1, M*M, D) table, as stored in diffusers' ``pos_embed.pos_embed`` buffer."""
  return _pos_embed_table(cfg.inner_dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)[None]


def cropped_pos_embed(cfg: MMDiTConfig, h, w):
  """``PatchEmbed.cropped_pos_embed``: the centred h x w window of the table, (h * w, D)."""
  m = cfg.pos_embed_max_size
  if h > m or w > m:
    raise ValueError(f"latent grid {h}x{w} exceeds pos_embed_max_size {m}")
  top, left = (m - h) // 2, (m - w) // 2
  table = pos_embed_table(cfg)[0].reshape(m, m, -1)
  return jnp.asarray(table[top:top + h, left:left + w].reshape(h * w, -1))


def timestep_freqs(dim=256, max_period=10000):
  """exp(-log(P) * arange(dim / 2) / (dim / 2)) in float32, in diffusers' op order.

  At 1000-step timesteps one float32 ulp of a frequency moves the sinusoid by up to ~3e-5; torch's and
  XLA's float32 ``exp`` agree only to 1 ulp, which bounds how closely any port can match diffusers here.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  return jnp.exp(exponent / half)


def timestep_proj(timesteps, dim=256, max_period=10000):
  """diffusers ``get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`` on 0..1000 steps."""
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * timestep_freqs(dim, max_period)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def layer_norm(x, eps=LN_EPS):
  """LayerNorm without affine, statistics in float32 (two-pass variance, as torch)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return (xc * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """x * (1 + scale) + shift with per-sample (B, D) modulation, in diffusers' op order."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
  """diffusers ``RMSNorm(dim, eps=1e-6)`` with a learnt weight (``scale``); statistics in float32."""
  eps: float = LN_EPS

  @nn.compact
  def __call__(self, x):
    weight = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(var + self.eps) * weight).astype(x.dtype)


class PatchEmbed(nn.Module):
  """Patchify conv (``pos_embed.proj``) plus the centre-cropped sin-cos table."""
  cfg: MMDiTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    p = cfg.patch_size
    y = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", dtype=x.dtype, name="proj")(x)
    b, h, w, d = y.shape
    return y.reshape(b, h * w, d) + cropped_pos_embed(cfg, h, w)[None].astype(x.dtype)


class MLPEmbedder(nn.Module):
  """``TimestepEmbedding`` / ``PixArtAlphaTextProjection(act_fn='silu')``: linear_2(silu(linear_1(x)))."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class TimeTextEmbed(nn.Module):
  """``CombinedTimestepTextProjEmbeddings``: MLP(sinusoid(1000 t)) + MLP(pooled)."""
  cfg: MMDiTConfig

  @nn.compact
  def __call__(self, t, pooled):
    dtype = jnp.dtype(self.cfg.dtype)
    t_emb = timestep_proj(t * 1000.0).astype(dtype)
    t_emb = MLPEmbedder(self.cfg.inner_dim, dtype, name="timestep_embedder")(t_emb)
    return t_emb + MLPEmbedder(self.cfg.inner_dim, dtype, name="text_embedder")(pooled.astype(dtype))


# ----------------------------------------------------------------------------------------------- blocks

def _lora_dense(cfg, module, name, features, **kwargs):
  """Our Linear ``name`` inside ``module`` (attn, attn2, ff, ff_context), adapted when ``lora_targets`` says so."""
  return LoRADense(features, lora_rank=cfg.lora_rank_for(site_name(module, name)), lora_alpha=cfg.lora_alpha,
                   name=name, **kwargs)


class Attention(nn.Module):
  """``Attention`` + ``JointAttnProcessor2_0``: joint attention over [x; ctx] when ``ctx`` is given.

  Returns (x_out, ctx_out); ctx_out is None without context or when ``context_pre_only``.
  """
  cfg: MMDiTConfig
  context_pre_only: bool = False

  @nn.compact
  def __call__(self, x, ctx, lora_gate):
    cfg = self.cfg
    heads, dh, d = cfg.num_attention_heads, cfg.attention_head_dim, cfg.inner_dim

    def proj(target, inp):
      return _lora_dense(cfg, self.name, target, d)(inp, lora_gate).reshape(inp.shape[:2] + (heads, dh))

    q, k, v = proj("to_q", x), proj("to_k", x), proj("to_v", x)
    if cfg.qk_norm == "rms_norm":
      q, k = RMSNorm(name="norm_q")(q), RMSNorm(name="norm_k")(k)
    n = x.shape[1]
    if ctx is not None:
      cq, ck, cv = proj("add_q_proj", ctx), proj("add_k_proj", ctx), proj("add_v_proj", ctx)
      if cfg.qk_norm == "rms_norm":
        cq, ck = RMSNorm(name="norm_added_q")(cq), RMSNorm(name="norm_added_k")(ck)
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((q, cq), (k, ck), (v, cv)))
    o = attention_lib.dot_product_attention(q, k, v, impl=cfg.attention_impl)
    o = o.reshape(o.shape[:2] + (d,)).astype(x.dtype)
    x_out = _lora_dense(cfg, self.name, "to_out", d)(o[:, :n], lora_gate)
    if ctx is None or self.context_pre_only:
      return x_out, None
    return x_out, _lora_dense(cfg, self.name, "to_add_out", d)(o[:, n:], lora_gate)


class FeedForward(nn.Module):
  """``FeedForward(activation_fn='gelu-approximate')``: net.2(gelu_tanh(net.0.proj(x))), 4x hidden, at
  ``cfg.inner_dim`` in ``cfg.dtype`` (SD3 and FLUX.1). ``fc1`` / ``fc2`` are diffusers' ``net.0.proj`` / ``net.2``,
  adapted when ``cfg.lora_targets`` names them; the module's own name (ff, ff_context) qualifies the site."""
  cfg: object  # MMDiTConfig or flux.FluxConfig

  @nn.compact
  def __call__(self, x, lora_gate=None):
    cfg, dim = self.cfg, self.cfg.inner_dim
    dense = lambda name, features: _lora_dense(cfg, self.name, name, features,
                                               kernel_init=nn.initializers.lecun_normal())  # nn.Dense's init
    x = nn.gelu(dense("fc1", 4 * dim)(x.astype(jnp.dtype(cfg.dtype)), lora_gate), approximate=True)
    return dense("fc2", dim)(x, lora_gate)


class JointBlock(nn.Module):
  """``JointTransformerBlock``; maps the carry (x, ctx) -> (x, ctx) and returns (carry, None) for nn.scan.

  ``context_pre_only`` returns ctx = None (the last block).
  """
  cfg: MMDiTConfig
  dual: bool = False
  context_pre_only: bool = False

  @nn.compact
  def __call__(self, carry, temb, lora_gate):
    cfg = self.cfg
    d, dtype = cfg.inner_dim, jnp.dtype(cfg.dtype)
    x, ctx = carry
    emb = nn.silu(temb)
    n_mod = 9 if self.dual else 6
    mod = jnp.split(nn.Dense(n_mod * d, dtype=dtype, name="norm1")(emb), n_mod, axis=-1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    nx = layer_norm(x)
    if self.context_pre_only:
      c_scale, c_shift = jnp.split(nn.Dense(2 * d, dtype=dtype, name="norm1_context")(emb), 2, axis=-1)
      c_in = modulate(layer_norm(ctx), c_shift, c_scale)
    else:
      c_mod = jnp.split(nn.Dense(6 * d, dtype=dtype, name="norm1_context")(emb), 6, axis=-1)
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mod
      c_in = modulate(layer_norm(ctx), c_shift_msa, c_scale_msa)

    attn_out, c_attn_out = Attention(cfg, self.context_pre_only, name="attn")(
        modulate(nx, shift_msa, scale_msa), c_in, lora_gate)
    x = x + gate_msa[:, None] * attn_out
    if self.dual:
      shift_msa2, scale_msa2, gate_msa2 = mod[6:]
      attn2_out, _ = Attention(cfg, name="attn2")(modulate(nx, shift_msa2, scale_msa2), None, lora_gate)
      x = x + gate_msa2[:, None] * attn2_out
    x = x + gate_mlp[:, None] * FeedForward(cfg, name="ff")(
        modulate(layer_norm(x), shift_mlp, scale_mlp), lora_gate)
    x = rules.constrain(x, "tokens")  # the token streams between blocks: rows over the data axes (rules table)
    if self.context_pre_only:
      return (x, None), None

    ctx = ctx + c_gate_msa[:, None] * c_attn_out
    c_ff = FeedForward(cfg, name="ff_context")(
        modulate(layer_norm(ctx), c_shift_mlp, c_scale_mlp), lora_gate)
    return (x, rules.constrain(ctx + c_gate_mlp[:, None] * c_ff, "tokens")), None


class MMDiT(nn.Module):
  cfg: MMDiTConfig

  @nn.compact
  def __call__(self, x_t, t, prompt_embeds, pooled, lora_gate=None):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    b, h, w, _ = x_t.shape
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {p}")
    x = PatchEmbed(cfg, name="pos_embed")(x_t.astype(dtype))
    temb = TimeTextEmbed(cfg, name="time_text_embed")(t, pooled)
    ctx = nn.Dense(cfg.caption_projection_dim, dtype=dtype, name="context_embedder")(prompt_embeds.astype(dtype))

    block_cls = nn.remat(JointBlock, policy=layers.remat_policy(cfg.remat_policy)) if cfg.remat else JointBlock
    carry = (x, ctx)
    for g in block_layout(cfg):
      if g.scanned:
        blocks = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast), length=g.stop - g.start)
        carry, _ = blocks(cfg, g.dual, g.context_pre_only, name=g.name)(carry, temb, lora_gate)
      else:
        carry, _ = block_cls(cfg, g.dual, g.context_pre_only, name=g.name)(carry, temb, lora_gate)
    x = carry[0]

    scale, shift = jnp.split(nn.Dense(2 * cfg.inner_dim, dtype=dtype, name="norm_out")(nn.silu(temb)), 2, axis=-1)
    x = modulate(layer_norm(x), shift, scale)
    x = nn.Dense(p * p * cfg.out_channels, dtype=dtype, name="proj_out")(x)
    # unpatchify: tokens (i, j) carry (p, q, c) -> NHWC; diffusers' "nhwpqc->nchpwq" in NHWC order.
    x = x.reshape(b, h // p, w // p, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, cfg.out_channels).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _module(cfg: MMDiTConfig) -> MMDiT:
  return MMDiT(cfg)


def dummy_inputs(cfg: MMDiTConfig, batch_size=1, text_len=8, latent_size=None):
  s = latent_size or cfg.sample_size
  x = jnp.zeros((batch_size, s, s, cfg.in_channels), jnp.float32)
  cond = dict(prompt_embeds=jnp.zeros((batch_size, text_len, cfg.joint_attention_dim), jnp.float32),
              pooled=jnp.zeros((batch_size, cfg.pooled_projection_dim), jnp.float32))
  return x, jnp.zeros((batch_size,), jnp.float32), cond


def init(cfg: MMDiTConfig, key):
  """Returns the variables dict {'params': ..., ['lora': ...]} for a fresh (random) model."""
  x, t, cond = dummy_inputs(cfg, latent_size=2 * cfg.patch_size)
  return _module(cfg).init({"params": key}, x, t, cond["prompt_embeds"], cond["pooled"])


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: MMDiTConfig):
  return jax.eval_shape(functools.partial(init, cfg), jax.random.PRNGKey(0))


def param_shapes(cfg: MMDiTConfig):
  """Abstract variables (ShapeDtypeStructs) without allocating anything; traced once per config (the converter,
  the exporter and the trainer all ask), returned in fresh containers."""
  return jax.tree_util.tree_map(lambda x: x, _param_shapes(cfg))


def init_lora(cfg: MMDiTConfig, key):
  """Only the ``lora`` collection of a fresh model (the base params are traced away, not allocated)."""
  if cfg.lora_rank <= 0:
    return {}
  return jax.jit(lambda k: init(cfg, k)["lora"])(key)


def velocity(variables, x_t, t, cond, *, cfg: MMDiTConfig, lora_gate=None):
  """The model contract: v_theta(x_t, t, c) as NHWC float32.

  ``x_t`` (B, H, W, in_channels); ``t`` in [0, 1] (scalar or (B,)), fed to the model as 1000 t;
  ``cond`` = dict(prompt_embeds=(B, L, joint_attention_dim), pooled=(B, pooled_projection_dim)).
  ``lora_gate`` (B, J) selects, per row, which stacked adapters are on; None means adapter 0 only.
  """
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
  return _module(cfg).apply(variables, x_t, t, cond["prompt_embeds"], cond["pooled"], lora_gate)


def param_count(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))
