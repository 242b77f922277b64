"""Euler ODE sampler, the Flow-GRPO SDE sampler with per-step Gaussian log-probs, and DiffusionNFT's
deterministic multistep DPM-Solver 2 ("dpm2"), as lax.scan.

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


SOLVERS = ("euler", "dpm2")


def _log_snr(sigma):
  """DPM-Solver's lambda = log(alpha / sigma) for the flow alpha = 1 - sigma; 0 where undefined (sigma in {0, 1})."""
  ok = (sigma > 0.0) & (sigma < 1.0)
  safe = jnp.where(ok, sigma, 0.5)
  return jnp.where(ok, jnp.log1p(-safe) - jnp.log(safe), 0.0)


def dpm2_coefficients(grid):
  """Per-step coefficients of DiffusionNFT's ``dpm_step`` with order 2 (NVlabs/DiffusionNFT@24af555,
  flow_grpo/diffusers_patch/solver.py:207-260, 298-356), for a grid sigma_0 > ... > sigma_K = 0.

  With x0_k = x_k - sigma_k v_k (``convert_model_output``, :263-272), step k (s0 = sigma_k, t = sigma_{k+1},
  s1 = sigma_{k-1}) is
    first order (k = 0, and k = K - 1 by ``lower_order_final``): ``ddim_update`` with eta 0, = the Euler step;
    otherwise ``multistep_dpm_solver_second_order_update`` (DPM-Solver++(2M), midpoint form):
      x_{k+1} = (t / s0) x_k - A (D0 + D1 / 2),  A = alpha_t (e^{-h} - 1) = alpha_s0 t / s0 - alpha_t,
      D0 = x0_k,  D1 = (h / h_0) (x0_k - x0_{k-1}),  h = lambda_t - lambda_s0,  h_0 = lambda_s0 - lambda_s1.
  At s1 = 1 (the step after a grid that starts at exactly 1) lambda_s1 = -inf, so h_0 = inf and D1 = 0 in the
  reference's float64 arithmetic: that step is first order too. Returns (second, c_x, c_x0, c_prev), each (K,):
  x_{k+1} = c_x x_k + c_x0 x0_k + c_prev x0_{k-1} where ``second``, else the Euler step.
  """
  s0, t = grid[:-1], grid[1:]
  s1 = jnp.concatenate([grid[:1], grid[:-2]])
  k = grid.shape[0] - 1
  step = jnp.arange(k)
  second = (step > 0) & (step < k - 1)
  s0_safe = jnp.where(second, s0, 1.0)
  lam_t, lam_s0, lam_s1 = _log_snr(t), _log_snr(s0), _log_snr(s1)
  h, h0 = lam_t - lam_s0, lam_s0 - lam_s1
  finite = second & (s1 < 1.0)
  r_inv = jnp.where(finite, h / jnp.where(finite, h0, 1.0), 0.0)
  a = (1.0 - s0) * t / s0_safe - (1.0 - t)
  c_x = jnp.where(second, t / s0_safe, 0.0)
  c_x0 = jnp.where(second, -a * (1.0 + 0.5 * r_inv), 0.0)
  c_prev = jnp.where(second, a * 0.5 * r_inv, 0.0)
  return second, c_x, c_x0, c_prev


def sample(velocity_fn, x1, grid, key=None, *, noise_level=0.0, solver="euler"):
  """Integrate from x1 ~ N(0, I) at t = grid[0] = 1 down to grid[-1] = 0.

  solver 'euler', noise_level = 0: Euler ODE (deterministic). noise_level > 0: Flow-GRPO SDE on every step
  except the last, which stays deterministic (its std would be 0 at t' = 0 and its log-prob undefined).
  solver 'dpm2': DiffusionNFT's deterministic multistep DPM-Solver 2 (``solver="dpm2"`` in its config,
  config/nft.py:65-66), first order at the first and the last step (:func:`dpm2_coefficients`); deterministic
  only, with zero log-probs. Both solvers stack the velocity_fn aux over the K steps.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown sampler solver {solver!r}; expected one of {SOLVERS}")
  num_steps = grid.shape[0] - 1
  sde = noise_level > 0
  if solver == "dpm2":
    if sde:
      raise ValueError(f"solver 'dpm2' is deterministic (DiffusionNFT asserts it, solver.py:56); got "
                       f"noise_level={noise_level}, expected 0")
    return _sample_dpm2(velocity_fn, x1, grid)
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


def _sample_dpm2(velocity_fn, x1, grid):
  """The 'dpm2' scan: the carry holds the state and the previous step's x0 prediction."""
  coeffs = dpm2_coefficients(grid)

  def body(carry, inputs):
    x, x0_prev = carry
    t, t_next, second, c_x, c_x0, c_prev = inputs
    v, aux = velocity_fn(x, jnp.full((x.shape[0],), t))
    x0 = x - t * v
    x_next = jnp.where(second, c_x * x + c_x0 * x0 + c_prev * x0_prev, euler_step(x, v, t, t_next))
    x_next = x_next.astype(x.dtype)
    return (x_next, x0.astype(x0_prev.dtype)), (x_next, jnp.zeros(x.shape[0]), aux)

  _, (xs, lps, aux) = jax.lax.scan(body, (x1, jnp.zeros_like(x1)), (grid[:-1], grid[1:]) + tuple(coeffs))
  return Trajectory(jnp.concatenate([x1[None], xs], 0), lps, aux)
