"""Time grids and training-timestep samplers.

t in [0, 1] with t = 1 pure noise (DESIGN.md §1). Sampling grids run from 1 to 0 and carry the SD3
static shift or the FLUX resolution-dependent shift; diffusers timesteps are 1000 t.
"""

import jax
import jax.numpy as jnp

TRAIN_T_SAMPLERS = ("uniform", "logit_normal", "discrete")


def shift_time(t, shift):
  """SD3 static shift (Esser et al. 2024, eq. 23): t' = s t / (1 + (s - 1) t). shift = 1 is identity."""
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def flux_time_shift(t, mu, sigma=1.0):
  """FLUX resolution-dependent shift: t' = e^mu / (e^mu + (1/t - 1)^sigma); t' = 0 at t = 0."""
  t = jnp.asarray(t, jnp.float32)
  safe = jnp.where(t > 0, t, 1.0)
  out = jnp.exp(mu) / (jnp.exp(mu) + (1.0 / safe - 1.0) ** sigma)
  return jnp.where(t > 0, out, 0.0)


def flux_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
  """mu linear in the number of image tokens, as diffusers' ``calculate_shift`` for FLUX."""
  m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return image_seq_len * m + (base_shift - m * base_seq_len)


def sampling_grid(num_steps, shift=1.0, mu=None):
  """Descending grid t_0 = 1 > t_1 > ... > t_K = 0 of K = num_steps Euler intervals."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  t = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)
  return flux_time_shift(t, mu) if mu is not None else shift_time(t, shift)


def sample_train_t(key, shape, kind="logit_normal", *, mean=0.0, std=1.0, shift=1.0, t_min=0.0, t_max=1.0):
  """Training timesteps for forward-process losses.

  uniform: U[t_min, t_max]; logit_normal: sigmoid(N(mean, std)) (SD3 eq. 19, 'logit_normal' weighting
  in diffusers); both then shifted. The 'discrete' kind lives in :func:`sample_grid_indices`.
  """
  if kind == "uniform":
    t = jax.random.uniform(key, shape, minval=t_min, maxval=t_max)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
    t = t_min + (t_max - t_min) * t
  else:
    raise ValueError(f"unknown train t sampler {kind!r}; expected 'uniform' or 'logit_normal'")
  return shift_time(t, shift)


def sample_grid_indices(key, batch_size, num_steps, num_train_timesteps, fraction=1.0):
  """Stratified sampler indices per sample (NFT/AWM 'discrete'): the first ``int(K * fraction)`` grid
  steps are split into ``num_train_timesteps`` strata and one index is drawn in each, in random order.
  Returns int32 (num_train_timesteps, batch_size)."""
  usable = max(int(num_steps * fraction), 1)
  if num_train_timesteps > usable:
    raise ValueError(f"num_train_timesteps={num_train_timesteps} exceeds the {usable} usable sampler steps")
  edges = jnp.linspace(0, usable, num_train_timesteps + 1)
  k1, k2 = jax.random.split(key)
  u = jax.random.uniform(k1, (num_train_timesteps, batch_size))
  idx = jnp.floor(edges[:-1, None] + u * (edges[1:, None] - edges[:-1, None])).astype(jnp.int32)
  idx = jnp.clip(idx, 0, usable - 1)
  perm = jax.vmap(lambda k: jax.random.permutation(k, num_train_timesteps))(jax.random.split(k2, batch_size))
  return jnp.take_along_axis(idx, perm.T, axis=0)


def forward_noise(x0, eps, t):
  """x_t = (1 - t) x0 + t eps, the rectified-flow interpolation."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * eps
