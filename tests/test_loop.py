"""Tier 5: a few RL iterations of the tiny default, end to end, and the fault paths of the loop."""

import json
import os

import jax.numpy as jnp
import pytest

from normguard_jax import config as config_lib
from normguard_jax.analysis import quality as quality_lib
from normguard_jax.rewards import api as reward_api
from normguard_jax.train import loop

CFG = "configs/tiny_digits.py:smoke"


def _cfg(tmp_path, *overrides):
  """The smoke config on one device (the 8 simulated test devices would only slow the compiles)."""
  cfg = config_lib.load(CFG)
  return config_lib.apply_overrides(cfg, [f"pretrain.cache_dir={tmp_path / 'cache'}", "rl.methods=nft",
                                          "mesh.num_devices=1", *overrides])


@pytest.fixture(scope="module")
def smoke_run(digits_smoke):
  work, report, tmp = digits_smoke  # tests/conftest.py: trained once per session
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
    assert set(r["quality_end"]) == set(quality_lib.DIGIT_LABELS)
  on_disk = json.loads((work / "report.json").read_text())
  assert [r["name"] for r in on_disk["runs"]] == names
  for f in ("reward_curve.png", "rho_per_step.png", "reward_vs_quality.png", "samples_reference.png",
            "samples_nft_ng.png", "config.json"):
    assert (work / f).stat().st_size > 0, f
  lines = (work / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()
  train = [json.loads(l) for l in lines if "train/loss" in l]
  assert len(train) == 3 and all("train/ng_active_frac" in t and "train/ng_lambda" in t for t in train)
  assert train[0]["train/ng_lambda"] == 1.0  # the adaptive lambda starts at lam.value; read before the update
  assert all(t["train/ng_lambda"] >= 0.0 for t in train)
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
  def nan_after_eval(batch):
    calls["n"] += 1
    x = jnp.mean(batch.images, axis=(1, 2, 3))
    return x * jnp.nan if calls["n"] == 3 else x
  monkeypatch.setitem(reward_api.REGISTRY, "contrast", lambda options: nan_after_eval)
  cfg = _cfg(tmp_path, "reward.terms={'contrast': 1.0}", "reward.options={}", "rl.normguard=off,on", "pretrain.steps=5")
  report = loop.run(cfg, str(tmp_path / "w"))
  status = {r["name"]: r["status"] for r in report["runs"]}
  assert status["nft_base"] == "diverged" and "non-finite reward" in report["runs"][0]["error"]
  assert status["nft_ng"] == "ok"
  assert (tmp_path / "w" / "report.json").exists()
  assert (tmp_path / "w" / "runs" / "nft_base" / "metrics.jsonl").exists()


def test_full_finetuning_keeps_the_reference_in_the_state(tmp_path):
  cfg = _cfg(tmp_path, "rl.lora_rank=0", "rl.normguard=on", "pretrain.steps=5", "rl.iterations=2")
  report = loop.run(cfg, str(tmp_path / "w"))
  (run,) = report["runs"]
  assert run["status"] == "ok"
  assert run["mean_rho_start"] == pytest.approx(1.0)  # policy starts as a copy of the reference
  assert run["mean_rho_end"] != pytest.approx(1.0, abs=1e-7)  # and moves away from it


def _run_cli(workdir, cache, *extra, timeout=300):
  import subprocess
  import sys
  from tests.conftest import one_device_env
  return subprocess.Popen([sys.executable, "-m", "normguard_jax.train", "--config", CFG, "--workdir", str(workdir),
                           f"--config.pretrain.cache_dir={cache}", "--config.rl.methods=nft",
                           "--config.rl.normguard=on", "--config.rl.iterations=8", "--config.checkpoint.every=3",
                           *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_device_env())


def _final_state(workdir):
  import orbax.checkpoint as ocp
  d = workdir / "runs" / "nft_ng" / "checkpoints"
  steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
  out = ocp.CheckpointManager(str(d)).restore(steps[-1], args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  return out.state, out.meta


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
  import random
  import signal
  import time
  cache = tmp_path / "cache"  # the first run pretrains the smoke reference into it, the others read it
  full = _run_cli(tmp_path / "full", cache)
  assert full.wait(timeout=300) == 0, full.stderr.read()[-2000:]
  kill_at = random.Random().randint(1, 6)
  part = _run_cli(tmp_path / "part", cache)
  log = tmp_path / "part" / "runs" / "nft_ng" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if log.exists() and sum('"train/loss"' in l for l in log.read_text().splitlines()) >= kill_at:
      break
    time.sleep(0.05)
  part.send_signal(signal.SIGTERM)
  rc = part.wait(timeout=120)
  err = part.stderr.read()
  assert rc == 3 and "preempted" in err, err[-2000:]
  report = json.loads((tmp_path / "part" / "report.json").read_text())
  assert report["runs"][0]["status"] == "preempted"
  again = _run_cli(tmp_path / "part", cache)
  assert again.wait(timeout=300) == 0, again.stderr.read()[-2000:]
  s_full, m_full = _final_state(tmp_path / "full")
  s_part, m_part = _final_state(tmp_path / "part")
  import jax
  import numpy as np
  for a, b in zip(jax.tree_util.tree_leaves(s_full), jax.tree_util.tree_leaves(s_part)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert m_full["history"] == m_part["history"]
  lines = lambda w: [json.loads(l) for l in (w / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()]
  train = lambda w: [l for l in lines(w) if "train/loss" in l]
  strip = lambda rows: [{k: v for k, v in r.items() if k != "train/wall_s"} for r in rows]
  assert strip(train(tmp_path / "full")) == strip(train(tmp_path / "part"))

  # a rerun of the finished job says so and exits at once; a larger rl.iterations extends the finished run
  done = _run_cli(tmp_path / "part", cache)
  out, err = done.communicate(timeout=120)
  assert done.returncode == 0 and "already finished" in out, err[-2000:]
  more = _run_cli(tmp_path / "part", cache, "--config.rl.iterations=10")
  assert more.wait(timeout=300) == 0, more.stderr.read()[-2000:]
  report = json.loads((tmp_path / "part" / "report.json").read_text())
  assert report["runs"][0]["status"] == "ok" and report["runs"][0]["iterations"] == 10
  assert [l["step"] for l in train(tmp_path / "part")] == list(range(1, 11))
  # rl.init_from starts a new run from the trained adapter: its first eval is the trained policy's last eval
  init = _run_cli(tmp_path / "init", cache, "--config.rl.iterations=1",
                  f"--config.rl.init_from={tmp_path / 'part' / 'runs' / 'nft_ng'}")
  assert init.wait(timeout=300) == 0, init.stderr.read()[-2000:]
  first = json.loads((tmp_path / "init" / "report.json").read_text())["runs"][0]["history"][0]
  assert first["reward"] == pytest.approx(report["runs"][0]["history"][-1]["reward"], rel=1e-6)


def test_changed_config_on_the_same_workdir_is_refused(tmp_path):
  cfg = _cfg(tmp_path, "rl.iterations=1", "rl.normguard=on", "pretrain.steps=5")
  loop.run(cfg, str(tmp_path / "w"))
  cfg2 = _cfg(tmp_path, "rl.iterations=1", "rl.normguard=on", "pretrain.steps=5", "rl.lr=0.5")
  with pytest.raises(config_lib.ConfigError, match=r"different config \(fields \['rl.lr'\]\)"):
    loop.run(cfg2, str(tmp_path / "w"))


def test_a_reward_server_that_is_down_at_the_reference_eval_still_gives_a_report(digits_smoke, tmp_path):
  """Issue 15: the remote reward fails at the reference evaluation (nothing listens on the port): the report is
  written anyway, with the error, and the job exits non-zero without training."""
  import socket
  from normguard_jax.train import __main__ as cli
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed again: connections are refused
  rc = cli.main(["--config", CFG, "--workdir", str(tmp_path / "w"), f"--config.pretrain.cache_dir={digits_smoke[2] / 'cache'}",
                 "--config.mesh.num_devices=1", "--config.rl.methods=nft", "--config.rl.normguard=on",
                 "--config.reward.terms={'remote': 1.0}",
                 f"--config.reward.options={{'remote': {{'url': 'http://127.0.0.1:{port}/score', 'max_attempts': 1, "
                 "'timeout_s': 2.0}}"])
  assert rc == 1
  report = json.loads((tmp_path / "w" / "report.json").read_text())
  assert "RemoteRewardError" in report["reference_error"] and report["runs"] == []
