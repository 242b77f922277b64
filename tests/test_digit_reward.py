"""The digits' learned reward (rewards/digit_classifier.py), its split from the quality proxies (data/digits.py),
and the proxies' per-sample form (analysis/quality.py)."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from scipy import linalg

from normguard_jax.analysis import quality as quality_lib
from normguard_jax.data import digits
from normguard_jax.rewards import api as reward_api
from normguard_jax.rewards import digit_classifier as dc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One training of the default reward for the module (seconds), in a fresh cache."""
  root = tmp_path_factory.mktemp("reward_cache")
  params, temperature, info = dc.load_or_train(str(root), seed=0, part="A")
  return root, params, temperature, info


@pytest.fixture(scope="module")
def quality():
  return quality_lib.digit_quality(0)


def test_split_is_fixed_disjoint_covering_and_stratified():
  parts = digits.split_indices()
  a, b = parts["A"], parts["B"]
  _, labels = digits.load_digits()
  assert not set(a.tolist()) & set(b.tolist())
  assert np.array_equal(np.sort(np.concatenate([a, b])), np.arange(len(labels)))
  assert np.all(np.abs(np.bincount(labels[a]) - np.bincount(labels[b])) <= 1)
  assert a[:8].tolist() == [1, 3, 7, 8, 9, 10, 11, 13]  # frozen: RandomState(0) never changes its stream
  xa, ya = digits.load_digits("A")
  assert xa.shape == (len(a), 8, 8, 1) and np.array_equal(ya, labels[a])
  with pytest.raises(ValueError, match="part"):
    digits.load_digits("C")


def test_reward_trains_on_part_a_and_reloads_from_cache_with_the_same_scores(trained):
  root, params, temperature, info = trained
  assert info["cached"] is False and info["part"] == "A"
  assert info["n_fit"] + info["n_holdout"] == len(digits.split_indices()["A"])
  assert info["holdout_acc"] > 0.9 and 0.2 < temperature < 10.0
  params2, temperature2, info2 = dc.load_or_train(str(root), seed=0, part="A")
  assert info2["cached"] is True and info2["cache"] == info["cache"] and temperature2 == temperature
  x, y = digits.load_digits("B")
  np.testing.assert_array_equal(dc.score(params, temperature, x[:64], y[:64]),
                                dc.score(params2, temperature2, x[:64], y[:64]))


def _copy_cache(info, dst):
  path = os.path.join(str(dst), os.path.basename(info["cache"]))
  shutil.copytree(info["cache"], path)
  return path


def test_a_corrupt_cache_is_rebuilt(trained, tmp_path):
  _, params, temperature, info = trained
  path = _copy_cache(info, tmp_path)
  for dirpath, _, files in os.walk(path):  # damage every stored file: restore fails
    for f in files:
      with open(os.path.join(dirpath, f), "wb") as fh:
        fh.write(b"garbage")
  params2, temperature2, info2 = dc.load_or_train(str(tmp_path), seed=0, part="A")
  assert info2["cached"] is False and info2["cache"] == path
  x, y = digits.load_digits("B")
  np.testing.assert_allclose(dc.score(params2, temperature2, x[:64], y[:64]),
                             dc.score(params, temperature, x[:64], y[:64]), rtol=1e-4, atol=1e-4)
  assert dc.load_or_train(str(tmp_path), seed=0, part="A")[2]["cached"] is True


def test_a_readable_cache_with_altered_weights_is_rebuilt(trained, tmp_path):
  _, params, temperature, info = trained
  path = os.path.join(str(tmp_path), os.path.basename(info["cache"]))
  tree = ocp.StandardCheckpointer().restore(info["cache"])
  tree["params"] = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1.5, tree["params"])
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  params2, temperature2, info2 = dc.load_or_train(str(tmp_path), seed=0, part="A")
  assert info2["cached"] is False
  np.testing.assert_allclose(jax.tree_util.tree_leaves(params2)[0], jax.tree_util.tree_leaves(params)[0],
                             rtol=1e-4, atol=1e-5)


def test_reward_ranks_the_prompted_class_above_other_classes_and_noise(trained):
  _, params, temperature, _ = trained
  x, y = digits.load_digits("B")  # digits the reward never saw
  right = np.asarray(dc.score(params, temperature, x, y))
  wrong = np.asarray(dc.score(params, temperature, x, (y + 1 + np.arange(len(y)) % 9) % 10))
  noise = np.clip(np.random.RandomState(0).randn(*x.shape), -1, 1).astype(np.float32)
  on_noise = np.asarray(dc.score(params, temperature, noise, y))
  assert np.all(right <= 0) and right.mean() > -0.3
  assert right.mean() > on_noise.mean() + 2 and right.mean() > wrong.mean() + 5
  assert (right > wrong).mean() > 0.95 and (right > on_noise).mean() > 0.9


def test_reward_is_differentiable_and_sees_clipped_pixels(trained):
  _, params, temperature, _ = trained
  x, y = digits.load_digits("B")
  x, y = jnp.asarray(x[:16]), jnp.asarray(y[:16])
  grad = jax.jit(jax.grad(lambda im, clip: dc.score(params, temperature, im, y, clip=clip).sum()),
                 static_argnums=1)
  g = grad(x * 0.9, True)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
  over = x * 3.0  # strokes and background far past the data range
  np.testing.assert_array_equal(dc.score(params, temperature, over, y),
                                dc.score(params, temperature, jnp.clip(over, -1, 1), y))
  assert float(jnp.abs(jnp.where(jnp.abs(over) > 1, grad(over, True), 0.0)).max()) == 0.0
  assert float(jnp.abs(grad(over, False)).max()) > 0  # clip=False: the hackable variant sees raw values


def test_registered_reward_builds_once_and_checks_its_inputs(trained, monkeypatch):
  root, params, temperature, _ = trained
  calls = []
  real = dc.load_or_train
  monkeypatch.setattr(dc, "load_or_train", lambda *a, **k: calls.append(a) or real(*a, **k))
  dc.trained.cache_clear()
  opts = {"digit_classifier": {"cache_dir": str(root)}}
  fn = reward_api.make_reward({"digit_classifier": 1.0}, opts)
  reward_api.make_reward({"digit_classifier": 1.0}, opts)
  assert len(calls) == 1
  x, y = digits.load_digits("B")
  batch = reward_api.RewardBatch(jnp.asarray(x[:16]), jnp.asarray(y[:16]))
  total, parts = fn(batch)
  np.testing.assert_allclose(total, dc.score(params, temperature, x[:16], y[:16]), rtol=1e-6)
  np.testing.assert_array_equal(parts["digit_classifier"], total)
  jitted = jax.jit(lambda b: fn(b)[0])
  np.testing.assert_allclose(jitted(batch), total, rtol=1e-5)
  null = jnp.asarray(y[:16]).at[1].set(10)  # the null label: NaN under jit, an error where it can be read
  assert np.flatnonzero(np.isnan(np.asarray(jitted(reward_api.RewardBatch(batch.images, null))))).tolist() == [1]
  with pytest.raises(ValueError, match="class labels"):
    fn(reward_api.RewardBatch(batch.images, null))
  with pytest.raises(ValueError, match="unknown option"):
    reward_api.make_reward({"digit_classifier": 1.0}, {"digit_classifier": {"cache": "x"}})
  with pytest.raises(ValueError, match="'part'"):
    reward_api.make_reward({"digit_classifier": 1.0}, {"digit_classifier": {"part": "C"}})


def test_proxies_train_on_part_b_only(quality):
  xb, yb = digits.load_digits("B")
  assert np.array_equal(quality.real, xb.reshape(len(xb), -1)) and np.array_equal(quality.real_labels, yb)
  assert quality.clf.n_features_in_ == 64 and quality.clf.t_ == len(xb) * quality.clf.n_iter_  # samples seen
  real_a, _ = quality.real_digits(np.repeat(np.arange(10), 10))
  xa, _ = digits.load_digits("A")
  a_rows = {r.tobytes() for r in xa}
  assert all(r.tobytes() in a_rows for r in real_a)  # the real-data level is measured on part A


def test_proxies_per_sample_aggregate_and_real_level(quality):
  cond = np.repeat(np.arange(10), 10)
  ps = quality.real_per_sample(cond)
  assert set(ps) == {"class_conf", "class_acc", "nn_dist", "out_of_range", "features"}
  assert ps["features"].shape == (100, quality.hidden[-1]) and all(ps[k].shape == (100,) for k in quality.means)
  level = quality.real_level(cond)
  assert list(level) == list(quality_lib.DIGIT_LABELS)
  assert level["class_acc"] > 0.85 and level["out_of_range"] == 0.0 and level["nn_dist"] > 0 and level["fid"] > 0
  images, labels = quality.real_digits(cond)
  assert np.array_equal(labels, cond)
  assert quality(images, labels) == level
  idx = np.random.RandomState(0).randint(0, 100, 100)
  sub = quality.aggregate(ps, idx)
  direct = quality(images[idx], labels[idx])
  assert sub.keys() == direct.keys() and all(np.isclose(sub[k], direct[k], rtol=1e-9) for k in sub)
  assert quality.max_draws(cond) == 8
  several = quality.real_level(cond, draws=None)
  assert several["fid"] == pytest.approx(np.mean([quality.aggregate(quality.real_per_sample(cond, d))["fid"]
                                                  for d in range(8)]))
  other, _ = quality.real_digits(cond, draw=1)
  assert not {r.tobytes() for r in other} & {r.tobytes() for r in images}  # disjoint draws
  with pytest.raises(ValueError, match="part A holds"):
    quality.real_digits(cond, draw=8)
  noisy = np.clip(images + np.random.RandomState(1).randn(*images.shape), -1.5, 1.5)
  worse = quality(noisy, labels)
  assert worse["fid"] > level["fid"] and worse["class_conf"] < level["class_conf"] and worse["out_of_range"] > 0


def test_frechet_to_reference_matches_the_sqrtm_formula_and_batches():
  rng = np.random.RandomState(0)
  ref = rng.randn(300, 6) @ rng.randn(6, 6)
  sets = rng.randn(4, 50, 6) * 1.3 + 0.2
  fr = quality_lib.FrechetToReference(ref)
  for s, got in zip(sets, fr(sets)):
    ridge = 1e-6 * np.eye(6)
    ca, cb = np.cov(s, rowvar=False) + ridge, np.cov(ref, rowvar=False) + ridge
    want = np.sum((s.mean(0) - ref.mean(0)) ** 2) + np.trace(ca + cb - 2 * np.real(linalg.sqrtm(ca @ cb)))
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert fr(s) == pytest.approx(got, rel=1e-12)
  assert fr(ref) == pytest.approx(0.0, abs=1e-8)


def test_image_stats_per_sample_means_are_the_set_values():
  x = np.random.RandomState(0).randn(3, 6, 5, 3) * 0.8
  stats = quality_lib.ImageStats()
  ps = stats.per_sample(x)
  shown = np.clip((x + 1) / 2, 0, 1)
  luma = shown @ np.array([0.299, 0.587, 0.114])
  assert all(v.shape == (3,) for v in ps.values())
  assert stats(x)["out_of_range"] == pytest.approx(float((np.abs(x) > 1).mean()))
  assert stats(x)["contrast"] == pytest.approx(float(luma.reshape(3, -1).std(1).mean()))
  assert stats.aggregate(ps, [0, 0, 2])["hf_energy"] == pytest.approx((2 * ps["hf_energy"][0] + ps["hf_energy"][2]) / 3)
