"""Tier 1: Euler ODE, Flow-GRPO SDE and log-probs, CFG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------------------------------
# DiffusionNFT's deterministic multistep DPM-Solver 2
# ---------------------------------------------------------------------------------------------------------------

def _reference_dpm2(v_pred_fn, z, sigmas):
  """Line-by-line float64 numpy transcription of official DiffusionNFT ``run_sampling(solver="dpm2",
  determistic=True)`` (NVlabs/DiffusionNFT@24af555, flow_grpo/diffusers_patch/solver.py:14-75, 188-356)."""
  sigmas = np.asarray(sigmas, np.float64)
  order = 2
  model_outputs, lower_order_nums = [None] * order, 0  # DPMState
  timesteps = sigmas[:-1]
  zs = [z]
  for step_index in range(len(sigmas) - 1):
    sigma = sigmas[step_index]
    pred = v_pred_fn(z, sigma)
    lower_order_final = step_index == len(timesteps) - 1
    model_output = z - sigma * pred  # convert_model_output
    for i in range(order - 1):  # dpm_state.update
      model_outputs[i] = model_outputs[i + 1]
    model_outputs[-1] = model_output
    sample = z
    if order == 1 or lower_order_nums < 1 or lower_order_final:
      if step_index == 0 or lower_order_final:  # ddim_update, eta = 0
        t, s = sigmas[step_index + 1], sigmas[step_index]
        std_dev_t = 0.0 * t
        dt_sqrt = np.sqrt(1.0 - t ** 2 * (1 - s) ** 2 / (s ** 2 * (1 - t) ** 2))
        rho_t = std_dev_t * dt_sqrt
        noise_pred = (sample - (1 - s) * model_output) / s
        prev = (1 - t) * model_output + np.sqrt(t ** 2 - rho_t ** 2) * noise_pred
      else:  # dpm_solver_first_order_update (not reached with order 2)
        raise AssertionError("unreachable for order 2")
    else:  # multistep_dpm_solver_second_order_update
      sigma_t, sigma_s0, sigma_s1 = sigmas[step_index + 1], sigmas[step_index], sigmas[step_index - 1]
      alpha_t, alpha_s0, alpha_s1 = 1 - sigma_t, 1 - sigma_s0, 1 - sigma_s1
      with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        lambda_s1 = np.log(alpha_s1) - np.log(sigma_s1)
      m0, m1 = model_outputs[-1], model_outputs[-2]
      h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
      r0 = h_0 / h
      d0, d1 = m0, (1.0 / r0) * (m0 - m1)
      prev = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * d0 \
          - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
    if lower_order_nums < order:  # update_lower_order
      lower_order_nums += 1
    z = prev
    zs.append(z)
  return np.stack(zs)


_W = np.random.RandomState(0).randn(6, 6) / np.sqrt(6)


def _field_np(x, t):
  return np.tanh(x @ _W) * (0.5 + t) + 0.3 * np.sin(3.0 * x) * t - 0.2 * x


def _field_jax(x, t):
  t = t[:, None]
  v = jnp.tanh(x @ jnp.asarray(_W, jnp.float32)) * (0.5 + t) + 0.3 * jnp.sin(3.0 * x) * t - 0.2 * x
  return v, {"n": jnp.linalg.norm(v, axis=1)}


@pytest.mark.parametrize("grid_name", ["diffusers_10", "linear_10", "starts_below_one_7", "diffusers_3", "two", "one"])
def test_dpm2_matches_the_reference_transcription(grid_name):
  grid = {"diffusers_10": lambda: schedules.sampling_grid(10, 3.0, kind="diffusers"),
          "linear_10": lambda: schedules.sampling_grid(10, 3.0),
          "starts_below_one_7": lambda: jnp.asarray([0.97, 0.9, 0.8, 0.6, 0.45, 0.3, 0.12, 0.0], jnp.float32),
          "diffusers_3": lambda: schedules.sampling_grid(3, 3.0, kind="diffusers"),
          "two": lambda: schedules.sampling_grid(2, 3.0), "one": lambda: schedules.sampling_grid(1)}[grid_name]()
  x1 = np.random.RandomState(1).randn(5, 6).astype(np.float32)
  traj = _dpm2_jit(jnp.asarray(x1), grid)
  want = _reference_dpm2(_field_np, x1.astype(np.float64), np.asarray(grid))
  np.testing.assert_allclose(traj.xs, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(traj.log_probs, 0.0)
  k = grid.shape[0] - 1
  assert traj.log_probs.shape == (k, 5) and traj.aux["n"].shape == (k, 5)
  np.testing.assert_allclose(traj.aux["n"][0], np.linalg.norm(_field_np(x1.astype(np.float64), float(grid[0])), axis=1),
                             rtol=1e-5)


_dpm2_jit = jax.jit(lambda x, g: samplers.sample(_field_jax, x, g, solver="dpm2"))


def test_dpm2_differs_from_euler_and_is_more_accurate_on_a_gaussian_flow():
  """For x0 ~ N(0, s^2) the exact flow map sends x1 to s x1; second order beats Euler at 10 unshifted steps.
  (Not on the diffusers grid, whose last second-order step jumps to t = 0.009 with a large log-SNR step.)"""
  s = 0.5

  def vel(x, t):
    t = t[:, None]
    return (t - (1 - t) * s ** 2) / ((1 - t) ** 2 * s ** 2 + t ** 2) * x, {}
  grid = schedules.sampling_grid(10)
  x1 = jax.random.normal(jax.random.PRNGKey(0), (64, 1))
  err = {sv: float(jnp.max(jnp.abs(samplers.sample(vel, x1, grid, solver=sv).xs[-1] - s * x1)))
         for sv in ("euler", "dpm2")}
  assert err["dpm2"] < 0.2 * err["euler"], err


@pytest.mark.parametrize("solver", ["euler", "dpm2"])
@pytest.mark.parametrize("kind", ["linear", "diffusers"])
def test_both_solvers_are_exact_on_a_straight_flow(solver, kind):
  x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
  eps = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 1))
  grid = schedules.sampling_grid(9, shift=3.0, kind=kind)
  traj = samplers.sample(lambda x, t: (eps - x0, {}), eps, grid, solver=solver)
  np.testing.assert_allclose(traj.xs[-1], x0, atol=1e-5)
  want = (1 - grid[:, None, None, None, None]) * x0 + grid[:, None, None, None, None] * eps  # on the path all along
  np.testing.assert_allclose(traj.xs, want, atol=1e-5)


def test_dpm2_refuses_noise_and_unknown_solvers():
  grid = schedules.sampling_grid(4)
  with pytest.raises(ValueError, match="dpm2.*deterministic.*noise_level=0.7"):
    samplers.sample(lambda x, t: (x, {}), jnp.ones((2, 3)), grid, jax.random.PRNGKey(0), noise_level=0.7,
                    solver="dpm2")
  with pytest.raises(ValueError, match="unknown sampler solver"):
    samplers.sample(lambda x, t: (x, {}), jnp.ones((2, 3)), grid, solver="heun")
