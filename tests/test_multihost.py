"""Tier 4: two processes with jax.distributed on localhost (gloo CPU collectives) feed their own rows of the global
batch, compute group advantages over the global rewards and run one sharded train step; the result equals the
one-process run on the same (data=2, fsdp=2) mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import xla_flags

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return env


def test_two_processes_equal_one_process(tmp_path):
  single = tmp_path / "single.json"
  port = str(_free_port())
  multi = tmp_path / "multi.json"
  procs = [subprocess.Popen([sys.executable, WORKER, "single", str(single)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())]  # the one-process run, alongside
  procs += [subprocess.Popen([sys.executable, WORKER, "multi", str(multi), str(i), port], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_env()) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a, b = json.loads(single.read_text()), json.loads(multi.read_text())
  assert a["process_count"] == 1 and b["process_count"] == 2
  np.testing.assert_allclose(b["adv"], a["adv"], rtol=1e-6, atol=1e-7)
  adv = np.asarray(a["adv"]).reshape(4, 4)
  np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
  # a group spanning both hosts: normalised with the global mean and std of all 16 rewards
  np.testing.assert_allclose(b["adv_all"], a["adv_all"], rtol=1e-6, atol=1e-7)
  r = np.random.RandomState(0)
  r.randn(16, 8, 8, 1), r.randn(16, 8, 8, 1)
  rewards = r.rand(16).astype(np.float32)
  np.testing.assert_allclose(b["adv_all"], (rewards - rewards.mean()) / (rewards.std() + 1e-4), rtol=1e-5)
  for k in ("loss", "base_loss", "ng_penalty", "ng_mean_rho", "kl_ref", "grad_norm"):
    np.testing.assert_allclose(b["metrics"][k], a["metrics"][k], rtol=1e-6, atol=1e-7, err_msg=k)
  np.testing.assert_allclose(b["lora_sum"], a["lora_sum"], rtol=1e-6)


def _train_cmd(workdir, cache, iterations):
  # normguard.margin > 0: at iteration 1 the LoRA policy equals the reference, rho is 1 up to float noise, and a
  # zero-margin hinge would switch on per row by that noise (which differs between device layouts).
  return [sys.executable, "-m", "normguard_jax.train", "--config", "configs/tiny_digits.py:smoke",
          "--workdir", str(workdir), "--config.rl.methods=nft", "--config.rl.normguard=on",
          "--config.normguard.margin=0.001", "--config.pretrain.steps=10", f"--config.rl.iterations={iterations}",
          "--config.eval.samples_per_class=1", f"--config.pretrain.cache_dir={cache}", "--config.mesh.data=2",
          "--config.mesh.fsdp=2", "--config.checkpoint.every=3", "--config.eval.every=4"]


def _launch(repo, cmd, devices, rank=None, port=None):
  env = dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
  if rank is not None:
    env.update(NORMGUARD_COORDINATOR=f"127.0.0.1:{port}", NORMGUARD_NUM_PROCESSES="2", NORMGUARD_PROCESS_ID=str(rank))
  return subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _two_hosts(repo, cmd):
  port = str(_free_port())
  return [_launch(repo, cmd, 2, i, port) for i in range(2)]


def _final_state(workdir):
  """The latest checkpoint's train state as numpy arrays (it was written by 2 processes x 2 devices, a topology this
  test process does not have, so no sharding is restored)."""
  import jax
  import orbax.checkpoint as ocp
  d = workdir / "runs" / "nft_ng" / "checkpoints"
  steps = sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
  path = d / str(steps[-1]) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  as_numpy = jax.tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                    is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


@pytest.mark.slow
def test_two_hosts_run_the_tiny_recipe_like_one_and_agree_on_preemption_and_damage(tmp_path):
  """The main job itself on two processes x 2 CPU devices equals one process x 4 devices (same mesh). Then the
  faults of a pod: SIGTERM reaches only process 1, yet both processes save at the same iteration and exit 3; that
  checkpoint is damaged, and on the rerun process 0 alone moves it aside, both resume from the previous one, and the
  finished run is bit-identical to the uninterrupted two-process run."""
  import signal
  import time
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  iters = 10
  single = _launch(repo, _train_cmd(tmp_path / "single", tmp_path / "c1", iters), 4)
  multi = _two_hosts(repo, _train_cmd(tmp_path / "multi", tmp_path / "c2", iters))
  for p in [single] + multi:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  read = lambda d: [json.loads(l) for l in (d / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()]
  a, b = read(tmp_path / "single"), read(tmp_path / "multi")
  assert [l["step"] for l in a] == [l["step"] for l in b] == [0] + list(range(1, 5)) + [4] + list(range(5, 9)) + [
      8, 9, 10, 10]
  for la, lb in zip(a, b):
    assert set(la) == set(lb)
    for k, v in la.items():
      if k != "train/wall_s" and isinstance(v, float):
        np.testing.assert_allclose(lb[k], v, rtol=1e-5, atol=1e-7, err_msg=f"step {la['step']} {k}")
  report = json.loads((tmp_path / "multi" / "report.json").read_text())
  assert report["runs"][0]["status"] == "ok"

  # SIGTERM to process 1 only, once a few iterations are logged (by process 0)
  part = tmp_path / "part"
  procs = _two_hosts(repo, _train_cmd(part, tmp_path / "c2", iters))
  log = part / "runs" / "nft_ng" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and procs[1].poll() is None:
    if log.exists() and sum('"train/loss"' in l for l in log.read_text().splitlines()) >= 4:
      break
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [3, 3], [e[-2000:] for e in errs]
  at = [int(e.split("SIGTERM at iteration ")[1].split(";")[0]) for e in errs]
  assert at[0] == at[1] and at[0] > 3, at  # both saved at the same iteration, after the periodic save at 3
  ckpts = part / "runs" / "nft_ng" / "checkpoints"
  assert (ckpts / str(at[0])).is_dir() and (ckpts / "3").is_dir()
  for root, _, files in os.walk(ckpts / str(at[0]) / "state"):  # damage the preemption checkpoint
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  procs = _two_hosts(repo, _train_cmd(part, tmp_path / "c2", iters))
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
  assert all("resumed from the checkpoint at iteration 3" in e for e in errs), [e[-2000:] for e in errs]
  aside = [p.name for p in ckpts.iterdir() if p.name.startswith(f"{at[0]}.corrupt-")]
  assert len(aside) == 1, sorted(p.name for p in ckpts.iterdir())  # moved aside once (by process 0), not deleted
  import jax
  s_full, s_part = _final_state(tmp_path / "multi"), _final_state(part)
  for x, y in zip(jax.tree_util.tree_leaves(s_full), jax.tree_util.tree_leaves(s_part)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  strip = lambda rows: [{k: v for k, v in r.items() if k != "train/wall_s"} for r in rows]
  assert strip(read(tmp_path / "multi")) == strip(read(part))
