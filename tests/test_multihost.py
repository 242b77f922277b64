"""Tier 4: two processes with jax.distributed on localhost (gloo CPU collectives) feed their own rows of the global
batch, compute group advantages over the global rewards and run one sharded train step; the result equals the
one-process run on the same (data=2, fsdp=2) mesh."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

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
  r = subprocess.run([sys.executable, WORKER, "single", str(single)], capture_output=True, text=True, timeout=300,
                     env=_env())
  assert r.returncode == 0, r.stderr[-3000:]
  port = str(_free_port())
  multi = tmp_path / "multi.json"
  procs = [subprocess.Popen([sys.executable, WORKER, "multi", str(multi), str(i), port], stdout=subprocess.PIPE,
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


def _train_cmd(workdir, cache):
  # normguard.margin > 0: at iteration 1 the LoRA policy equals the reference, rho is 1 up to float noise, and a
  # zero-margin hinge would switch on per row by that noise (which differs between device layouts).
  return [sys.executable, "-m", "normguard_jax.train", "--config", "configs/tiny_digits.py:smoke",
          "--workdir", str(workdir), "--config.rl.methods=nft", "--config.rl.normguard=on",
          "--config.normguard.margin=0.001", "--config.pretrain.steps=10", "--config.rl.iterations=2",
          "--config.eval.samples_per_class=1", f"--config.pretrain.cache_dir={cache}", "--config.mesh.data=2",
          "--config.mesh.fsdp=2"]


def test_two_hosts_run_the_tiny_recipe_like_one(tmp_path):
  """The main job itself on two processes x 2 CPU devices equals one process x 4 devices (same mesh)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  port = str(_free_port())
  base = dict(_env(), JAX_PLATFORMS="cpu")
  single = subprocess.Popen(_train_cmd(tmp_path / "single", tmp_path / "c1"), cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  multi = [subprocess.Popen(_train_cmd(tmp_path / "multi", tmp_path / "c2"), cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                                     NORMGUARD_COORDINATOR=f"127.0.0.1:{port}", NORMGUARD_NUM_PROCESSES="2",
                                     NORMGUARD_PROCESS_ID=str(i))) for i in range(2)]
  for p in [single] + multi:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  read = lambda d: [json.loads(l) for l in (d / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()]
  a, b = read(tmp_path / "single"), read(tmp_path / "multi")
  assert [l["step"] for l in a] == [l["step"] for l in b] == [0, 1, 2, 2]
  for la, lb in zip(a, b):
    assert set(la) == set(lb)
    for k, v in la.items():
      if k != "train/wall_s" and isinstance(v, float):
        np.testing.assert_allclose(lb[k], v, rtol=1e-5, atol=1e-7, err_msg=f"step {la['step']} {k}")
  report = json.loads((tmp_path / "multi" / "report.json").read_text())
  assert report["runs"][0]["status"] == "ok"
  assert (tmp_path / "multi" / "runs" / "nft_ng" / "checkpoints").is_dir()
