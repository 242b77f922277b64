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
