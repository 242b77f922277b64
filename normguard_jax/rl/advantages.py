"""Group-normalised advantages (GRPO style, paper.md §4), with the reference codes' std and epsilon choices."""

import jax.numpy as jnp

EPS_KINDS = ("add", "floor")
AGGREGATIONS = ("sum", "gdpo")


def group_advantages(rewards, group_size, *, global_std=True, eps=1e-4, eps_kind="add", aggregation="sum"):
  """A_i = (R_i - mean_{group(i)} R) / std, float32.

  ``rewards`` is (B,) with groups contiguous (B = num_groups * group_size). std is over the whole batch
  when ``global_std``, else per group (population std, ddof 0, in every reference). The epsilon:
    eps_kind 'add':   std + eps, flow_grpo / official DiffusionNFT and AWM ``PerPromptStatTracker``
                      (flow_grpo/stat_tracking.py:26-31, eps = 1e-4; global std with ``sample.global_std``);
    eps_kind 'floor': max(std, eps), Flow-Factory (advantage/advantage_processor.py:259-262, :385, eps = 1e-6).
  aggregation 'sum' is the above (FF ``advantage_aggregation: sum`` for one reward, :357-386). 'gdpo' is FF's
  GDPO (:455-470): per-group z-scores with max(std_g, 1e-6), then the batch re-standardised by its own mean and
  max(std, 1e-6); ``global_std``, ``eps`` and ``eps_kind`` do not apply. For one reward it equals per-group
  'floor' advantages whenever every group's std is >= 1e-6; if some groups are constant (their z = 0), every
  advantage is multiplied by 1 / sqrt(fraction of non-constant groups) (exactly: 1 / sqrt(mean_g std_g^2 /
  max(std_g, 1e-6)^2), with the batch mean of the z-scores ~ 0).
  """
  if rewards.shape[0] % group_size:
    raise ValueError(f"batch of {rewards.shape[0]} rewards is not a whole number of groups of {group_size}")
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"unknown advantage aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
  if eps_kind not in EPS_KINDS:
    raise ValueError(f"unknown advantage eps_kind {eps_kind!r}; expected one of {EPS_KINDS}")
  r = rewards.astype(jnp.float32).reshape(-1, group_size)
  centred = r - r.mean(axis=1, keepdims=True)
  if aggregation == "gdpo":
    z = centred / jnp.maximum(jnp.std(r, axis=1, keepdims=True), 1e-6)
    return ((z - jnp.mean(z)) / jnp.maximum(jnp.std(z), 1e-6)).reshape(-1)
  std = jnp.std(r) if global_std else jnp.std(r, axis=1, keepdims=True)
  std = std + eps if eps_kind == "add" else jnp.maximum(std, eps)
  return (centred / std).reshape(-1)


TIE_RULES = ("next", "same", "swap")


def best_worst_pairs(rewards, group_size, ties="next"):
  """Per group, the argmax-reward index (winner) and argmin (loser) as global indices.

  A group whose rewards are all equal has argmax = argmin = 0. ``ties``: 'next' (ours so far: the loser moves to
  index 1), 'same' (Flow-Factory trainers/dpo.py:349-357: winner and loser are the same sample, a pair with no
  preference signal: its loss gradient is 0), 'swap' (flow_grpo stat_tracking.py:45-51: winner index 1, loser 0).
  """
  if ties not in TIE_RULES:
    raise ValueError(f"unknown DPO tie rule {ties!r}; expected one of {TIE_RULES}")
  r = rewards.reshape(-1, group_size)
  base = jnp.arange(r.shape[0]) * group_size
  win, lose = jnp.argmax(r, axis=1), jnp.argmin(r, axis=1)
  tied = win == lose
  if ties == "next":
    lose = jnp.where(tied, (win + 1) % group_size, lose)
  elif ties == "swap":
    win, lose = jnp.where(tied, 1 % group_size, win), jnp.where(tied, 0, lose)
  return base + win, base + lose
