"""Tier 1: Euler ODE, Flow-GRPO SDE and log-probs, CFG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from normguard_jax.flow import samplers, schedules


def test_euler_is_exact_on_a_straight_flow():
  """With the true velocity of a single (x0, eps) pair, v = eps - x0, Euler lands on x0 on any grid."""
  key = jax.random.PRNGKey(0)
  x0, eps = jax.random.normal(key, (2, 4, 4, 1)), jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
  grid = schedules.sampling_grid(7, shift=3.0)
  traj = samplers.sample(lambda x, t: (eps - x0, {"n": jnp.zeros(2)}), eps, grid)
  np.testing.assert_allclose(traj.xs[-1], x0, atol=1e-5)
  assert traj.xs.shape == (8, 2, 4, 4, 1) and traj.aux["n"].shape == (7, 2)
  np.testing.assert_array_equal(traj.log_probs, 0.0)


def test_gaussian_log_prob_is_element_mean_of_normal_logpdf():
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  mean = np.random.RandomState(1).randn(3, 5).astype(np.float32)
  got = samplers.gaussian_log_prob(jnp.asarray(x), jnp.asarray(mean), 0.3)
  np.testing.assert_allclose(got, stats.norm.logpdf(x, mean, 0.3).mean(1), rtol=1e-5)


def test_sde_std_and_mean_follow_flow_grpo():
  t, t_next, a = 0.6, 0.5, 0.7
  std = samplers.sde_std(jnp.float32(t), 0.9, a)
  np.testing.assert_allclose(std, a * math.sqrt(t / (1 - t)), rtol=1e-6)
  np.testing.assert_allclose(samplers.sde_std(jnp.float32(1.0), 0.9, a), a * math.sqrt(1 / 0.1), rtol=1e-6)
  x, v = jnp.ones((1, 2)), 2 * jnp.ones((1, 2))
  dt = t_next - t
  expect = 1 * (1 + std ** 2 / (2 * t) * dt) + 2 * (1 + std ** 2 * (1 - t) / (2 * t)) * dt
  np.testing.assert_allclose(samplers.sde_mean(x, v, t, t_next, std), expect * jnp.ones((1, 2)), rtol=1e-6)
  # zero noise reduces the SDE mean to the Euler step
  np.testing.assert_allclose(samplers.sde_mean(x, v, t, t_next, 0.0), samplers.euler_step(x, v, t, t_next))


def test_sde_sampler_log_probs_match_recomputation():
  key = jax.random.PRNGKey(3)
  grid = schedules.sampling_grid(5)
  x1 = jax.random.normal(key, (4, 3))
  vel = lambda x, t: (-0.5 * x, {})
  traj = samplers.sample(vel, x1, grid, jax.random.PRNGKey(4), noise_level=0.7)
  assert traj.log_probs.shape == (5, 4)
  assert np.all(np.asarray(traj.log_probs[-1]) == 0.0)  # the last step is deterministic
  for k in range(4):
    t, tn = grid[k], grid[k + 1]
    std = samplers.sde_std(t, grid[1], 0.7)
    mean = samplers.sde_mean(traj.xs[k], -0.5 * traj.xs[k], t, tn, std)
    lp = samplers.gaussian_log_prob(traj.xs[k + 1], mean, std * jnp.sqrt(t - tn))
    np.testing.assert_allclose(traj.log_probs[k], lp, rtol=1e-5)
  # the last step is the Euler step
  np.testing.assert_allclose(traj.xs[-1], samplers.euler_step(traj.xs[-2], -0.5 * traj.xs[-2], grid[-2], 0.0),
                             rtol=1e-6)


def test_sde_preserves_marginals_of_a_gaussian_flow():
  """For x0 ~ N(0, s^2) the exact velocity is linear; the SDE's terminal std should match s (same marginals)."""
  s = 0.5
  def vel(x, t):  # E[eps - x0 | x_t] for Gaussian data
    t = t[:, None]
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    return (t - (1 - t) * s ** 2) / var * x, {}
  grid = schedules.sampling_grid(200)
  x1 = jax.random.normal(jax.random.PRNGKey(0), (20000, 1))
  ode = samplers.sample(vel, x1, grid).xs[-1]
  sde = samplers.sample(vel, x1, grid, jax.random.PRNGKey(1), noise_level=0.5).xs[-1]
  assert abs(float(jnp.std(ode)) - s) < 0.02
  assert abs(float(jnp.std(sde)) - s) < 0.03


def test_cfg_combine():
  c, u = jnp.array([2.0]), jnp.array([1.0])
  np.testing.assert_allclose(samplers.cfg_combine(c, u, 1.0), c)
  np.testing.assert_allclose(samplers.cfg_combine(c, u, 0.0), u)
  np.testing.assert_allclose(samplers.cfg_combine(c, u, 4.5), 1 + 4.5)
