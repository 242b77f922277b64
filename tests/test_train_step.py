"""Tier 1/5: the train step. NormGuard via the optax chain equals the in-loss form for a fixed lambda;
a non-finite step is skipped without touching the state."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from normguard_jax.models import dit
from normguard_jax.rl import normguard as ng
from normguard_jax.rl.nft import nft_loss
from normguard_jax.train import fused, state as state_lib, step as step_lib

from tests.helpers import apply_fn_for, inputs, randomize, tiny_model

NG = ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0))
NFT = ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0))


def _setup(lam=None, lr=1e-2):
  cfg = tiny_model(4, targets=("qkv", "proj", "mlp"))
  variables = dit.init(cfg, jax.random.PRNGKey(0))
  base = randomize(variables["params"], 1)
  lora = randomize(variables["lora"], 2, scale=0.2)
  parts = [] if lam is None else [ng.normguard_lambda("constant", lam)]
  tx = optax.chain(*parts, optax.clip_by_global_norm(1.0), optax.adam(lr))
  st = state_lib.create(lora, base, tx, jax.random.PRNGKey(3), lora=True, with_old=True)
  st = st.replace(old=randomize(st.old, 4, scale=0.2))
  x, t, c = inputs(6)
  x0 = jax.random.normal(jax.random.PRNGKey(9), x.shape)
  batch = {"x_t": (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * x, "t": t, "cond": c,
           "x0": x0, "eps": x, "adv": jnp.linspace(-3, 3, 6)}
  return cfg, tx, st, batch


def test_chain_lambda_equals_in_loss_penalty_for_fixed_lambda():
  lam = 2.5
  cfg, tx, st, batch = _setup(lam=lam)
  apply_fn = apply_fn_for(cfg)
  step = jax.jit(functools.partial(step_lib.train_step, method="nft", apply_fn=apply_fn, optimizer=tx,
                                   loss_cfg=NFT, ng_cfg=NG))
  new_st, m = step(st, batch)
  assert float(m["ng_lambda"]) == lam and float(m["ng_penalty"]) > 0  # the hinge is active here

  # the plain form: lambda as a Python constant inside the loss, and a chain without the transform
  plain_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  def loss(l):
    vel = fused.separate_velocities(apply_fn, l, st.frozen, st.old, batch["x_t"], batch["t"], batch["cond"], lora=True)
    vel = fused.Velocities(vel.policy, jax.lax.stop_gradient(vel.ref), jax.lax.stop_gradient(vel.old))
    return nft_loss(vel, batch, NFT)[0] + lam * ng.normguard_penalty(vel.policy, vel.ref, NG)[0]
  @jax.jit
  def plain_step(trainable):
    total, grads = jax.value_and_grad(loss)(trainable)
    updates, _ = plain_tx.update(grads, plain_tx.init(trainable), trainable)
    return total, optax.apply_updates(trainable, updates)
  total, want = plain_step(st.trainable)
  np.testing.assert_allclose(m["loss"], total, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(new_st.trainable), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # and lambda = 0 (no transform) gives a different update: the test can fail
  _, _, st0, _ = _setup(lam=None)
  new0, m0 = jax.jit(functools.partial(step_lib.train_step, method="nft", apply_fn=apply_fn, optimizer=plain_tx,
                                       loss_cfg=NFT, ng_cfg=NG))(st0, batch)
  assert float(m0["ng_lambda"]) == 0.0
  diffs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(new0.trainable),
                                                        jax.tree_util.tree_leaves(want))]
  assert max(diffs) > 1e-6


def test_hinge_metrics_and_penalty_share():
  cfg, tx, st, batch = _setup(lam=1.0)
  step = jax.jit(functools.partial(step_lib.train_step, method="nft", apply_fn=apply_fn_for(cfg), optimizer=tx,
                                   loss_cfg=NFT, ng_cfg=NG))
  _, m = step(st, batch)
  share = float(m["ng_share"])
  assert 0.0 < share < 1.0
  np.testing.assert_allclose(share, m["ng_penalty"] / (abs(m["base_loss"]) + m["ng_penalty"]), rtol=1e-5)
  assert 0.0 <= float(m["ng_active_frac"]) <= 1.0 and float(m["ng_mean_rho"]) > 0


@pytest.mark.parametrize("field", ["x_t", "adv"])
def test_non_finite_step_is_skipped_and_state_kept(field):
  cfg, tx, st, batch = _setup(lam=1.0)
  before = jax.tree_util.tree_map(np.asarray, (st.trainable, st.opt_state))
  batch = dict(batch)
  batch[field] = batch[field].at[0].set(jnp.nan)
  step = step_lib.make_train_step(method="nft", apply_fn=apply_fn_for(cfg), optimizer=tx, loss_cfg=NFT, ng_cfg=NG)
  new_st, m = step(st, batch)
  assert float(m["skipped"]) == 1.0
  assert int(new_st.step) == 0
  after = jax.tree_util.tree_map(np.asarray, (new_st.trainable, new_st.opt_state))
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)


def test_old_policy_decay_schedule():
  np.testing.assert_allclose([float(state_lib.old_decay(s, 0.001, 0.5)) for s in (0, 10, 600)], [0, 0.01, 0.5])
  old, new = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
  np.testing.assert_allclose(state_lib.ema_update(old, new, 0.25)["w"], 0.75)


@pytest.mark.parametrize("method", ["nft", "dpo"])
def test_microbatched_step_equals_one_big_batch(method):
  """Gradient accumulation over M microbatches (lax.scan) gives the one-batch gradient, loss and metrics;
  DPO's [winners; losers] pairing survives the split."""
  lam = 1.5
  cfg, _, st, batch = _setup(lam=lam)
  tx = optax.chain(ng.normguard_lambda("constant", lam), optax.sgd(0.1))  # linear in the gradient
  old = st.old
  st = state_lib.create(st.trainable, st.frozen, tx, jax.random.PRNGKey(3), lora=True, with_old=True)
  st = st.replace(old=old)
  if method == "dpo":
    batch = {k: batch[k] for k in ("x_t", "t", "cond", "x0", "eps")}
    loss_cfg = ml_collections.ConfigDict(dict(beta=100.0))
  else:
    loss_cfg = NFT
  split = step_lib.split_microbatches(batch, 3 if method == "nft" else 1, paired=method == "dpo")
  assert jax.tree_util.tree_leaves(split)[0].shape[0] == (3 if method == "nft" else 1)
  kw = dict(method=method, apply_fn=apply_fn_for(cfg), optimizer=tx, loss_cfg=loss_cfg, ng_cfg=NG)
  one_st, one = jax.jit(functools.partial(step_lib.train_step, **kw))(st, batch)
  m = 3 if method == "nft" else 1
  if method == "dpo":  # 6 rows = 3 pairs: interleave to 12 rows = 6 pairs so that 3 microbatches hold 2 pairs
    batch = jax.tree_util.tree_map(lambda a: jnp.concatenate([a[:3], a[:3], a[3:], a[3:]]), batch)
    one_st, one = jax.jit(functools.partial(step_lib.train_step, **kw))(st, batch)
    m = 3
  many_st, many = jax.jit(functools.partial(step_lib.train_step, num_microbatches=m, **kw))(st, batch)
  for k in ("loss", "base_loss", "ng_penalty", "ng_mean_rho", "grad_norm"):
    np.testing.assert_allclose(many[k], one[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree_util.tree_leaves(many_st.trainable), jax.tree_util.tree_leaves(one_st.trainable)):
    # DPO's beta = 100 scales fp32 summation-order noise (1.7e-6 on one of 256 entries seen on an AMD EPYC CPU)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 if method == "nft" else 5e-6)
  with pytest.raises(ValueError, match="microbatches"):
    step_lib.split_microbatches(batch, 5)


def test_full_finetuning_keeps_f32_master_weights_and_optimizer_state():
  """Issue 12: with rl.lora_rank=0 and bf16 reference params, the trainable params, the Adam moments and the old/EMA
  copy are float32 (the frozen reference stays bf16), so small AdamW updates are not lost to bf16 rounding."""
  import dataclasses
  from normguard_jax.train import programs
  cfg = dataclasses.replace(tiny_model(0), dtype="bfloat16")
  ref = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), randomize(dit.init(cfg, jax.random.PRNGKey(0))[
      "params"], 1))
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=1e-4))
  setup = programs.RunSetup(method="nft", use_ng=False, lora=False, with_old=True, model_cfg=cfg,
                            apply_fn=apply_fn_for(cfg), optimizer=tx)
  st = programs.init_state(setup, None, ref, jax.random.PRNGKey(1))
  dtypes = lambda tree: {x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
  assert dtypes(st.trainable) == dtypes(st.old) == dtypes(st.opt_state) == {jnp.dtype(jnp.float32)}
  assert dtypes(st.frozen) == {jnp.dtype(jnp.bfloat16)}
  # ten AdamW steps at lr 1e-4 change the weights exactly as an f32 run does (in bf16 ~95% of them stayed put)
  grads = randomize(jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), st.trainable), 5, scale=1.0)
  f32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), ref)
  @jax.jit
  def ten_steps(params, opt):
    def one(carry, _):
      params, opt = carry
      upd, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, upd), opt), None
    return jax.lax.scan(one, (params, opt), None, length=10)[0]
  params, _ = ten_steps(st.trainable, st.opt_state)
  want, _ = ten_steps(f32, tx.init(f32))
  for a, b, r in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(f32)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.mean(np.asarray(a) == np.asarray(r)) < 0.01
  # and one real train step in bf16 compute keeps them f32
  x, t, c = inputs(4)
  batch = {"x_t": x, "t": t, "cond": c, "x0": x * 0.5, "eps": x, "adv": jnp.linspace(-1, 1, 4)}
  step = step_lib.make_train_step(method="nft", apply_fn=apply_fn_for(cfg), optimizer=tx, loss_cfg=NFT, ng_cfg=NG)
  new, metrics = step(st, batch)
  assert dtypes(new.trainable) == {jnp.dtype(jnp.float32)} and float(metrics["skipped"]) == 0.0
