"""Tiny class-conditional flow DiT (Peebles & Xie 2023) with adaLN-zero blocks, for the CPU default.

The network predicts the flow-matching velocity v(x_t, t, c) ~ eps - x0 (DESIGN.md §1). Layers run
under ``nn.scan`` with stacked params. LoRA adapters live in the ``lora`` collection (models/lora.py).
"""

import dataclasses
import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from normguard_jax.models import attention as attention_lib
from normguard_jax.models import layers
from normguard_jax.models.lora import LoRADense
from normguard_jax.parallel import rules

LORA_TARGETS = ("qkv", "proj", "mlp", "adaln")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_classes: int = 10          # class index num_classes is the null (unconditional) label for CFG
  lora_rank: int = 0             # 0: full fine-tuning (no adapter)
  lora_alpha: float = 1.0
  lora_targets: Tuple[str, ...] = ("qkv", "proj")
  attention_impl: str = "xla"
  dtype: str = "float32"

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
    if self.width % self.num_heads or self.width % 4:
      raise ValueError(f"width {self.width} must be divisible by num_heads {self.num_heads} and by 4")
    bad = set(self.lora_targets) - set(LORA_TARGETS)
    if bad:
      raise ValueError(f"unknown lora_targets {sorted(bad)}; expected a subset of {LORA_TARGETS}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}")

  def lora_rank_for(self, target):
    return self.lora_rank if target in self.lora_targets else 0


def _dense(cfg, target, features, name, zero=False):
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return LoRADense(features, lora_rank=cfg.lora_rank_for(target), lora_alpha=cfg.lora_alpha,
                   kernel_init=init, name=name)


class DiTBlock(nn.Module):
  """x += g1 * Attn(adaLN(x)); x += g2 * MLP(adaLN(x)), with (shift, scale, gate) from c (adaLN-zero)."""
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x, c, lora_gate):
    cfg = self.cfg
    d, h = cfg.width, cfg.num_heads
    mod = _dense(cfg, "adaln", 6 * d, "adaln", zero=True)(nn.silu(c), lora_gate)
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)

    y = layers.modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6)(x), shift_a, scale_a)
    qkv = _dense(cfg, "qkv", 3 * d, "qkv")(y, lora_gate)
    q, k, v = jnp.split(qkv.reshape(x.shape[0], x.shape[1], 3 * h, d // h), 3, axis=2)
    y = attention_lib.dot_product_attention(q, k, v, impl=cfg.attention_impl).reshape(x.shape)
    x = x + gate_a[:, None, :] * _dense(cfg, "proj", d, "proj")(y, lora_gate)

    y = layers.modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6)(x), shift_m, scale_m)
    y = nn.gelu(_dense(cfg, "mlp", int(cfg.mlp_ratio * d), "fc1")(y, lora_gate), approximate=True)
    x = x + gate_m[:, None, :] * _dense(cfg, "mlp", d, "fc2")(y, lora_gate)
    return rules.constrain(x, "tokens"), None  # rows over the data axes under a mesh (parallel/rules.py)


class DiT(nn.Module):
  cfg: DiTConfig

  @nn.compact
  def __call__(self, x_t, t, labels, lora_gate=None):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    p, d = cfg.patch_size, cfg.width
    tokens = nn.Dense(d, name="patch_embed")(layers.patchify(x_t.astype(dtype), p))
    grid = cfg.image_size // p
    tokens = tokens + layers.sincos_pos_embed_2d(d, grid, grid)[None].astype(dtype)

    t_emb = layers.timestep_embedding(t, 256)
    t_emb = nn.Dense(d, name="t_embed_1")(t_emb)
    t_emb = nn.Dense(d, name="t_embed_2")(nn.silu(t_emb))
    y_emb = nn.Embed(cfg.num_classes + 1, d, name="label_embed")(labels)
    c = (t_emb + y_emb).astype(dtype)

    blocks = nn.scan(DiTBlock, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=cfg.depth)
    tokens, _ = blocks(cfg, name="blocks")(tokens, c, lora_gate)

    shift, scale = jnp.split(nn.Dense(2 * d, kernel_init=nn.initializers.zeros, name="final_adaln")(nn.silu(c)), 2, -1)
    tokens = layers.modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6)(tokens), shift, scale)
    out = nn.Dense(p * p * cfg.channels, kernel_init=nn.initializers.zeros, name="final_proj")(tokens)
    return layers.unpatchify(out, p, cfg.image_size, cfg.image_size, cfg.channels).astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _module(cfg: DiTConfig) -> DiT:
  return DiT(cfg)


def init(cfg: DiTConfig, key):
  """Returns the variables dict {'params': ..., ['lora': ...]} for a fresh model."""
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  return _module(cfg).init({"params": key}, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


def velocity(variables, x_t, t, cond, *, cfg: DiTConfig, lora_gate=None):
  """The model contract: v_theta(x_t, t, c). ``t`` in [0, 1] of shape (B,), ``cond`` int labels (B,).

  ``lora_gate`` (B, J) selects, per row, which stacked adapters are on; None means adapter 0 only.
  """
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
  return _module(cfg).apply(variables, x_t, t, cond, lora_gate)


def null_cond(cfg: DiTConfig, batch_size):
  """Unconditional labels for classifier-free guidance."""
  return jnp.full((batch_size,), cfg.num_classes, jnp.int32)


def param_count(tree):
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))
