"""Worker for tests/test_multihost.py: one process of a simulated multi-host job (or the one-process baseline).

    python tests/multihost_worker.py MODE OUT [PROCESS_ID PORT]     MODE: multi (2 processes x 2 devices) | single (1 x 4)

Both modes build the same (data=2, fsdp=2) mesh over 4 devices and run, on the same global batch:
group advantages over the global reward array, then one sharded NFT + NormGuard train step. Each process feeds
only its own rows (make_array_from_process_local_data); process 0 writes the metrics and a params checksum.
"""

import json
import os
import sys

mode, out = sys.argv[1], sys.argv[2]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={2 if mode == 'multi' else 4} "
                           + os.environ.get("NORMGUARD_TEST_XLA_FLAGS", ""))  # tests/conftest.py's compile flags
if mode == "multi":
  os.environ.update(NORMGUARD_COORDINATOR=f"127.0.0.1:{sys.argv[4]}", NORMGUARD_NUM_PROCESSES="2",
                    NORMGUARD_PROCESS_ID=sys.argv[3])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from normguard_jax.parallel import distributed  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
distributed.maybe_initialize()

from normguard_jax.models import dit  # noqa: E402
from normguard_jax.parallel import mesh as mesh_lib, rules, sharding  # noqa: E402
from normguard_jax.rl import advantages, normguard as ng  # noqa: E402
from normguard_jax.train import state as state_lib, step as step_lib  # noqa: E402

assert jax.device_count() == 4, jax.devices()
mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)))

cfg = dit.DiTConfig(image_size=8, channels=1, patch_size=2, width=32, depth=2, num_heads=2, lora_rank=4,
                    lora_alpha=8.0, lora_targets=("qkv", "proj", "mlp"))
variables = dit.init(cfg, jax.random.PRNGKey(0))
perturb = lambda tree, s: jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(s), x.shape), tree)
base, lora = perturb(variables["params"], 1), perturb(variables["lora"], 2)
tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
st = state_lib.create(lora, base, tx, jax.random.PRNGKey(3), lora=True, with_old=True)
st = jax.tree_util.tree_map(np.asarray, st)  # host values, identical on every process

# the global batch: 4 prompt groups of 4 samples; every process holds its contiguous rows only
group, b = 4, 16
rng = np.random.RandomState(0)
x0 = rng.randn(b, 8, 8, 1).astype(np.float32)
eps = rng.randn(b, 8, 8, 1).astype(np.float32)
t = np.linspace(0.05, 0.95, b).astype(np.float32)
rewards = rng.rand(b).astype(np.float32)
lo, hi = distributed.process_rows(b)
local = {"x0": x0[lo:hi], "eps": eps[lo:hi], "t": t[lo:hi], "cond": (np.arange(b) % 10).astype(np.int32)[lo:hi],
         "x_t": ((1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps)[lo:hi], "reward": rewards[lo:hi]}
batch = sharding.host_local_batch_to_global(local, mesh)
adv = jax.jit(lambda r: advantages.group_advantages(r, group), out_shardings=rules.batch_sharding(mesh, 1))(
    batch.pop("reward"))
batch["adv"] = adv
# one group spanning both hosts' rows: the group mean and std must be global
adv_all = jax.jit(lambda r: advantages.group_advantages(r, b, global_std=False),
                  out_shardings=rules.batch_sharding(mesh, 1))(
    sharding.host_local_batch_to_global({"r": rewards[lo:hi]}, mesh)["r"])

kwargs = dict(method="nft", apply_fn=lambda v, x, tt, c, g: dit.velocity(v, x, tt, c, cfg=cfg, lora_gate=g),
              optimizer=tx, loss_cfg=ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=1e-2)),
              ng_cfg=ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0)))
step, state_sh, _ = step_lib.make_sharded_train_step(mesh, st, **kwargs)
st = jax.device_put(st, state_sh)
new_st, metrics = step(st, batch)
result = {"process_count": jax.process_count(),
          "metrics": {k: float(v) for k, v in metrics.items()},
          "adv": distributed.host_array(adv).tolist(), "adv_all": distributed.host_array(adv_all).tolist(),
          "lora_sum": float(sum(np.sum(distributed.host_array(x), dtype=np.float64)
                                for x in jax.tree_util.tree_leaves(new_st.trainable)))}
if distributed.is_main_process():
  with open(out, "w") as f:
    json.dump(result, f)
