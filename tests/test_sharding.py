"""Tier 4: on 8 simulated CPU devices the sharded train step equals the single-device step, the param
PartitionSpecs match the checked-in golden file, and FSDP shrinks per-device bytes."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from normguard_jax.models import dit
from normguard_jax.parallel import mesh as mesh_lib, rules, sharding
from normguard_jax.rl import normguard as ng
from normguard_jax.train import state as state_lib, step as step_lib

from tests.helpers import apply_fn_for, randomize

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "partition_specs.json")
NG = ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0))
NFT = ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=1e-2))
MODEL = dict(image_size=8, channels=1, patch_size=2, width=64, depth=2, num_heads=4, num_classes=10)


def _mesh(data, fsdp, tensor):
  cfg = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))
  return mesh_lib.make_mesh(cfg, jax.devices()[:8])


def _setup(lora_rank):
  cfg = dit.DiTConfig(**MODEL, lora_rank=lora_rank, lora_alpha=8.0, lora_targets=("qkv", "proj", "mlp"))
  variables = dit.init(cfg, jax.random.PRNGKey(0))
  base = randomize(variables["params"], 1)
  trainable = randomize(variables["lora"], 2, 0.1) if lora_rank else randomize(base, 5, 0.02)
  # SGD + momentum: the update is linear in the gradient. (Adam's g / (sqrt(v) + eps) turns the last-bit
  # differences of summation order in near-zero gradients into O(lr) differences, which would hide real bugs
  # behind a loose tolerance.)
  tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))
  st = state_lib.create(trainable, base, tx, jax.random.PRNGKey(3), lora=lora_rank > 0, with_old=True)
  st = st.replace(old=randomize(st.old, 4, 0.05))
  b = 16
  x0 = jax.random.normal(jax.random.PRNGKey(7), (b, 8, 8, 1))
  eps = jax.random.normal(jax.random.PRNGKey(8), (b, 8, 8, 1))
  t = jnp.linspace(0.05, 0.95, b)
  batch = {"x0": x0, "eps": eps, "t": t, "x_t": (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps,
           "cond": jnp.arange(b, dtype=jnp.int32) % 10, "adv": jnp.linspace(-2, 2, b)}
  kwargs = dict(method="nft", apply_fn=apply_fn_for(cfg), optimizer=tx, loss_cfg=NFT, ng_cfg=NG)
  return st, batch, kwargs


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("axes", [(2, 4, 1), (2, 2, 2)])
def test_sharded_step_equals_single_device(lora_rank, axes):
  st, batch, kwargs = _setup(lora_rank)
  want_state, want_m = _host(step_lib.make_train_step(**kwargs)(jax.tree_util.tree_map(jnp.copy, st), batch))
  mesh = _mesh(*axes)
  st2, batch2, _ = _setup(lora_rank)
  step, state_sh, batch_sh = step_lib.make_sharded_train_step(mesh, st2, **kwargs)
  st2, batch2 = jax.device_put(st2, state_sh), jax.device_put(batch2, batch_sh)
  if lora_rank:  # the models pin their token streams by the rules table (rules.constrain) under the step's mesh
    hlo = step.lower(st2, batch2).as_text()
    assert hlo.count("sharding_constraint") + hlo.count("@Sharding") >= 4  # Shardy or GSPMD spelling
  got_state, got_m = step(st2, batch2)
  leaf = jax.tree_util.tree_leaves(got_state.trainable)[0]
  assert len(leaf.sharding.device_set) == 8
  got_state, got_m = _host(got_state), _host(got_m)
  for k in ("loss", "base_loss", "ng_penalty", "ng_mean_rho", "ng_active_frac", "kl_ref", "grad_norm"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-6, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(got_state.trainable), jax.tree_util.tree_leaves(want_state.trainable)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(got_state.opt_state), jax.tree_util.tree_leaves(want_state.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _spec_table(mesh):
  table = {}
  for lora_rank in (0, 4):
    cfg = dit.DiTConfig(**MODEL, lora_rank=lora_rank, lora_targets=("qkv", "proj", "mlp"))
    abstract = jax.eval_shape(lambda: dit.init(cfg, jax.random.PRNGKey(0)))
    collection = abstract["lora"] if lora_rank else abstract["params"]
    specs = rules.tree_partition_specs(collection, mesh)
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
      table[("lora/" if lora_rank else "params/") + rules._path_str(path)] = str(spec)
  return table


def _mmdit_spec_table(mesh):
  from normguard_jax.models import mmdit
  table = {}
  for scan in (False, True):
    cfg = mmdit.MMDiTConfig(sample_size=16, num_layers=4, attention_head_dim=8, num_attention_heads=4,
                            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                            pos_embed_max_size=16, dual_attention_layers=(0, 1), qk_norm="rms_norm", lora_rank=4,
                            scan_layers=scan)
    abstract = mmdit.param_shapes(cfg)
    specs = rules.tree_partition_specs(abstract, mesh)
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
      table[f"mmdit_scan{int(scan)}/" + rules._path_str(path)] = str(spec)
  return table


def test_param_partition_specs_match_golden():
  table = {f"{d}x{f}x{t}": dict(_spec_table(_mesh(d, f, t)), **_mmdit_spec_table(_mesh(d, f, t)))
           for d, f, t in [(2, 4, 1), (2, 2, 2), (1, 8, 1)]}
  if os.environ.get("NORMGUARD_UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(table, f, indent=1, sort_keys=True)
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert table == golden


def test_fsdp8_shrinks_per_device_param_and_optimizer_bytes():
  st, _, kwargs = _setup(0)
  tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  st = st.replace(opt_state=tx.init(st.trainable))
  single = sharding.per_device_bytes((st.trainable, st.opt_state))
  mesh = _mesh(1, 8, 1)
  sharded = jax.device_put(st, rules.tree_shardings(st, mesh))
  per_dev = sharding.per_device_bytes((sharded.trainable, sharded.opt_state))
  ratio = per_dev / single
  print(f"fsdp=8 per-device params+opt bytes: {per_dev} / {single} = {ratio:.4f}")
  assert ratio <= 0.15


def test_mesh_config_errors_name_the_axis():
  with pytest.raises(ValueError, match="at most one axis"):
    _mesh(-1, -1, 1)
  with pytest.raises(ValueError, match="need 12 devices"):
    _mesh(2, 3, 2)
  with pytest.raises(KeyError, match="no sharding rule covers param 'foo/bar'"):
    rules.param_logical_axes("foo/bar", 2)
  m = _mesh(2, -1, 1)
  assert dict(m.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_rows_the_batch_axes_do_not_divide_are_refused_not_replicated():
  """Issue 12: a rollout whose rows the mesh does not divide used to be silently replicated (every chip computing
  every row); now it is an error, and evaluation pads instead (exactly: the copies are dropped)."""
  mesh = _mesh(1, 8, 1)
  with pytest.raises(ValueError, match="do not split over the mesh's batch axes"):
    sharding.place_rows({"x": np.zeros((6, 2))}, mesh)
  placed = sharding.place_rows({"x": np.arange(16.0)}, mesh)
  assert placed["x"].sharding.spec[0] == "fsdp" and len(placed["x"].sharding.device_set) == 8
  padded, rows = sharding.pad_rows({"x": np.arange(6.0)}, 8)
  assert rows == 6 and padded["x"].tolist() == [0, 1, 2, 3, 4, 5, 5, 5]
  built = sharding.rows_from_process_local(lambda idx: {"x": np.asarray(idx, np.float32) * 10}, 16, mesh)
  np.testing.assert_array_equal(np.asarray(built["x"]), np.arange(16.0) * 10)
  assert built["x"].sharding.spec[0] == "fsdp"
