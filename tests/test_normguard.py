"""Tier 1: the NormGuard hinge and the optax transform that owns lambda."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from normguard_jax.flow.norms import velocity_norm
from normguard_jax.rl import normguard as ng


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(mode="abs", hinge="linear", margin=0.0, t_min=0.0), **kw))


def _pair(scales):
  """v_ref random, v = scale_i * v_ref_i rotated a little, so ||v|| / ||v_ref|| = scale_i."""
  v_ref = jax.random.normal(jax.random.PRNGKey(0), (len(scales), 6))
  d = jax.random.normal(jax.random.PRNGKey(1), v_ref.shape)
  v = v_ref + 0.3 * d
  v = v / velocity_norm(v)[:, None] * velocity_norm(v_ref)[:, None] * jnp.asarray(scales)[:, None]
  return v, v_ref


def test_hinge_is_zero_with_zero_gradient_below_the_reference():
  v, v_ref = _pair([0.5, 0.9, 1.0 - 1e-4])
  for mode in ("abs", "relative"):
    pen, m = ng.normguard_penalty(v, v_ref, _cfg(mode=mode))
    assert float(pen) == 0.0 and float(m["ng_active_frac"]) == 0.0
    g = jax.grad(lambda x: ng.normguard_penalty(x, v_ref, _cfg(mode=mode))[0])(v)
    np.testing.assert_array_equal(g, 0.0)


def test_linear_abs_hinge_value_and_radial_gradient():
  v, v_ref = _pair([1.2, 0.8, 1.5])
  pen, m = ng.normguard_penalty(v, v_ref, _cfg())
  n, nr = velocity_norm(v), velocity_norm(v_ref)
  np.testing.assert_allclose(pen, jnp.sum(jax.nn.relu(n - nr)) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["ng_active_frac"], 2 / 3)
  np.testing.assert_allclose(m["ng_mean_rho"], np.mean([1.2, 0.8, 1.5]), rtol=1e-5)
  g = jax.grad(lambda x: ng.normguard_penalty(x, v_ref, _cfg())[0])(v)
  expect = np.asarray(v / n[:, None]) / 3 * np.array([1, 0, 1])[:, None]  # d||v||/dv = v / ||v||
  np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-7)
  # radial: the gradient is parallel to v, so a step along it changes the norm and not the direction
  cos = jnp.sum(g * v, 1) / (velocity_norm(g) * n + 1e-12)
  np.testing.assert_allclose(cos[jnp.array([0, 2])], 1.0, rtol=1e-5)
  # the reference gets no gradient (stop-gradient)
  g_ref = jax.grad(lambda r: ng.normguard_penalty(v, r, _cfg())[0])(v_ref)
  np.testing.assert_array_equal(g_ref, 0.0)


def test_relative_squared_margin_and_t_min():
  v, v_ref = _pair([1.3, 1.05, 1.01])
  pen, _ = ng.normguard_penalty(v, v_ref, _cfg(mode="relative", hinge="squared", margin=0.02))
  np.testing.assert_allclose(pen, ((0.3 - 0.02) ** 2 + (0.05 - 0.02) ** 2) / 3, rtol=1e-4)
  t = jnp.array([0.9, 0.05, 0.5])
  pen_t, m = ng.normguard_penalty(v, v_ref, _cfg(mode="relative", t_min=0.1), t=t)
  np.testing.assert_allclose(pen_t, (0.3 + 0.01) / 3, rtol=1e-4)  # the t = 0.05 sample is masked out
  with pytest.raises(ValueError, match="mode"):
    ng.normguard_penalty(v, v_ref, _cfg(mode="ratio"))
  with pytest.raises(ValueError, match="hinge"):
    ng.normguard_penalty(v, v_ref, _cfg(hinge="cubic"))


def test_lambda_kinds():
  p = {"w": jnp.ones(2)}
  tx = ng.normguard_lambda("constant", 0.3)
  s = tx.init(p)
  u, s = tx.update(p, s, p, ng_excess=jnp.float32(5.0))
  np.testing.assert_array_equal(u["w"], p["w"])  # gradients pass through
  assert float(ng.current_lambda(s)) == pytest.approx(0.3)

  tx = ng.normguard_lambda("schedule", schedule=optax.linear_schedule(0.0, 2.0, 4))
  s = tx.init(p)
  lams = [float(ng.current_lambda(s))]
  for _ in range(5):
    _, s = tx.update(p, s, p)
    lams.append(float(ng.current_lambda(s)))
  np.testing.assert_allclose(lams, [0.0, 0.5, 1.0, 1.5, 2.0, 2.0])

  tx = ng.normguard_lambda("adaptive", 1.0, dual_lr=10.0, target=0.01, lambda_max=1.5)
  s = tx.init(p)
  _, s = tx.update(p, s, p, ng_excess=jnp.float32(0.03), ng_active_frac=jnp.float32(0.5))
  assert float(ng.current_lambda(s)) == pytest.approx(1.2)
  assert float(s.last_active_frac) == pytest.approx(0.5)
  _, s = tx.update(p, s, p, ng_excess=jnp.float32(0.5))
  assert float(ng.current_lambda(s)) == pytest.approx(1.5)  # clipped at lambda_max
  for _ in range(3):
    _, s = tx.update(p, s, p, ng_excess=jnp.float32(0.0))
  assert float(ng.current_lambda(s)) == pytest.approx(1.5 - 0.3)
  with pytest.raises(ValueError):
    ng.normguard_lambda("cosine")


def test_current_lambda_inside_a_chain_and_absent():
  p = {"w": jnp.ones(2)}
  chain = optax.chain(optax.clip_by_global_norm(1.0), ng.normguard_lambda("constant", 0.7), optax.adam(1e-3))
  assert float(ng.current_lambda(chain.init(p))) == pytest.approx(0.7)
  assert float(ng.current_lambda(optax.adam(1e-3).init(p))) == 0.0


# --- adaptive lambda on the penalty's own gap and mask (issue 12 item 6) -----------------------------------------

def _dual_ascent(tx, v, v_ref, cfg, t=None, steps=300):
  """Feed the penalty's metrics to the transform as the train step does, ``steps`` times; lambda after each."""
  _, m = ng.normguard_penalty(v, v_ref, cfg, t=t)
  p = {"w": jnp.ones(2)}
  extra = {k: m[k] for k in ("ng_excess", "ng_active_frac", "ng_gap_mean", "ng_valid_frac") if k in m}

  def run(s):
    def body(s, _):
      s = tx.update(p, s, p, **extra)[1]
      return s, ng.current_lambda(s)
    return jax.lax.scan(body, s, None, length=steps)[1]
  return np.asarray(jax.jit(run)(tx.init(p))), m


def test_adaptive_lambda_ignores_rows_inside_the_margin():
  """rho = 1.05 with margin 0.1: the hinge is 0, so dual ascent must not move lambda (it climbed to 151 before)."""
  v, v_ref = _pair([1.05] * 4)
  cfg = _cfg(mode="relative", margin=0.1)
  lams, m = _dual_ascent(ng.normguard_lambda("adaptive", 1.0, dual_lr=10.0), v, v_ref, cfg)
  np.testing.assert_array_equal(lams, 1.0)
  assert float(m["ng_penalty"]) == 0.0 and float(m["ng_excess"]) == 0.0
  np.testing.assert_allclose(m["ng_gap_mean"], -0.05, atol=1e-5)
  v, v_ref = _pair([1.05] * 4)  # the same rows in abs mode: gap = ||v|| - 1.1 ||v_ref|| < 0
  lams, _ = _dual_ascent(ng.normguard_lambda("adaptive", 1.0, dual_lr=10.0), v, v_ref, _cfg(mode="abs", margin=0.1))
  np.testing.assert_array_equal(lams, 1.0)


@pytest.mark.parametrize("excess", ["hinge", "signed"])
def test_adaptive_lambda_is_constant_when_every_row_is_masked(excess):
  v, v_ref = _pair([1.5, 1.3, 0.7])
  cfg = _cfg(mode="relative", t_min=0.2)
  t = jnp.array([0.1, 0.05, 0.15])
  tx = ng.normguard_lambda("adaptive", 1.0, dual_lr=10.0, target=0.01, **({"excess": excess} if excess != "hinge"
                                                                           else {}))
  lams, m = _dual_ascent(tx, v, v_ref, cfg, t=t, steps=20)
  np.testing.assert_array_equal(lams, 1.0)
  assert float(m["ng_penalty"]) == 0.0 and float(m["ng_valid_frac"]) == 0.0


def test_excess_is_the_masked_mean_of_the_penalty_gap():
  v, v_ref = _pair([1.3, 1.05, 1.2, 0.8])
  t = jnp.array([0.9, 0.5, 0.05, 0.6])  # the third row is masked
  _, m = ng.normguard_penalty(v, v_ref, _cfg(mode="relative", margin=0.1, t_min=0.1), t=t)
  gaps = np.array([0.2, -0.05, -0.3])  # rows 0, 1, 3: rho - 1.1
  np.testing.assert_allclose(m["ng_excess"], np.maximum(gaps, 0).mean(), rtol=1e-4)
  np.testing.assert_allclose(m["ng_gap_mean"], gaps.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["ng_valid_frac"], 0.75)
  np.testing.assert_allclose(m["ng_active_frac"], 1 / 3, rtol=1e-6)
  _, m_abs = ng.normguard_penalty(v, v_ref, _cfg(mode="abs", margin=0.1, t_min=0.1), t=t)
  n, nr = np.asarray(velocity_norm(v)), np.asarray(velocity_norm(v_ref))
  g_abs = (n - 1.1 * nr)[[0, 1, 3]]
  np.testing.assert_allclose(m_abs["ng_excess"], np.maximum(g_abs, 0).mean(), rtol=1e-4)
  np.testing.assert_allclose(m_abs["ng_gap_mean"], g_abs.mean(), rtol=1e-4)


def test_signed_lambda_falls_under_the_margin_and_rises_above():
  cfg = _cfg(mode="relative", margin=0.1)
  tx = lambda: ng.normguard_lambda("adaptive", 1.0, dual_lr=2.0, excess="signed")
  under, m = _dual_ascent(tx(), *_pair([0.9, 1.0, 1.05]), cfg, steps=5)  # E rho = 0.983 < 1.1
  np.testing.assert_allclose(under, np.maximum(1.0 + 2.0 * np.arange(1, 6) * float(m["ng_gap_mean"]), 0.0), rtol=1e-5)
  assert under[0] < 1.0
  floored, _ = _dual_ascent(tx(), *_pair([0.5, 0.5]), cfg, steps=5)
  np.testing.assert_array_equal(floored[-2:], 0.0)  # lambda >= 0
  over, _ = _dual_ascent(tx(), *_pair([1.3, 1.2, 1.05]), cfg, steps=5)  # E rho = 1.183 > 1.1
  assert np.all(np.diff(np.concatenate([[1.0], over])) > 0)
  # the hinge statistic with target 0 can only hold or grow lambda (findings.md); the signed one falls
  hinge, _ = _dual_ascent(ng.normguard_lambda("adaptive", 1.0, dual_lr=2.0), *_pair([0.9, 1.0, 1.05]), cfg, steps=5)
  np.testing.assert_array_equal(hinge, 1.0)
  with pytest.raises(ValueError, match="ng_gap_mean"):
    p = {"w": jnp.ones(2)}
    tx().update(p, tx().init(p), p, ng_excess=jnp.float32(0.1))
  with pytest.raises(ValueError, match="excess"):
    ng.normguard_lambda("adaptive", excess="mean")
