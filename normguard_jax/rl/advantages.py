"""Group-normalised advantages (GRPO style, paper.md §4)."""

import jax.numpy as jnp


def group_advantages(rewards, group_size, *, global_std=True, eps=1e-4):
  """A_i = (R_i - mean_{group(i)} R) / (std + eps).

  ``rewards`` is (B,) with groups contiguous (B = num_groups * group_size). std is over the whole batch
  when ``global_std`` (flow_grpo/NFT default), else per group; eps = 1e-4 as in flow_grpo.
  """
  if rewards.shape[0] % group_size:
    raise ValueError(f"batch of {rewards.shape[0]} rewards is not a whole number of groups of {group_size}")
  r = rewards.astype(jnp.float32).reshape(-1, group_size)
  centred = r - r.mean(axis=1, keepdims=True)
  std = jnp.std(r) if global_std else jnp.std(r, axis=1, keepdims=True)
  return (centred / (std + eps)).reshape(-1)


def best_worst_pairs(rewards, group_size):
  """Per group, the argmax-reward index (winner) and argmin (loser) as global indices (flow_grpo DPO).

  With all rewards in a group equal, argmax = argmin = 0; the loser is then moved to index 1.
  """
  r = rewards.reshape(-1, group_size)
  base = jnp.arange(r.shape[0]) * group_size
  win, lose = jnp.argmax(r, axis=1), jnp.argmin(r, axis=1)
  lose = jnp.where(win == lose, (win + 1) % group_size, lose)
  return base + win, base + lose
