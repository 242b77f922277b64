"""Tier 1: time grids, shifts and training-timestep samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax.flow import schedules


def test_static_shift_known_values_and_endpoints():
  t = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(schedules.shift_time(t, 3.0), [0.0, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(schedules.shift_time(t, 1.0), t)


def test_flux_shift_mu_zero_is_identity_and_mu_positive_pushes_to_noise():
  t = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(schedules.flux_time_shift(t, 0.0), t, atol=1e-6)
  shifted = schedules.flux_time_shift(t, 1.0)
  assert np.all(np.asarray(shifted[1:-1]) > np.asarray(t[1:-1]))
  # exp(mu) / (exp(mu) + 1/t - 1) at t = 0.5, mu = 1: e / (e + 1)
  np.testing.assert_allclose(shifted[5], np.e / (np.e + 1), rtol=1e-6)


def test_flux_mu_is_linear_between_anchors():
  assert schedules.flux_mu(256) == pytest.approx(0.5)
  assert schedules.flux_mu(4096) == pytest.approx(1.15)


def test_sampling_grid_descends_from_one_to_zero():
  g = schedules.sampling_grid(10, shift=3.0)
  assert g.shape == (11,)
  assert g[0] == 1.0 and g[-1] == 0.0
  assert np.all(np.diff(np.asarray(g)) < 0)
  with pytest.raises(ValueError):
    schedules.sampling_grid(0)


def test_train_t_samplers_ranges():
  key = jax.random.PRNGKey(0)
  u = schedules.sample_train_t(key, (4000,), "uniform", t_min=0.2, t_max=0.6)
  assert float(u.min()) >= 0.2 and float(u.max()) <= 0.6
  ln = schedules.sample_train_t(key, (4000,), "logit_normal")
  assert 0.0 < float(ln.min()) and float(ln.max()) < 1.0
  assert abs(float(jnp.median(ln)) - 0.5) < 0.03  # sigmoid(N(0, 1)) has median 1/2
  with pytest.raises(ValueError, match="unknown train t sampler"):
    schedules.sample_train_t(key, (3,), "cosine")


def test_grid_indices_are_stratified_and_permuted():
  idx = np.asarray(schedules.sample_grid_indices(jax.random.PRNGKey(1), 64, 10, 3, fraction=0.9))
  assert idx.shape == (3, 64)
  usable = 9
  edges = np.linspace(0, usable, 4)
  for b in range(64):  # each sample gets exactly one index from each stratum
    strata = sorted(np.searchsorted(edges, idx[:, b], side="right") - 1)
    assert strata == [0, 1, 2]
  assert not np.all(idx[0] <= idx[1])  # order is shuffled per sample
  with pytest.raises(ValueError, match="exceeds"):
    schedules.sample_grid_indices(jax.random.PRNGKey(1), 4, 10, 10, fraction=0.9)


def test_forward_noise_interpolates():
  x0, eps = jnp.ones((2, 3)), -jnp.ones((2, 3))
  x = schedules.forward_noise(x0, eps, jnp.array([0.0, 0.25]))
  np.testing.assert_allclose(x, [[1, 1, 1], [0.5, 0.5, 0.5]])
