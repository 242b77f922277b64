"""Small shared fixtures for the tests: a tiny DiT with LoRA adapters that are not zero."""

import jax
import jax.numpy as jnp

from normguard_jax.models import dit

TINY = dict(image_size=8, channels=1, patch_size=2, width=32, depth=2, num_heads=2, num_classes=10)


def tiny_model(lora_rank=0, targets=("qkv", "proj")):
  return dit.DiTConfig(**TINY, lora_rank=lora_rank, lora_alpha=float(2 * lora_rank or 1), lora_targets=targets)


def randomize(tree, seed, scale=0.05):
  """Random values for every leaf (zero-initialised layers and LoRA B would hide bugs)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


def apply_fn_for(cfg):
  return lambda variables, x, t, c, gate: dit.velocity(variables, x, t, c, cfg=cfg, lora_gate=gate)


def inputs(b=4, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (b, 8, 8, 1))
  t = jnp.linspace(0.1, 1.0, b)
  return x, t, jnp.arange(b, dtype=jnp.int32) % 10
