"""Tier 5: a few RL iterations of the tiny default, end to end, and the fault paths of the loop."""

import json
import os

import jax.numpy as jnp
import pytest

from normguard_jax import config as config_lib
from normguard_jax.rewards import api as reward_api
from normguard_jax.train import loop

CFG = "configs/tiny_digits.py:smoke"


def _cfg(tmp_path, *overrides):
  cfg = config_lib.load(CFG)
  return config_lib.apply_overrides(cfg, [f"pretrain.cache_dir={tmp_path / 'cache'}", *overrides])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("smoke")
  cfg = _cfg(tmp, "rl.methods=nft,awm,dpo,grpo", "rl.normguard=off,on")
  report = loop.run(cfg, str(tmp / "work"))
  return tmp, report


def test_smoke_run_writes_the_full_report(smoke_run):
  tmp, report = smoke_run
  work = tmp / "work"
  names = [r["name"] for r in report["runs"]]
  assert names == ["nft_base", "nft_ng", "awm_base", "awm_ng", "dpo_base", "dpo_ng", "grpo_base", "grpo_ng"]
  for r in report["runs"]:
    assert r["status"] == "ok", r
    assert len(r["rho_per_step_end"]) == 10
    for key in ("reward_start", "reward_end", "mean_rho_end"):
      assert jnp.isfinite(r[key])
    assert set(r["quality_end"]) == {"class_conf", "nn_dist", "frechet", "out_of_range"}
  on_disk = json.loads((work / "report.json").read_text())
  assert [r["name"] for r in on_disk["runs"]] == names
  for f in ("reward_curve.png", "rho_per_step.png", "reward_vs_quality.png", "samples_reference.png",
            "samples_nft_ng.png", "config.json"):
    assert (work / f).stat().st_size > 0, f
  lines = (work / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()
  train = [json.loads(l) for l in lines if "train/loss" in l]
  assert len(train) == 3 and all("train/ng_active_frac" in t and "train/ng_lambda" in t for t in train)
  assert all(t["train/ng_lambda"] == 1.0 for t in train)
  assert os.listdir(work / "runs" / "nft_ng" / "tb")


def test_normguard_off_and_on_start_from_matched_rollouts(smoke_run):
  _, report = smoke_run
  runs = {r["name"]: r for r in report["runs"]}
  assert runs["nft_base"]["reward_start"] == runs["nft_ng"]["reward_start"]


def test_second_run_reuses_the_cached_reference(smoke_run):
  tmp, report = smoke_run
  assert report["pretrain"]["cached"] is False
  cfg = _cfg(tmp, "rl.iterations=1", "rl.normguard=on")
  again = loop.run(cfg, str(tmp / "work2"))
  assert again["pretrain"]["cached"] is True
  assert again["pretrain"]["cache"] == report["pretrain"]["cache"]
  assert again["reference"]["reward"] == report["reference"]["reward"]


def test_corrupt_cache_is_rebuilt_not_trusted(tmp_path):
  cfg = _cfg(tmp_path, "rl.iterations=1", "rl.normguard=on", "pretrain.steps=5")
  first = loop.run(cfg, str(tmp_path / "a"))
  cache = first["pretrain"]["cache"]
  for root, _, files in os.walk(cache):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  second = loop.run(cfg, str(tmp_path / "b"))
  assert second["pretrain"]["cached"] is False
  assert second["reference"]["reward"] == pytest.approx(first["reference"]["reward"], rel=1e-5)


def test_nan_reward_marks_the_run_diverged_and_keeps_the_others(tmp_path, monkeypatch):
  calls = {"n": 0}
  def nan_after_eval(images, cond):
    calls["n"] += 1
    x = jnp.mean(images, axis=(1, 2, 3))
    return x * jnp.nan if calls["n"] == 3 else x
  monkeypatch.setitem(reward_api.REGISTRY, "contrast", nan_after_eval)
  cfg = _cfg(tmp_path, "reward.terms={'contrast': 1.0}", "rl.normguard=off,on", "pretrain.steps=5")
  report = loop.run(cfg, str(tmp_path / "w"))
  status = {r["name"]: r["status"] for r in report["runs"]}
  assert status["nft_base"] == "diverged" and "non-finite reward" in report["runs"][0]["error"]
  assert status["nft_ng"] == "ok"
  assert (tmp_path / "w" / "report.json").exists()
  assert (tmp_path / "w" / "runs" / "nft_base" / "metrics.jsonl").exists()
