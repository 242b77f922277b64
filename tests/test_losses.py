"""Tier 1: advantages and the four base losses against hand-derived values and properties."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from normguard_jax.rl import advantages, awm, dpo, grpo, nft
from normguard_jax.flow import samplers
from normguard_jax.train.fused import Velocities


def _rand(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_group_advantages_zero_mean_per_group_and_global_std():
  r = jnp.array([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])
  a = advantages.group_advantages(r, 3, global_std=True, eps=0.0)
  np.testing.assert_allclose(np.asarray(a).reshape(2, 3).mean(1), 0.0, atol=1e-6)
  centred = np.array([-1, 0, 1, -2, -2, 4.0])
  np.testing.assert_allclose(a, centred / r.std(), rtol=1e-6)
  a_local = advantages.group_advantages(r, 3, global_std=False, eps=0.0)
  np.testing.assert_allclose(np.asarray(a_local).reshape(2, 3).std(1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="whole number of groups"):
    advantages.group_advantages(r, 4)


def test_best_worst_pairs():
  win, lose = advantages.best_worst_pairs(jnp.array([0.1, 0.9, 0.5, 2.0, 2.0, 2.0]), 3)
  np.testing.assert_array_equal(win, [1, 3])
  np.testing.assert_array_equal(lose, [0, 4])  # a tied group still gives two distinct rows


def _nft_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0), **kw))


def _fp_batch(b=4):
  x0, eps = _rand(0, (b, 4, 4, 1)), _rand(1, (b, 4, 4, 1))
  t = jnp.linspace(0.2, 0.9, b)
  x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps
  return {"x0": x0, "eps": eps, "t": t, "x_t": x_t, "adv": jnp.array([5.0, -5.0, 0.0, 2.5])[:b]}


def test_nft_matches_the_official_formula():
  batch = _fp_batch()
  v, v_old, v_ref = _rand(2, (4, 4, 4, 1)), _rand(3, (4, 4, 4, 1)), _rand(4, (4, 4, 4, 1))
  cfg = _nft_cfg(beta=0.7, kl_beta=0.1)
  loss, m = nft.nft_loss(Velocities(v, v_ref, v_old), batch, cfg)
  x0, x_t, t = map(np.asarray, (batch["x0"], batch["x_t"], batch["t"]))
  r = np.clip(np.asarray(batch["adv"]) / 5 / 2 + 0.5, 0, 1)
  def part(vv):
    x0h = x_t - t[:, None, None, None] * np.asarray(vv)
    w = np.maximum(np.abs(x0h - x0).mean((1, 2, 3)), 1e-5)
    return ((x0h - x0) ** 2).mean((1, 2, 3)) / w
  vp, vn = 0.7 * v + 0.3 * v_old, 1.7 * v_old - 0.7 * v
  expect = ((r * part(vp) + (1 - r) * part(vn)) / 0.7).mean() * 5 + 0.1 * ((v - v_ref) ** 2).mean()
  np.testing.assert_allclose(loss, expect, rtol=1e-5)
  assert m["r_mean"] == pytest.approx(r.mean())


def test_nft_gradient_vanishes_at_neutral_advantage_on_policy():
  """At v = v_old, v+ = v- and the r / (1 - r) terms pull in opposite directions: zero gradient at r = 1/2."""
  batch = dict(_fp_batch(), adv=jnp.zeros(4))
  v_old = _rand(3, (4, 4, 4, 1))
  g = jax.grad(lambda v: nft.nft_loss(Velocities(v, v_old, v_old), batch, _nft_cfg())[0])(v_old)
  np.testing.assert_allclose(g, 0.0, atol=1e-6)
  batch_pos = dict(batch, adv=jnp.full(4, 5.0))  # r = 1: plain x0-regression toward the sample
  g_pos = jax.grad(lambda v: nft.nft_loss(Velocities(v, v_old, v_old), batch_pos, _nft_cfg())[0])(v_old)
  u = batch["eps"] - batch["x0"]
  assert float(jnp.sum(g_pos * (v_old - u))) > 0  # descending moves v toward the target u


def _awm_cfg(**kw):
  return ml_collections.ConfigDict(dict(dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0,
                                             kl_beta=0.0, ema_kl_beta=0.0), **kw))


def test_awm_on_policy_gradient_is_advantage_weighted_log_prob_gradient():
  batch = _fp_batch()
  v0, v_ref = _rand(5, (4, 4, 4, 1)), _rand(6, (4, 4, 4, 1))
  cfg = _awm_cfg()
  loss, m = awm.awm_loss(Velocities(v0, v_ref, None), batch, cfg)
  adv = jnp.clip(batch["adv"], -5, 5) / 5
  np.testing.assert_allclose(loss, -jnp.mean(adv), rtol=1e-6)  # ratio = 1 on-policy
  def logp(v):
    l = jnp.mean(jnp.square(v - (batch["eps"] - batch["x0"])), axis=(1, 2, 3))
    return awm.awm_log_prob(l, batch["t"], "ghuber", 0.25)
  g = jax.grad(lambda v: awm.awm_loss(Velocities(v, v_ref, None), batch, cfg)[0])(v0)
  g_ref = jax.grad(lambda v: -jnp.mean(adv * logp(v)))(v0)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-8)


def test_awm_weightings():
  l, t = jnp.array([0.5]), jnp.array([0.4])
  assert awm.awm_log_prob(l, t, "uniform") == pytest.approx(-0.5)
  assert awm.awm_log_prob(l, t, "t") == pytest.approx(-0.2)
  assert awm.awm_log_prob(l, t, "t2") == pytest.approx(-0.08)
  assert awm.awm_log_prob(l, t, "ghuber", 1.0) == pytest.approx(-0.2, rel=1e-6)  # p = 1 is t * l
  assert awm.awm_log_prob(l, t, "ghuber", 0.25) == pytest.approx(-0.4 * ((0.5 + 1e-10) ** 0.25 - 1e-10 ** 0.25) / 0.25)
  with pytest.raises(ValueError):
    awm.awm_log_prob(l, t, "sigmoid")


def test_dpo_is_log2_at_reference_and_prefers_fitting_the_winner():
  b = 4
  batch = _fp_batch(b)
  u = batch["eps"] - batch["x0"]
  v_ref = _rand(7, u.shape)
  cfg = ml_collections.ConfigDict(dict(beta=100.0))
  loss, m = dpo.dpo_loss(Velocities(v_ref, v_ref, None), batch, cfg)
  assert float(loss) == pytest.approx(np.log(2.0), rel=1e-6)
  # moving winners (first half) toward their target lowers the loss; moving losers toward theirs raises it
  w = jnp.concatenate([jnp.ones((b // 2,)), jnp.zeros((b // 2,))])[:, None, None, None]
  better = v_ref + 0.05 * w * (u - v_ref)
  worse = v_ref + 0.05 * (1 - w) * (u - v_ref)
  assert dpo.dpo_loss(Velocities(better, v_ref, None), batch, cfg)[0] < loss
  assert dpo.dpo_loss(Velocities(worse, v_ref, None), batch, cfg)[0] > loss


def test_grpo_ratio_one_on_policy_and_kl_zero_at_reference():
  b = 3
  x, v = _rand(8, (b, 4, 4, 1)), _rand(9, (b, 4, 4, 1))
  t, tn = jnp.array([1.0, 0.6, 0.3]), jnp.array([0.9, 0.5, 0.2])
  std = samplers.sde_std(t[:, None, None, None], 0.9, 0.7)
  mean = samplers.sde_mean(x, v, t[:, None, None, None], tn[:, None, None, None], std)
  scale = std * jnp.sqrt(t - tn)[:, None, None, None]
  x_next = mean + scale * _rand(10, x.shape)
  lp_old = samplers.gaussian_log_prob(x_next, mean, scale)
  adv = jnp.array([1.0, -2.0, 0.5])
  batch = {"x_t": x, "x_next": x_next, "t": t, "t_next": tn, "t_max": jnp.full((b,), 0.9),
           "log_prob_old": lp_old, "adv": adv}
  cfg = ml_collections.ConfigDict(dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.04, noise_level=0.7))
  loss, m = grpo.grpo_loss(Velocities(v, v, None), batch, cfg)
  np.testing.assert_allclose(m["ratio_mean"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(m["kl_ref"], 0.0, atol=1e-10)
  np.testing.assert_allclose(loss, -jnp.mean(adv), rtol=1e-5)
  # a different reference gives the closed-form KL mean((mu - mu_ref)^2) / (2 std^2)
  v_ref = v + 0.1
  _, m2 = grpo.grpo_loss(Velocities(v, v_ref, None), batch, cfg)
  mean_ref = samplers.sde_mean(x, v_ref, t[:, None, None, None], tn[:, None, None, None], std)
  kl = (jnp.mean(jnp.square(mean - mean_ref), axis=(1, 2, 3)) / (2 * std.reshape(-1) ** 2)).mean()
  np.testing.assert_allclose(m2["kl_ref"], kl, rtol=1e-5)


# --- advantage options of the reference codes --------------------------------------------------------------------

def _flow_grpo_advantages(rewards, group_size, global_std):
  """flow_grpo / DiffusionNFT ``PerPromptStatTracker.update`` (flow_grpo/stat_tracking.py:12-32), one epoch."""
  rewards = np.asarray(rewards, np.float64)
  prompts = np.repeat(np.arange(len(rewards) // group_size), group_size)
  adv = np.empty_like(rewards)
  for p in np.unique(prompts):
    group = rewards[prompts == p]
    std = (np.std(rewards) if global_std else np.std(group)) + 1e-4
    adv[prompts == p] = (group - np.mean(group)) / std
  return adv


def _flow_factory_advantages(rewards, group_size, global_std, aggregation):
  """Flow-Factory ``compute_weighted_sum`` / ``compute_gdpo`` for one reward of weight 1
  (advantage/advantage_processor.py:259-262, 361-386, 455-470)."""
  r = np.asarray(rewards, np.float64)
  groups = np.repeat(np.arange(len(r) // group_size), group_size)
  adv = np.zeros_like(r)
  if aggregation == "gdpo":
    for g in np.unique(groups):
      m = groups == g
      adv[m] = (r[m] - np.mean(r[m])) / max(np.std(r[m]), 1e-6)
    return (adv - float(np.mean(adv))) / max(float(np.std(adv)), 1e-6)
  std = max(float(np.std(r)), 1e-6)
  for g in np.unique(groups):
    m = groups == g
    if not global_std:
      std = max(np.std(r[m]), 1e-6)
    adv[m] = (r[m] - np.mean(r[m])) / std
  return adv


REWARDS = np.array([0.1, 0.4, 0.35, 0.9, 2.0, 2.5, 1.0, 1.5, 0.3, 0.3, 0.3, 0.3])  # the last group is constant


@pytest.mark.parametrize("global_std", [True, False])
def test_advantages_match_flow_grpo_and_flow_factory(global_std):
  r = jnp.asarray(REWARDS, jnp.float32)
  np.testing.assert_allclose(advantages.group_advantages(r, 4, global_std=global_std),
                             _flow_grpo_advantages(REWARDS, 4, global_std), rtol=2e-5, atol=1e-6)
  ff = advantages.group_advantages(r, 4, global_std=global_std, eps=1e-6, eps_kind="floor")
  np.testing.assert_allclose(ff, _flow_factory_advantages(REWARDS, 4, global_std, "sum"), rtol=2e-5, atol=1e-6)
  if not global_std:  # the floor and the added epsilon differ visibly on a group of std 0.1
    g = jnp.asarray([1.0, 1.2, 1.0, 1.2], jnp.float32)
    np.testing.assert_allclose(advantages.group_advantages(g, 4, global_std=False, eps=1e-6, eps_kind="floor"),
                               [-1, 1, -1, 1], rtol=1e-5)
    np.testing.assert_allclose(advantages.group_advantages(g, 4, global_std=False), np.array([-1, 1, -1, 1]) * 0.1
                               / (0.1 + 1e-4), rtol=1e-5)


def test_gdpo_equals_per_group_std_unless_a_group_is_constant():
  r = jnp.asarray(REWARDS, jnp.float32)
  gdpo = advantages.group_advantages(r, 4, aggregation="gdpo")
  np.testing.assert_allclose(gdpo, _flow_factory_advantages(REWARDS, 4, False, "gdpo"), rtol=2e-5, atol=1e-6)
  per_group = advantages.group_advantages(r, 4, global_std=False, eps=1e-6, eps_kind="floor")
  np.testing.assert_allclose(gdpo, per_group / np.sqrt(2 / 3), rtol=2e-5, atol=1e-6)  # 2 of 3 groups vary
  varied = jnp.asarray(REWARDS[:8], jnp.float32)
  np.testing.assert_allclose(advantages.group_advantages(varied, 4, aggregation="gdpo"),
                             advantages.group_advantages(varied, 4, global_std=False, eps=1e-6, eps_kind="floor"),
                             rtol=2e-5, atol=1e-6)
  with pytest.raises(ValueError, match="aggregation"):
    advantages.group_advantages(r, 4, aggregation="mean")
  with pytest.raises(ValueError, match="eps_kind"):
    advantages.group_advantages(r, 4, eps_kind="clip")


def test_awm_advantage_modes_against_hand_values():
  a = jnp.array([-7.0, -5.0, -1.0, 0.0, 0.5, 2.0, 7.0])
  np.testing.assert_allclose(awm.adv_transform(a, "div5"), [-1, -1, -0.2, 0, 0.1, 0.4, 1], rtol=1e-6)
  np.testing.assert_allclose(awm.adv_transform(a, "div5", adv_max=2.0), [-2, -2, -0.4, 0, 0.2, 0.8, 2], rtol=1e-6)
  np.testing.assert_allclose(awm.adv_transform(a, "clamp"), [-1, -1, -1, 0, 0.5, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(awm.adv_transform(a, "clamp", adv_clip=2.0), [-2, -2, -1, 0, 0.5, 2, 2], rtol=1e-6)
  batch = _fp_batch()  # adv = [5, -5, 0, 2.5]
  v0, v_ref = _rand(5, (4, 4, 4, 1)), _rand(6, (4, 4, 4, 1))
  cases = ((_awm_cfg(), [1, -1, 0, 0.5]), (_awm_cfg(adv_mode="div5"), [1, -1, 0, 0.5]),
           (_awm_cfg(adv_mode="clamp"), [1, -1, 0, 1]), (_awm_cfg(adv_mode="clamp", adv_clip=3.0), [3, -3, 0, 2.5]))
  for cfg, want in cases:
    loss, _ = awm.awm_loss(Velocities(v0, v_ref, None), batch, cfg)
    np.testing.assert_allclose(loss, -np.mean(want), rtol=1e-6)  # on-policy ratio = 1: L = -mean A'
  with pytest.raises(ValueError, match="adv_mode"):
    awm.awm_loss(Velocities(v0, v_ref, None), batch, _awm_cfg(adv_mode="div1"))
