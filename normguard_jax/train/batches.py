"""Training batches for each base loss, built from a rollout (DESIGN.md §4, steps 5-6).

NFT and AWM: clean samples forward-noised at stratified sampler timesteps (T per sample, stacked as
T*B rows). DPO: best/worst pairs per group with shared noise and logit-normal t, rows [w; l]. GRPO:
stored SDE transitions at stratified steps with their rollout log-probs.
"""

import jax
import jax.numpy as jnp

from normguard_jax.flow import schedules
from normguard_jax.rl import advantages


def _rows(a, reps):
  """Stack ``reps`` copies of every leaf of ``a`` on the row axis (``a`` may be a conditioning pytree)."""
  return jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * reps, axis=0), a)


def repeat_rows(a, reps):
  """The T-fold row stacking of a batch (every sample's rows at each training timestep), for extra row fields."""
  return _rows(a, reps)


def _take(a, idx):
  return jax.tree_util.tree_map(lambda x: x[idx], a)


def forward_process_batch(key, x0, cond, adv, grid, num_train_timesteps, fraction, *, rule="index_fraction",
                          share_rows=0):
  """NFT/AWM batch: x_t = (1 - t) x0 + t eps at sampler-grid timesteps drawn by the recipe's rule
  (flow/schedules.sample_train_indices: index fraction, Flow-Factory's value range, official NFT's random subset,
  ...), per sample or shared by blocks of ``share_rows`` rows. ``grid``: the rollout's grid (concrete for the
  value-range rules)."""
  b, k = x0.shape[0], grid.shape[0] - 1
  k_idx, k_eps = jax.random.split(key)
  idx = schedules.sample_train_indices(k_idx, k, grid, b, num_train_timesteps, rule=rule, fraction=fraction,
                                       share_rows=share_rows)  # (T, B)
  t = jnp.asarray(grid, jnp.float32)[idx].reshape(-1)
  x0_rows = _rows(x0, num_train_timesteps)
  eps = jax.random.normal(k_eps, x0_rows.shape, jnp.float32)
  return {"x0": x0_rows, "eps": eps, "t": t, "x_t": schedules.forward_noise(x0_rows, eps, t),
          "cond": _rows(cond, num_train_timesteps), "adv": _rows(adv, num_train_timesteps)}


def dpo_batch(key, x0, cond, rewards, group_size, num_train_timesteps, t_mean, t_std, *, t_clamp=0.0,
              t_share_pairs=0, ties="next"):
  """Winner/loser rows [w; l] sharing eps and t within each pair. t = sigmoid(N(t_mean, t_std)) (logit-normal),
  clipped to [t_clamp, 1 - t_clamp] when ``t_clamp`` > 0 (Flow-Factory: [0.01, 0.99], utils/noise_schedule.py:
  112-115) and shared by blocks of ``t_share_pairs`` consecutive pairs (Flow-Factory draws one t per device batch,
  trainers/dpo.py:443-453; 0 = one t per pair). ``ties``: rl/advantages.best_worst_pairs."""
  win, lose = advantages.best_worst_pairs(rewards, group_size, ties=ties)
  k_t, k_eps = jax.random.split(key)
  n = win.shape[0] * num_train_timesteps
  x0_w, x0_l = _rows(x0[win], num_train_timesteps), _rows(x0[lose], num_train_timesteps)
  draws = n // t_share_pairs if t_share_pairs else n
  if t_share_pairs and n % t_share_pairs:
    raise ValueError(f"dpo.t_share_pairs={t_share_pairs} does not divide the {n} pairs")
  t = schedules.sample_train_t(k_t, (draws,), "logit_normal", mean=t_mean, std=t_std)
  if t_share_pairs:
    t = jnp.repeat(t, t_share_pairs)
  if t_clamp > 0:
    t = jnp.clip(t, t_clamp, 1.0 - t_clamp)
  eps = jax.random.normal(k_eps, x0_w.shape, jnp.float32)
  x0_rows = jnp.concatenate([x0_w, x0_l], 0)
  eps_rows, t_rows = jnp.concatenate([eps, eps], 0), jnp.concatenate([t, t], 0)
  c = _rows(_take(cond, win), num_train_timesteps)
  return {"x0": x0_rows, "eps": eps_rows, "t": t_rows, "x_t": schedules.forward_noise(x0_rows, eps_rows, t_rows),
          "cond": _rows(c, 2)}


def grpo_batch(key, rollout, cond, adv, num_train_timesteps, fraction):
  """Stored transitions (x_k -> x_{k+1}) at stratified SDE steps (the last, deterministic one excluded)."""
  xs, grid, lps = rollout["xs"], rollout["grid"], rollout["log_probs"]
  k, b = lps.shape
  usable_frac = min(fraction, (k - 1) / k)
  idx = schedules.sample_grid_indices(key, b, k, num_train_timesteps, usable_frac)  # (T, B)
  cols = jnp.broadcast_to(jnp.arange(b), idx.shape)
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  return {"x_t": flat(xs[idx, cols]), "x_next": flat(xs[idx + 1, cols]), "t": grid[idx].reshape(-1),
          "t_next": grid[idx + 1].reshape(-1), "t_max": jnp.full((idx.size,), grid[1]),
          "log_prob_old": lps[idx, cols].reshape(-1), "cond": _rows(cond, num_train_timesteps),
          "adv": _rows(adv, num_train_timesteps)}
