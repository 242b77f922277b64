"""Worker for tests/test_remote_reward.py::test_multihost_remote_reward: one of two processes (2 CPU devices each)
calling the remote reward with the same global, row-sharded batch.

    python tests/multihost_reward_worker.py OUT PROCESS_ID PORT SCORE_URL

Phase 1 scores the batch; phase 2 makes process 1's requests fail (metadata.fault = 500) and records what each
process raised. Writes OUT.<process id>.json.
"""

import json
import os
import sys

out, pid, port, url = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           + os.environ.get("NORMGUARD_TEST_XLA_FLAGS", ""))  # tests/conftest.py's compile flags
os.environ.update(NORMGUARD_COORDINATOR=f"127.0.0.1:{port}", NORMGUARD_NUM_PROCESSES="2",
                  NORMGUARD_PROCESS_ID=str(pid))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from normguard_jax.parallel import distributed  # noqa: E402

distributed.maybe_initialize()

from normguard_jax.parallel import mesh as mesh_lib, rules  # noqa: E402
from normguard_jax.rewards import remote  # noqa: E402
from normguard_jax.rewards.api import RewardBatch, make_reward  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4
mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)))
host = np.random.RandomState(0).uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)  # the same on both processes
images = jax.device_put(host, rules.batch_sharding(mesh, 4))
assert not images.is_fully_addressable
prompts = [f"p{i}" for i in range(8)]
opts = dict(url=url, batch_size=3, max_attempts=2, backoff_s=0.01, timeout_s=5.0)
reward_fn = make_reward({"remote": 1.0, "contrast": 0.0}, {"remote": opts})  # a host and a JAX reward, combined
total, parts = reward_fn(RewardBatch(images, None, prompts))
result = {"scores": distributed.host_array(parts["remote"]).tolist(), "total": distributed.host_array(total).tolist(),
          "replicated": bool(parts["remote"].is_fully_replicated)}
faulty = remote.RemoteReward(url, batch_size=3, max_attempts=2, backoff_s=0.01, timeout_s=5.0, name="phase2",
                             metadata={"fault": "500"} if pid == 1 else None)
try:
  faulty(RewardBatch(images, None, prompts))
  result["phase2"] = "no error"
except remote.RemoteRewardError as e:
  result["phase2"] = str(e)
with open(f"{out}.{pid}.json", "w") as f:
  json.dump(result, f)
