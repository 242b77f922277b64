"""Tier 5: orbax train-state checkpoints restore onto other device counts, survive a kill -9 mid-save, and a
damaged latest checkpoint is set aside (not deleted) in favour of the previous one."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from normguard_jax.models import dit
from normguard_jax.parallel import mesh as mesh_lib, rules
from normguard_jax.rl import normguard as ng
from normguard_jax.train import checkpoint as ckpt_lib, state as state_lib

from tests.helpers import randomize

MODEL = dict(image_size=8, channels=1, patch_size=2, width=64, depth=2, num_heads=4, num_classes=10)


def _state():
  cfg = dit.DiTConfig(**MODEL)
  params = randomize(dit.init(cfg, jax.random.PRNGKey(0))["params"], 1)
  tx = optax.chain(ng.normguard_lambda("adaptive", 0.7), optax.adamw(1e-3))
  st = state_lib.create(randomize(params, 2), params, tx, jax.random.PRNGKey(3), lora=False, with_old=True)
  # one real update, so the optimizer moments and lambda are not at their initial values
  _, opt = tx.update(jax.tree_util.tree_map(jnp.ones_like, st.trainable), st.opt_state, st.trainable,
                     ng_excess=jnp.float32(0.2))
  return st.replace(opt_state=opt, step=jnp.int32(7))


def _mesh(n):
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=n, tensor=1)), jax.devices()[:n])


def _abstract_on(state, mesh):
  sh = rules.tree_shardings(state, mesh)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)


def test_checkpoint_from_8_devices_restores_onto_4_and_1(tmp_path):
  st = _state()
  sharded = jax.device_put(st, rules.tree_shardings(st, _mesh(8)))
  assert len(jax.tree_util.tree_leaves(sharded.trainable)[0].sharding.device_set) == 8
  ck = ckpt_lib.RunCheckpointer(tmp_path / "ck", every=1)
  ck.save(5, sharded, {"iteration": 5, "history": []})
  ck.close()
  want = jax.tree_util.tree_map(np.asarray, st)
  for n in (4, 1):
    ck = ckpt_lib.RunCheckpointer(tmp_path / "ck", every=1)
    it, got, meta = ck.restore_latest(_abstract_on(st, _mesh(n)))
    ck.close()
    assert it == 5 and meta["iteration"] == 5
    leaf = jax.tree_util.tree_leaves(got.trainable)[0]
    assert len(leaf.sharding.device_set) == n
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), b)
    assert float(ng.current_lambda(got.opt_state)) == float(ng.current_lambda(st.opt_state))


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  st = _state()
  ck = ckpt_lib.RunCheckpointer(tmp_path / "ck", every=1, keep=3)
  ck.save(1, st, {"iteration": 1, "history": []})
  ck.wait()
  st2 = st.replace(step=jnp.int32(99))
  ck.save(2, st2, {"iteration": 2, "history": []})
  ck.close()
  for root, _, files in os.walk(tmp_path / "ck" / "2"):
    for f in files:
      if not f.startswith("_"):
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  ck = ckpt_lib.RunCheckpointer(tmp_path / "ck", every=1, keep=3)
  it, got, _ = ck.restore_latest(_abstract_on(st, _mesh(1)))
  assert it == 1 and int(got.step) == 7
  aside = [p for p in os.listdir(tmp_path / "ck") if p.startswith("2.corrupt-")]
  assert len(aside) == 1  # kept for inspection, not deleted
  ck.save(2, st2, {"iteration": 2, "history": []}, force=True)  # the step can be written afresh
  ck.close()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from normguard_jax.train import checkpoint as ckpt_lib
    d = sys.argv[1]
    ck = ckpt_lib.RunCheckpointer(d, every=1, keep=5)
    small = {"w": jnp.arange(10.0)}
    ck.save(1, small, {"iteration": 1})
    ck.wait()
    big = {"w": jnp.arange(10.0) + 1, "blob": jnp.ones((64, 1024, 1024), jnp.float32)}  # 256 MiB: slow to write
    ck.save(2, big, {"iteration": 2})  # async: returns while the write is in flight
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_9_during_async_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  d = tmp_path / "ck"
  r = subprocess.run([sys.executable, "-c", KILLER, str(d)], capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == -9, r.stderr[-2000:]
  assert "2" not in os.listdir(d)  # the interrupted save never became a step
  ck = ckpt_lib.RunCheckpointer(d, every=1)
  assert ck.all_steps() == [1]
  it, got, meta = ck.restore_latest({"w": jax.ShapeDtypeStruct((10,), jnp.float32)})
  ck.close()
  assert it == 1 and meta["iteration"] == 1
  np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(10.0))
