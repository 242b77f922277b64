"""Quality at matched reward: the paper's "not explained by early stopping" check, computed (issue 16).

A NormGuard run ends at eval reward r*. The base run of the same method, stopped early where its eval reward first
reached r*, is the comparison that early stopping would give. Along the base run's eval history (iterations
it_0 < ... < it_{K-1}, mean eval rewards r_k) take the first segment [k, k+1] with r* between r_k and r_{k+1},

    alpha = (r* - r_k) / (r_{k+1} - r_k),   it_match = it_k + alpha (it_{k+1} - it_k),
    q_base(r*) = q_k + alpha (q_{k+1} - q_k)     for every proxy q (a mean, or a set statistic such as an FID),

i.e. linear interpolation in the iteration, the same alpha for the reward and the proxies. The difference
q_NG - q_base(r*) is the matched comparison. If r* lies outside [min_k r_k, max_k r_k], the base run never had
that reward at an eval: there is no match, and the result says on which side (``status``) instead of clamping,
which would compare at a different reward.

Uncertainty: a paired bootstrap over eval samples. Every run and every eval scores the same eval set with the
same initial noise, so one resample of sample indices (with replacement; within each stratum when ``strata``,
e.g. the class labels, is given, as the eval set fixes its class composition) applies to the NormGuard eval and
to every base eval at once. Each resample recomputes the means and set statistics, re-finds the crossing and
re-interpolates; the interval is the percentile interval of the resampled differences. Resamples where r* leaves
the base range are counted (``n_unmatched``) and left out. Set statistics computed on a resample drawn with
replacement are biased (the duplicates shrink the covariance: an FID rises); for the difference of two of them
the percentile interval's coverage was checked by simulation on perturbed real digits (100 samples, FID in
analysis/quality.py's features): 0.88-0.95 at nominal 0.95, over four perturbation pairs, 100-200 repetitions
each. ``sd`` (the bootstrap standard deviation) is reported alongside.

Pure numpy; deterministic given ``seed``.
"""

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

SetStats = Mapping[str, Tuple[str, Callable[[np.ndarray], np.ndarray]]]


def crossing(iterations, rewards, target):
  """First segment of the piecewise-linear curve (iterations, rewards) that reaches ``target``.

  Vectorised over trailing axes: ``rewards`` (K, ...) and ``target`` (...). Returns (k (...) int, alpha (...),
  matched (...) bool): the match lies at iteration it_k + alpha (it_{k+1} - it_k); where ``matched`` is False,
  k = 0 and alpha = nan. A flat segment at the target gives alpha = 0."""
  r = np.asarray(rewards, np.float64)
  t = np.asarray(target, np.float64)
  lo, hi = np.minimum(r[:-1], r[1:]), np.maximum(r[:-1], r[1:])
  ok = (lo <= t) & (t <= hi)
  matched = ok.any(0)
  k = np.argmax(ok, axis=0)
  r0 = np.take_along_axis(r[:-1], k[None], 0)[0]
  r1 = np.take_along_axis(r[1:], k[None], 0)[0]
  denom = r1 - r0
  alpha = np.where(denom != 0, (t - r0) / np.where(denom != 0, denom, 1.0), 0.0)
  return k, np.where(matched, alpha, np.nan), matched


def _resample_indices(rng, n, n_boot, strata):
  if strata is None:
    return rng.integers(0, n, size=(n_boot, n))
  strata = np.asarray(strata)
  if strata.shape != (n,):
    raise ValueError(f"matched_reward: strata must be ({n},) labels, one per eval sample, got shape {strata.shape}")
  idx = np.empty((n_boot, n), np.int64)
  for s in np.unique(strata):
    members = np.flatnonzero(strata == s)
    idx[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
  return idx


def _check_inputs(ng, base_evals, base_iterations, reward_key, set_stats):
  if len(base_evals) != len(base_iterations):
    raise ValueError(f"matched_reward: {len(base_evals)} base evals but {len(base_iterations)} iterations")
  if len(base_evals) < 2:
    raise ValueError("matched_reward: the base run's eval history needs at least 2 evals to interpolate")
  its = np.asarray(base_iterations, np.float64)
  if np.any(np.diff(its) <= 0):
    raise ValueError(f"matched_reward: base_iterations must increase strictly, got {its.tolist()}")
  if reward_key not in ng:
    raise ValueError(f"matched_reward: the NormGuard eval has no per-sample {reward_key!r}")
  n = len(np.asarray(ng[reward_key]))
  feature_keys = {key for key, _ in set_stats.values()}
  for key in feature_keys:
    if key not in ng:
      raise ValueError(f"matched_reward: set statistic input {key!r} is missing from the NormGuard eval")
  means = sorted(k for k, v in ng.items() if np.ndim(v) == 1 and k not in feature_keys)
  for i, e in enumerate(base_evals):
    for key in [*means, *feature_keys]:
      if key not in e:
        raise ValueError(f"matched_reward: base eval at iteration {base_iterations[i]} has no per-sample {key!r}")
      if np.shape(e[key]) != np.shape(ng[key]):
        raise ValueError(f"matched_reward: {key!r} has shape {np.shape(e[key])} in the base eval at iteration "
                         f"{base_iterations[i]} but {np.shape(ng[key])} in the NormGuard eval")
    if len(np.asarray(e[reward_key])) != n:
      raise ValueError("matched_reward: every eval must score the same number of samples")
  return its, n, means, sorted(feature_keys)


def matched_reward(ng: Mapping[str, np.ndarray], base_evals: Sequence[Mapping[str, np.ndarray]],
                   base_iterations: Sequence[float], *, set_stats: Optional[SetStats] = None,
                   reward_key: str = "reward", n_boot: int = 1000, seed: int = 0,
                   strata: Optional[np.ndarray] = None, level: float = 0.95) -> Dict:
  """The base run at the NormGuard run's final eval reward, with paired-bootstrap intervals.

  ``ng``: the NormGuard run's final eval, per sample: {key: (N,)} values, averaged (the reward, the proxies'
  per-sample values, e.g. a per-sample mean rho), and the inputs of ``set_stats`` ((N, F) features).
  ``base_evals``/``base_iterations``: the base run's evals, in order, with the same keys and shapes, row i being
  the same eval sample (prompt and initial noise) everywhere. ``set_stats``: {name: (key, fn)}, ``fn`` mapping
  (..., n, F) features to (...,) values (``DigitQuality.set_stats``). ``strata``: (N,) labels to resample within.

  Returns a JSON-ready dict: ``status`` ("matched", "above_base_range": r* is above every base eval's reward,
  "below_base_range"); ``ng_reward``; ``base_reward_range``; ``iteration`` (the interpolated base iteration);
  ``ng``, ``base`` and ``diff`` (NG - base) per metric; ``ci`` ([lo, hi] of ``diff`` at ``level``) and ``sd``;
  ``iteration_ci``; ``n``, ``n_boot``, ``n_unmatched`` (resamples without a match, left out), ``level``, ``seed``.
  Without a match, ``base``/``diff``/``ci``/``sd``/``iteration`` are None."""
  set_stats = dict(set_stats or {})
  its, n, means, feature_keys = _check_inputs(ng, base_evals, base_iterations, reward_key, set_stats)
  if not 0.0 < level < 1.0:
    raise ValueError(f"matched_reward: level must be in (0, 1), got {level}")
  names = [*means, *set_stats]
  base_vals = {k: np.stack([np.asarray(e[k], np.float64) for e in base_evals]) for k in means}  # (K, N)
  base_feats = {k: np.stack([np.asarray(e[k], np.float64) for e in base_evals]) for k in feature_keys}  # (K, N, F)
  ng_vals = {k: np.asarray(ng[k], np.float64) for k in means}
  ng_feats = {k: np.asarray(ng[k], np.float64) for k in feature_keys}

  def evaluate(idx):
    """idx (B, N) -> (ng {name: (B,)}, base {name: (B,)} (nan where unmatched), it_match (B,), matched (B,))."""
    ng_m = {k: v[idx].mean(-1) for k, v in ng_vals.items()}
    ng_m.update({name: np.asarray(fn(ng_feats[key][idx]), np.float64) for name, (key, fn) in set_stats.items()})
    base_m = {k: v[:, idx].mean(-1) for k, v in base_vals.items()}  # (K, B)
    k, alpha, ok = crossing(its, base_m[reward_key], ng_m[reward_key])
    lerp = lambda v0, v1: np.where(ok, v0 + alpha * (v1 - v0), np.nan)
    cols = np.arange(idx.shape[0])
    base = {name: lerp(v[k, cols], v[k + 1, cols]) for name, v in base_m.items()}
    sel = np.flatnonzero(ok)
    for name, (key, fn) in set_stats.items():
      out = np.full(idx.shape[0], np.nan)
      if len(sel):
        f = base_feats[key]
        v0 = np.asarray(fn(f[k[sel, None], idx[sel]]), np.float64)
        v1 = np.asarray(fn(f[k[sel, None] + 1, idx[sel]]), np.float64)
        out[sel] = v0 + alpha[sel] * (v1 - v0)
      base[name] = out
    it_match = lerp(its[k], its[np.minimum(k + 1, len(its) - 1)])
    return ng_m, base, it_match, ok

  ng0, base0, it0, ok0 = evaluate(np.arange(n)[None])
  r_base = base_vals[reward_key].mean(-1)
  r_ng = float(ng0[reward_key][0])
  result = {"status": "matched", "ng_reward": r_ng,
            "base_reward_range": [float(r_base.min()), float(r_base.max())],
            "base_iterations": its.tolist(), "iteration": None, "iteration_ci": None,
            "ng": {m: float(ng0[m][0]) for m in names}, "base": None, "diff": None, "ci": None, "sd": None,
            "n": int(n), "n_boot": int(n_boot), "n_unmatched": None, "level": float(level), "seed": int(seed)}
  if not ok0[0]:
    result["status"] = "above_base_range" if r_ng > r_base.max() else "below_base_range"
    return result
  result["iteration"] = float(it0[0])
  result["base"] = {m: float(base0[m][0]) for m in names}
  result["diff"] = {m: result["ng"][m] - result["base"][m] for m in names}
  if n_boot <= 0:
    return result
  rng = np.random.default_rng(seed)
  ngb, baseb, itb, okb = evaluate(_resample_indices(rng, n, n_boot, strata))
  q = [100.0 * (1.0 - level) / 2.0, 100.0 * (1.0 + level) / 2.0]
  result["n_unmatched"] = int((~okb).sum())
  if okb.any():
    diffs = {m: ngb[m][okb] - baseb[m][okb] for m in names}
    result["ci"] = {m: [float(v) for v in np.percentile(d, q)] for m, d in diffs.items()}
    result["sd"] = {m: float(np.std(d, ddof=1)) if len(d) > 1 else None for m, d in diffs.items()}
    result["iteration_ci"] = [float(v) for v in np.percentile(itb[okb], q)]
  return result


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "."))
    elif v is None or isinstance(v, (bool, int, float, np.integer, np.floating)):
      out[name] = None if v is None else float(v)
  return out


def seed_summary(per_seed: Sequence[Mapping]) -> Dict[str, Dict]:
  """Mean ± sd across seeds of every number in ``per_seed`` (one dict per seed: e.g. a run's end metrics, or a
  :func:`matched_reward` result's ``diff``; nested dicts are flattened to "a.b" names, lists are skipped).

  Returns {name: {"mean", "sd" (ddof 1; None under 2 values), "n" (seeds with a finite value), "missing" (seeds
  with None, NaN or no such key), "values" (per seed, None where missing)}}."""
  flat = [_flatten(d) for d in per_seed]
  names = sorted({k for f in flat for k in f})
  out = {}
  for name in names:
    values = [f.get(name) for f in flat]
    values = [None if v is None or not math.isfinite(v) else v for v in values]
    present = np.array([v for v in values if v is not None], np.float64)
    out[name] = {"mean": float(present.mean()) if len(present) else None,
                 "sd": float(present.std(ddof=1)) if len(present) > 1 else None,
                 "n": int(len(present)), "missing": int(len(values) - len(present)), "values": values}
  return out
