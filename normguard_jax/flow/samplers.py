"""Euler ODE sampler and the Flow-GRPO SDE sampler with per-step Gaussian log-probs, as lax.scan.

``velocity_fn(x, t) -> (v, aux)``: ``v`` drives the update, ``aux`` (any pytree, e.g. the per-step
reference norm for rho_k) is stacked over steps. Sampling runs t = 1 -> 0 (DESIGN.md §1).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Trajectory(NamedTuple):
  xs: jax.Array         # (K + 1, B, ...) states x_{t_0}, ..., x_{t_K}; xs[-1] is the sample
  log_probs: jax.Array  # (K, B) per-step log p(x_{k+1} | x_k) (0 for ODE steps)
  aux: Any              # velocity_fn aux, stacked over the K steps


def cfg_combine(v_cond, v_uncond, scale):
  """Classifier-free guidance: v = v_u + w (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x, v, t, t_next):
  """x_{t'} = x_t + (t' - t) v."""
  return x + (t_next - t) * v


def sde_std(t, t_max, noise_level):
  """Flow-GRPO sigma_t = a sqrt(t / (1 - t)); at t = 1 the first interior grid point replaces t in the
  denominator to avoid division by zero (paper.md §8.2)."""
  return noise_level * jnp.sqrt(t / (1.0 - jnp.where(t >= 1.0, t_max, t)))


def sde_mean(x, v, t, t_next, std):
  """Mean of the Flow-GRPO SDE step (paper.md §8.2), with dt = t' - t < 0."""
  dt = t_next - t
  return x * (1.0 + std ** 2 / (2.0 * t) * dt) + v * (1.0 + std ** 2 * (1.0 - t) / (2.0 * t)) * dt


def gaussian_log_prob(x_next, mean, scale):
  """Element-mean Gaussian log-density in float32 (Flow-GRPO takes the mean over C,H,W, not the sum)."""
  x_next, mean = x_next.astype(jnp.float32), mean.astype(jnp.float32)
  lp = -jnp.square(x_next - mean) / (2.0 * scale ** 2) - jnp.log(scale) - 0.5 * math.log(2.0 * math.pi)
  return jnp.mean(lp, axis=tuple(range(1, lp.ndim)))


def sde_step(x, v, t, t_next, t_max, noise_level, z):
  """One Flow-GRPO step: returns (x_next, mean, scale) with x_next = mean + scale z."""
  std = sde_std(t, t_max, noise_level)
  mean = sde_mean(x, v, t, t_next, std)
  scale = std * jnp.sqrt(t - t_next)
  return mean + scale * z, mean, scale


def sample(velocity_fn, x1, grid, key=None, *, noise_level=0.0):
  """Integrate from x1 ~ N(0, I) at t = grid[0] = 1 down to grid[-1] = 0.

  noise_level = 0: Euler ODE (deterministic). noise_level > 0: Flow-GRPO SDE on every step except the
  last, which stays deterministic (its std would be 0 at t' = 0 and its log-prob undefined).
  """
  num_steps = grid.shape[0] - 1
  sde = noise_level > 0
  if sde and key is None:
    raise ValueError("the SDE sampler needs a PRNG key")
  keys = jax.random.split(key, num_steps) if sde else jnp.zeros((num_steps, 2), jnp.uint32)
  t_max = grid[1]

  def body(x, inputs):
    t, t_next, k, last = inputs
    v, aux = velocity_fn(x, jnp.full((x.shape[0],), t))
    if not sde:
      x_next = euler_step(x, v, t, t_next)
      return x_next, (x_next, jnp.zeros(x.shape[0]), aux)
    z = jax.random.normal(k, x.shape, jnp.float32)
    x_sde, mean, scale = sde_step(x, v, t, t_next, t_max, noise_level, z)
    x_ode = euler_step(x, v, t, t_next)
    lp = jnp.where(last, 0.0, gaussian_log_prob(x_sde, mean, jnp.maximum(scale, 1e-20)))
    x_next = jnp.where(last, x_ode, x_sde)
    return x_next, (x_next, lp, aux)

  last = jnp.arange(num_steps) == num_steps - 1
  _, (xs, lps, aux) = jax.lax.scan(body, x1, (grid[:-1], grid[1:], keys, last))
  return Trajectory(jnp.concatenate([x1[None], xs], 0), lps, aux)
