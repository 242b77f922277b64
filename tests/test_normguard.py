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
