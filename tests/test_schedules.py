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


# ---------------------------------------------------------------------------------------------------------------
# Grid kinds, FLUX.2 mu and the training-timestep rules (torch/diffusers parity lives in test_reference_parity.py)
# ---------------------------------------------------------------------------------------------------------------

def test_diffusers_grid_values_and_linear_default_unchanged():
  g = np.asarray(schedules.sampling_grid(10, shift=3.0, kind="diffusers"))
  np.testing.assert_allclose(g[-4:], [0.46487603, 0.27804878, 0.00892857, 0.0], atol=1e-6)  # recipe_fidelity (a)
  assert g[0] == 1.0 and np.all(np.diff(g) < 0)
  np.testing.assert_array_equal(schedules.sampling_grid(10, 3.0), schedules.sampling_grid(10, 3.0, kind="linear"))
  np.testing.assert_allclose(schedules.sampling_grid(10, 3.0)[-4:], [0.5625, 0.4286, 0.25, 0.0], atol=1e-4)
  np.testing.assert_array_equal(schedules.sampling_grid(1, 3.0, kind="diffusers"), [1.0, 0.0])
  with pytest.raises(ValueError, match="grid kind"):
    schedules.sampling_grid(10, 3.0, kind="karras")


def test_flux2_klein_mu_and_grid_at_384_8_steps():
  """Issue 12 item 5: klein at 384^2 (576 tokens) and 8 steps has mu 1.963 and this grid (FLUX.1's mu: 0.554)."""
  mu = schedules.flux2_empirical_mu(576, 8)
  assert mu == pytest.approx(1.963, abs=5e-4)
  np.testing.assert_allclose(schedules.sampling_grid(8, mu=mu), [1, .980, .955, .922, .877, .810, .704, .504, 0],
                             atol=6e-4)
  assert schedules.flux_mu(576) == pytest.approx(0.554, abs=5e-4)
  assert schedules.flux2_empirical_mu(5000, 8) == pytest.approx(0.00016927 * 5000 + 0.45666666)  # > 4300 tokens


def test_index_fraction_rule_is_todays_sampler():
  key = jax.random.PRNGKey(5)
  want = schedules.sample_grid_indices(key, 12, 10, 3, fraction=0.9)
  got = schedules.sample_train_indices(key, 10, None, 12, 3, rule="index_fraction", fraction=0.9)
  np.testing.assert_array_equal(got, want)
  assert got.dtype == jnp.int32 and got.shape == (3, 12)


def _freqs(idx, k):
  return np.bincount(np.asarray(idx).ravel(), minlength=k) / np.asarray(idx).size


@pytest.mark.parametrize("rule,fraction", [("index_range", 0.9), ("index_range_wo_init", 0.9), ("value_range", 0.5),
                                           ("value_range_wo_init", 0.9)])
def test_stratified_rules_draw_each_stratum_uniformly(rule, fraction):
  """Exact enumeration: row j is uniform on [lower_j, upper_j) (lower_j when empty), and the support is the window."""
  k, t_count = 14, 6
  grid = schedules.sampling_grid(k, 3.0)
  lower, upper = schedules.train_index_strata(k, grid, t_count, rule=rule, fraction=fraction)
  idx = np.asarray(schedules.sample_train_indices(jax.random.PRNGKey(0), k, grid, 6000, t_count, rule=rule,
                                                  fraction=fraction))
  for j in range(t_count):
    want = np.zeros(k)
    if upper[j] > lower[j]:
      want[lower[j]:upper[j]] = 1.0 / (upper[j] - lower[j])
    else:
      want[lower[j]] = 1.0
    np.testing.assert_allclose(_freqs(idx[j], k), want, atol=0.03, err_msg=f"stratum {j}")
  assert tuple(np.unique(idx)) == schedules.train_index_window(k, grid, t_count, rule=rule, fraction=fraction)


def test_random_subset_is_a_uniform_ordered_subset_per_sample():
  """Official NFT: a random permutation of the K steps per sample, the first T trained. K = 4, T = 2: each of the
  12 ordered pairs of distinct steps has probability 1/12."""
  idx = np.asarray(schedules.sample_train_indices(jax.random.PRNGKey(1), 4, None, 12000, 2, rule="random_subset"))
  assert np.all(idx[0] != idx[1])
  pairs = np.bincount(idx[0] * 4 + idx[1], minlength=16).reshape(4, 4) / idx.shape[1]
  np.testing.assert_allclose(pairs, (1 - np.eye(4)) / 12, atol=0.01)
  nine = np.asarray(schedules.sample_train_indices(jax.random.PRNGKey(2), 10, None, 64, 9, rule="random_subset"))
  assert all(len(set(nine[:, b])) == 9 for b in range(64))
  assert schedules.train_index_window(10, None, 9, rule="random_subset") == tuple(range(10))
  with pytest.raises(ValueError, match="exceeds"):
    schedules.sample_train_indices(jax.random.PRNGKey(2), 10, None, 4, 11, rule="random_subset")


@pytest.mark.parametrize("rule", ["index_fraction", "value_range", "random_subset"])
def test_share_rows_blocks_share_one_draw(rule):
  grid = schedules.sampling_grid(10, 3.0)
  idx = np.asarray(schedules.sample_train_indices(jax.random.PRNGKey(3), 10, grid, 32, 4, rule=rule, fraction=0.9,
                                                  share_rows=8))
  blocks = idx.reshape(4, 4, 8)
  assert np.all(blocks == blocks[:, :, :1])  # every row of a block has the block's draw
  assert len({blocks[:, b, 0].tobytes() for b in range(4)}) > 1  # blocks draw independently
  with pytest.raises(ValueError, match="share_rows"):
    schedules.sample_train_indices(jax.random.PRNGKey(3), 10, grid, 30, 4, rule=rule, fraction=0.9, share_rows=8)


def test_value_rules_need_a_concrete_grid_and_clear_errors():
  grid = schedules.sampling_grid(10, 3.0)
  with pytest.raises(ValueError, match="concrete sampling grid"):
    jax.jit(lambda g: schedules.sample_train_indices(jax.random.PRNGKey(0), 10, g, 4, 2, rule="value_range",
                                                     fraction=0.5))(grid)
  # a concrete grid closed over by a jitted function is fine
  out = jax.jit(lambda k: schedules.sample_train_indices(k, 10, grid, 4, 2, rule="value_range", fraction=0.5))(
      jax.random.PRNGKey(0))
  assert out.shape == (2, 4)
  with pytest.raises(ValueError, match="training-timestep rule"):
    schedules.sample_train_indices(jax.random.PRNGKey(0), 10, grid, 4, 2, rule="discrete")
  with pytest.raises(ValueError, match="need the sampling grid"):
    schedules.sample_train_indices(jax.random.PRNGKey(0), 10, None, 4, 2, rule="value_range", fraction=0.5)
  with pytest.raises(ValueError, match="leaves no"):  # only t = 1 is in a 1% window; wo_init drops it
    schedules.train_index_strata(10, grid, 2, rule="value_range_wo_init", fraction=0.01)


# The windows of our recipes' settings against the references (recipe_fidelity.md, "Mismatches" item 1): the
# sampler steps each rule can train on, as t = grid[i] from the largest index to index 0's end of the window.
def _seq(res):
  return (res // 16) ** 2


WINDOWS = [  # (recipe, grid, K, T, rule, fraction, (t_min, t_max))
    ("sd35_nft FF 14 steps", lambda: schedules.sampling_grid(14, 3.0), 14, 4, "value_range", 0.5, (0.625, 1.0)),
    ("sd35_nft FF on 10 steps", lambda: schedules.sampling_grid(10, 3.0), 10, 4, "value_range", 0.5, (0.667, 1.0)),
    ("sd35_nft official", lambda: schedules.sampling_grid(10, 3.0, kind="diffusers"), 10, 9, "random_subset", 0.99,
     (0.009, 1.0)),
    ("sd35_nft ours", lambda: schedules.sampling_grid(10, 3.0), 10, 4, "index_fraction", 0.5, (0.818, 1.0)),
    ("sd35_awm official", lambda: schedules.sampling_grid(14, 3.0, kind="diffusers"), 14, 6, "index_range", 0.9,
     (0.357, 1.0)),
    ("sd35_awm FF", lambda: schedules.sampling_grid(14, 3.0), 14, 6, "value_range_wo_init", 0.9, (0.333, 0.975)),
    ("sd35_awm ours", lambda: schedules.sampling_grid(10, 3.0), 10, 6, "index_fraction", 0.9, (0.429, 1.0)),
    ("flux1_nft FF", lambda: schedules.sampling_grid(8, mu=schedules.flux_mu(_seq(384))), 8, 2, "value_range", 0.7,
     (0.511, 1.0)),
    ("flux1_awm FF", lambda: schedules.sampling_grid(10, mu=schedules.flux_mu(_seq(512))), 10, 4, "value_range",
     0.7, (0.446, 1.0)),
    ("flux2_nft FF", lambda: schedules.sampling_grid(8, mu=schedules.flux2_empirical_mu(_seq(384), 8)), 8, 2,
     "value_range", 0.5, (0.704, 1.0)),
    ("flux2_awm FF", lambda: schedules.sampling_grid(8, mu=schedules.flux2_empirical_mu(_seq(384), 8)), 8, 4,
     "value_range_wo_init", 0.7, (0.704, 0.980)),
]


@pytest.mark.parametrize("name,grid_fn,k,t_count,rule,fraction,want", WINDOWS, ids=[w[0] for w in WINDOWS])
def test_recipe_windows_match_the_audit(name, grid_fn, k, t_count, rule, fraction, want):
  grid = np.asarray(grid_fn())
  w = schedules.train_index_window(k, grid, t_count, rule=rule, fraction=fraction)
  assert w == tuple(range(w[0], w[-1] + 1)), name
  np.testing.assert_allclose((grid[w[-1]], grid[w[0]]), want, atol=6e-4, err_msg=name)
