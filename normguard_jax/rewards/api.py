"""Weighted combination of named rewards; each term is also returned for separate logging."""

import jax.numpy as jnp

from normguard_jax.rewards.toy import TOY_REWARDS

REGISTRY = dict(TOY_REWARDS)


def make_reward(terms):
  """``terms``: {name: weight}. Returns fn(images, cond) -> (total (B,), {name: (B,)})."""
  if not terms:
    raise ValueError("reward.terms is empty: name at least one reward")
  unknown = sorted(set(terms) - set(REGISTRY))
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REGISTRY)}")

  def reward_fn(images, cond):
    parts = {name: REGISTRY[name](images, cond) for name in terms}
    total = sum(float(w) * parts[name] for name, w in terms.items())
    return jnp.asarray(total, jnp.float32), parts

  return reward_fn
