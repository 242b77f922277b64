"""Tier 1: the DiT velocity contract, LoRA gating, and fused == separate velocities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normguard_jax.models import dit
from normguard_jax.train import fused

from tests.helpers import apply_fn_for, inputs, randomize, tiny_model


def test_velocity_contract_shapes_and_dtype():
  cfg = tiny_model()
  variables = dit.init(cfg, jax.random.PRNGKey(0))
  x, t, c = inputs()
  v = dit.velocity(variables, x, t, c, cfg=cfg)
  assert v.shape == x.shape and v.dtype == jnp.float32
  np.testing.assert_array_equal(v, 0.0)  # adaLN-zero: final projection starts at zero
  params = randomize(variables["params"], 1)
  v1 = dit.velocity({"params": params}, x, t, c, cfg=cfg)
  v2 = dit.velocity({"params": params}, x, t, dit.null_cond(cfg, 4), cfg=cfg)
  assert float(jnp.abs(v1 - v2).max()) > 1e-4  # the label conditions the output
  v3 = dit.velocity({"params": params}, x, jnp.flip(t), c, cfg=cfg)
  assert float(jnp.abs(v1 - v3).max()) > 1e-4  # so does t


def test_bad_model_config_is_rejected():
  with pytest.raises(ValueError, match="lora_targets"):
    tiny_model(4, targets=("qkv", "conv"))
  with pytest.raises(ValueError, match="divisible"):
    dit.DiTConfig(image_size=8, patch_size=3)


def _lora_setup(rank=4):
  cfg = tiny_model(rank, targets=("qkv", "proj", "mlp"))
  variables = dit.init(cfg, jax.random.PRNGKey(0))
  return cfg, randomize(variables["params"], 1), randomize(variables["lora"], 2), randomize(variables["lora"], 3)


def test_lora_gate_zero_is_exactly_the_base_model():
  cfg, base, lora, _ = _lora_setup()
  x, t, c = inputs()
  base_cfg = tiny_model(0)
  v_base = dit.velocity({"params": base}, x, t, c, cfg=base_cfg)
  v_off = dit.velocity({"params": base, "lora": lora}, x, t, c, cfg=cfg, lora_gate=jnp.zeros((4, 1)))
  np.testing.assert_array_equal(v_off, v_base)
  v_on = dit.velocity({"params": base, "lora": lora}, x, t, c, cfg=cfg)
  assert float(jnp.abs(v_on - v_base).max()) > 1e-4
  fresh = dit.init(cfg, jax.random.PRNGKey(5))["lora"]  # B = 0 at init: a fresh adapter is the base model
  np.testing.assert_allclose(dit.velocity({"params": base, "lora": fresh}, x, t, c, cfg=cfg), v_base, atol=1e-6)


@pytest.mark.parametrize("strategy", ["split", "concat"])
@pytest.mark.parametrize("with_old", [False, True])
def test_fused_lora_velocities_equal_separate_forwards(strategy, with_old):
  cfg, base, lora, old = _lora_setup()
  apply_fn = apply_fn_for(cfg)
  x, t, c = inputs()
  old = old if with_old else None
  got = jax.jit(lambda l: fused.fused_velocities(apply_fn, l, base, old, x, t, c, lora=True, strategy=strategy))(lora)
  want = fused.separate_velocities(apply_fn, lora, base, old, x, t, c, lora=True)
  for g, w in zip(got, want):
    if w is None:
      assert g is None
    else:
      np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["split", "concat"])
def test_fused_gradients_equal_separate_policy_gradient(strategy):
  """Only the policy branch carries gradient: ref and old rows contribute nothing."""
  cfg, base, lora, old = _lora_setup()
  apply_fn = apply_fn_for(cfg)
  x, t, c = inputs()
  def fused_obj(l):
    vel = fused.fused_velocities(apply_fn, l, base, old, x, t, c, lora=True, strategy=strategy)
    return jnp.sum(vel.policy ** 2) + jnp.sum(vel.ref * vel.policy) + jnp.sum(vel.old ** 2)
  def sep_obj(l):
    vel = fused.separate_velocities(apply_fn, l, base, old, x, t, c, lora=True)
    return jnp.sum(vel.policy ** 2) + jnp.sum(jax.lax.stop_gradient(vel.ref) * vel.policy)
  g1, g2 = jax.grad(fused_obj)(lora), jax.grad(sep_obj)(lora)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_fused_full_finetune_equals_separate_and_rejects_concat():
  cfg = tiny_model(0)
  params = dit.init(cfg, jax.random.PRNGKey(0))["params"]
  pol, ref, old = randomize(params, 1), randomize(params, 2), randomize(params, 3)
  apply_fn = apply_fn_for(cfg)
  x, t, c = inputs()
  got = fused.fused_velocities(apply_fn, pol, ref, old, x, t, c, lora=False)
  want = fused.separate_velocities(apply_fn, pol, ref, old, x, t, c, lora=False)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6)
  with pytest.raises(ValueError, match="concat"):
    fused.fused_velocities(apply_fn, pol, ref, old, x, t, c, lora=False, strategy="concat")


def test_named_remat_policies_keep_the_gradient():
  """models/layers.py REMAT_POLICIES change what the backward recomputes, never its value; unknown names fail."""
  import dataclasses
  from normguard_jax.models import layers, mmdit
  cfg = mmdit.MMDiTConfig(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                          joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                          pos_embed_max_size=8)
  params = mmdit.init(cfg, jax.random.PRNGKey(0))["params"]
  x, t, c = mmdit.dummy_inputs(cfg, 2, 4, 4)
  def grads(c_):
    return jax.grad(lambda p: jnp.sum(mmdit.velocity({"params": p}, x + 1, t + 0.5, c, cfg=c_) ** 2))(params)
  want = grads(cfg)
  for name in ("dots",):  # one policy keeps the test cheap; all share nn.remat, only the saved set differs
    got = grads(dataclasses.replace(cfg, remat=True, remat_policy=name))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="remat_policy"):
    layers.remat_policy("everything")
