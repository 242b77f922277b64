"""Policy, reference and old velocities from one jitted forward (DESIGN.md §3, "Velocities").

Two fusion strategies, both one XLA program:
  * ``concat`` (LoRA only): rows [policy; ref; old] in one batched forward with shared base weights;
    a per-row gate switches the stacked adapters (models/lora.py). Backward runs over all rows.
  * ``split``: separate applies inside the same program; reference and old take stop-gradient
    variables, so autodiff keeps no activations for them and their backward is never built.
Both equal separate forwards (tests/test_fused.py); the benchmark (normguard_jax.bench) measures them.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

STRATEGIES = ("split", "concat")


class Velocities(NamedTuple):
  policy: jax.Array
  ref: jax.Array
  old: Optional[jax.Array] = None


def stack_adapters(*trees):
  """Stack adapter trees on their last (adapter) axis: leaves (..., 1) -> (..., J)."""
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=-1), *trees)


def _gate(n, num_adapters, on):
  g = jnp.zeros((n, num_adapters), jnp.float32)
  return g if on is None else g.at[:, on].set(1.0)


def fused_velocities(apply_fn, trainable, frozen, old, x_t, t, cond, *, lora, strategy="split"):
  """-> Velocities(policy, ref, old). ``apply_fn(variables, x, t, cond, lora_gate)``; ``old`` may be None."""
  sg = jax.lax.stop_gradient
  frozen = sg(frozen)
  if not lora:
    if strategy != "split":
      raise ValueError("strategy 'concat' needs LoRA: full fine-tuning has no shared base weights")
    v = apply_fn({"params": trainable}, x_t, t, cond, None)
    v_ref = sg(apply_fn({"params": frozen}, x_t, t, cond, None))
    v_old = None if old is None else sg(apply_fn({"params": sg(old)}, x_t, t, cond, None))
    return Velocities(v, v_ref, v_old)

  n = x_t.shape[0]
  if strategy == "split":
    v = apply_fn({"params": frozen, "lora": trainable}, x_t, t, cond, None)
    v_ref = sg(apply_fn({"params": frozen, "lora": sg(trainable)}, x_t, t, cond, _gate(n, 1, None)))
    v_old = None if old is None else sg(apply_fn({"params": frozen, "lora": sg(old)}, x_t, t, cond, None))
    return Velocities(v, v_ref, v_old)
  if strategy != "concat":
    raise ValueError(f"unknown fusion strategy {strategy!r}; expected one of {STRATEGIES}")
  adapters = trainable if old is None else stack_adapters(trainable, sg(old))
  j = 1 if old is None else 2
  branches = [0, None] + ([1] if old is not None else [])
  gate = jnp.concatenate([_gate(n, j, on) for on in branches], axis=0)
  reps = len(branches)
  tile = lambda a: jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * reps, axis=0), a)
  v_all = apply_fn({"params": frozen, "lora": adapters}, tile(x_t), tile(t), tile(cond), gate)
  parts = jnp.split(v_all, reps, axis=0)
  return Velocities(parts[0], sg(parts[1]), sg(parts[2]) if old is not None else None)


def separate_velocities(apply_fn, trainable, frozen, old, x_t, t, cond, *, lora):
  """Reference implementation: one plain forward per branch (used by tests and the benchmark)."""
  pol = {"params": frozen, "lora": trainable} if lora else {"params": trainable}
  ref = {"params": frozen, "lora": trainable} if lora else {"params": frozen}
  ref_gate = jnp.zeros((x_t.shape[0], 1), jnp.float32) if lora else None
  v = apply_fn(pol, x_t, t, cond, None)
  v_ref = apply_fn(ref, x_t, t, cond, ref_gate)
  v_old = None
  if old is not None:
    v_old = apply_fn({"params": frozen, "lora": old} if lora else {"params": old}, x_t, t, cond, None)
  return Velocities(v, v_ref, v_old)
