"""Quality at matched reward (analysis/matched.py): interpolation along the base run's eval history and the paired
bootstrap over eval samples."""

import numpy as np
import pytest

from normguard_jax.analysis import matched
from normguard_jax.analysis import quality as quality_lib

N, F = 60, 4
ITS = [0, 25, 50, 75, 100]


def _linear_history(rng, slope=0.1, q_slope=-0.02):
  """Per-sample reward a_i + slope * it and proxy c_i + q_slope * it: every resample's match is exact."""
  a, c = rng.randn(N), rng.randn(N)
  base = [{"reward": a + slope * it, "q": c + q_slope * it, "features": rng.randn(N, F) + 0.01 * it} for it in ITS]
  return a, c, base


def test_linear_histories_give_the_exact_match_and_an_interval_that_covers_it():
  rng = np.random.RandomState(0)
  a, c, base = _linear_history(rng)
  r_ng = a + 0.1 * 62.0 + 0.05 * rng.randn(N)
  ng = {"reward": r_ng, "q": c + 0.3, "features": rng.randn(N, F)}
  out = matched.matched_reward(ng, base, ITS, n_boot=400, seed=1)
  it_star = (r_ng.mean() - a.mean()) / 0.1
  assert out["status"] == "matched" and out["iteration"] == pytest.approx(it_star, rel=1e-12)
  assert out["base"]["q"] == pytest.approx(c.mean() - 0.02 * it_star, rel=1e-12)
  assert out["diff"]["q"] == pytest.approx(0.3 + 0.02 * it_star, abs=1e-12)
  assert out["diff"]["reward"] == pytest.approx(0.0, abs=1e-12)
  assert out["ci"]["reward"] == pytest.approx([0.0, 0.0], abs=1e-12)
  # per resample, diff_q = 0.3 + 0.02 it*_b exactly; the noise in r_ng makes it*_b vary: the interval has width
  # and covers the point estimate
  lo, hi = out["ci"]["q"]
  assert lo < out["diff"]["q"] < hi and hi - lo > 0 and out["sd"]["q"] > 0
  assert out["iteration_ci"][0] < out["iteration"] < out["iteration_ci"][1]
  assert out["n_unmatched"] == 0 and out["n"] == N and out["base_iterations"] == [float(i) for i in ITS]
  assert "features" not in out["diff"]  # (N, F) arrays feed set statistics only


def test_interval_covers_the_true_difference_in_a_noisy_case():
  """The true matched difference is 0.5 (NG's proxy is the base run's plus 0.5 at equal reward); 40 noisy
  replications of the eval set, 95% intervals. Over 200 replications they cover it 91% of the time (a percentile
  interval of a mean of 60 samples); intervals half as wide would cover about 68%."""
  cover = 0
  for rep in range(40):
    rng = np.random.RandomState(100 + rep)
    a, c = rng.randn(N), rng.randn(N)
    base = [{"reward": a + 0.1 * it, "q": c - 0.02 * it + 0.1 * rng.randn(N)} for it in ITS]
    ng = {"reward": a + 6.0, "q": c - 0.02 * 60 + 0.5 + 0.1 * rng.randn(N)}
    out = matched.matched_reward(ng, base, ITS, n_boot=300, seed=rep)
    cover += out["ci"]["q"][0] <= 0.5 <= out["ci"]["q"][1]
  assert cover >= 32


def test_set_statistics_are_interpolated_like_means():
  rng = np.random.RandomState(2)
  a, c, base = _linear_history(rng)
  fr = quality_lib.FrechetToReference(rng.randn(200, F))
  ng = {"reward": a + 0.1 * 40.0, "q": c, "features": rng.randn(N, F)}
  out = matched.matched_reward(ng, base, ITS, set_stats={"fid": ("features", fr)}, n_boot=200)
  # r* = mean(a) + 4 exactly at iteration 40: between the evals at 25 and 50, alpha = 0.6
  assert out["iteration"] == pytest.approx(40.0, abs=1e-9)
  want = fr(base[1]["features"]) + 0.6 * (fr(base[2]["features"]) - fr(base[1]["features"]))
  assert out["base"]["fid"] == pytest.approx(want, rel=1e-12)
  assert out["ng"]["fid"] == pytest.approx(fr(ng["features"]), rel=1e-12)
  assert out["ci"]["fid"][0] < out["ci"]["fid"][1] and np.isfinite(out["sd"]["fid"])


def test_first_crossing_is_used_when_the_base_reward_is_not_monotone():
  k, alpha, ok = matched.crossing([0, 10, 20, 30], np.array([0.0, 1.0, 0.0, 2.0]), np.array(0.5))
  assert ok and k == 0 and alpha == pytest.approx(0.5)
  k, alpha, ok = matched.crossing([0, 10, 20], np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 3.0]]), np.array([1.0, 2.0]))
  assert ok.tolist() == [True, True] and k.tolist() == [0, 1] and alpha.tolist() == pytest.approx([1.0, 0.5])


def test_reward_outside_the_base_range_is_reported_not_clamped():
  rng = np.random.RandomState(3)
  a, c, base = _linear_history(rng)
  for shift, status in ((0.1 * 100 + 1.0, "above_base_range"), (-1.0, "below_base_range")):
    out = matched.matched_reward({"reward": a + shift, "q": c, "features": rng.randn(N, F)}, base, ITS, n_boot=50)
    assert out["status"] == status
    assert out["base"] is None and out["diff"] is None and out["ci"] is None and out["iteration"] is None
    assert out["ng"]["q"] == pytest.approx(c.mean())


def test_resamples_without_a_match_are_counted_and_left_out():
  rng = np.random.RandomState(4)
  a, c, base = _linear_history(rng)
  ng = {"reward": a + 0.1 * 100 - 1e-3 + 0.5 * rng.randn(N), "q": c}  # at the top edge of the base range
  ng["reward"] += (a + 0.1 * 100 - 1e-3).mean() - ng["reward"].mean()
  out = matched.matched_reward(ng, base, ITS, n_boot=200)
  assert out["status"] == "matched" and 0 < out["n_unmatched"] < 200 and np.all(np.isfinite(out["ci"]["q"]))


def test_bootstrap_is_deterministic_given_the_seed_and_respects_strata():
  rng = np.random.RandomState(5)
  a, c, base = _linear_history(rng)
  ng = {"reward": a + 5.0 + 0.2 * rng.randn(N), "q": c + 0.1 * rng.randn(N)}
  strata = np.repeat(np.arange(6), 10)
  one = matched.matched_reward(ng, base, ITS, n_boot=100, seed=7, strata=strata)
  assert one == matched.matched_reward(ng, base, ITS, n_boot=100, seed=7, strata=strata)
  assert one["ci"] != matched.matched_reward(ng, base, ITS, n_boot=100, seed=8, strata=strata)["ci"]
  idx = matched._resample_indices(np.random.default_rng(0), N, 50, strata)
  assert np.all(strata[idx] == strata[None])  # every resample keeps the class composition


def test_bad_inputs_name_the_problem():
  rng = np.random.RandomState(6)
  a, c, base = _linear_history(rng)
  ng = {"reward": a + 3.0, "q": c}
  with pytest.raises(ValueError, match="at least 2"):
    matched.matched_reward(ng, base[:1], ITS[:1])
  with pytest.raises(ValueError, match="increase"):
    matched.matched_reward(ng, base, ITS[::-1])
  with pytest.raises(ValueError, match="'q'"):
    matched.matched_reward(ng, [{"reward": e["reward"]} for e in base], ITS)
  with pytest.raises(ValueError, match="strata"):
    matched.matched_reward(ng, base, ITS, strata=np.zeros(3))


def test_seed_summary_gives_mean_sd_and_counts_missing_values():
  per_seed = [{"rho_end": 1.0, "diff": {"fid": -1.0, "q": None}},
              {"rho_end": 1.2, "diff": {"fid": -3.0, "q": 0.5}},
              {"rho_end": 1.1, "diff": {"fid": float("nan")}, "curve": [1, 2]}]
  s = matched.seed_summary(per_seed)
  assert set(s) == {"rho_end", "diff.fid", "diff.q"}
  assert s["rho_end"]["mean"] == pytest.approx(1.1) and s["rho_end"]["sd"] == pytest.approx(0.1)
  assert s["diff.fid"] == {"mean": -2.0, "sd": pytest.approx(np.sqrt(2.0)), "n": 2, "missing": 1,
                           "values": [-1.0, -3.0, None]}
  assert s["diff.q"]["n"] == 1 and s["diff.q"]["sd"] is None and s["diff.q"]["missing"] == 2
