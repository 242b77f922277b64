"""Flow-GRPO loss (Liu et al. 2025, arXiv 2505.05470; official code, paper.md §8.2-8.4).

At a stored SDE transition (x_k -> x_{k+1}, t_k -> t_{k+1}) of the rollout:
    mean_theta = SDE mean from v_theta(x_k, t_k);   log p = element-mean Gaussian log-density of x_{k+1}
    ratio = exp(log p_theta - log p_old)
    L = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_beta mean_b mean (mean_theta - mean_ref)^2 / (2 std^2)
"""

import jax.numpy as jnp

from normguard_jax.flow import samplers


def grpo_loss(vel, batch, cfg):
  """``batch``: x_t (= x_k), x_next, t, t_next, t_max, log_prob_old, adv. ``cfg``: clip_range,
  adv_clip_max, kl_beta, noise_level."""
  x, x_next, t, t_next = batch["x_t"], batch["x_next"], batch["t"], batch["t_next"]
  bshape = (-1,) + (1,) * (x.ndim - 1)
  t_b, tn_b = t.reshape(bshape), t_next.reshape(bshape)
  std = samplers.sde_std(t_b, batch["t_max"].reshape(bshape), cfg.noise_level)
  scale = std * jnp.sqrt(t_b - tn_b)
  mean = samplers.sde_mean(x, vel.policy.astype(jnp.float32), t_b, tn_b, std)
  mean_ref = samplers.sde_mean(x, vel.ref.astype(jnp.float32), t_b, tn_b, std)
  logp = samplers.gaussian_log_prob(x_next, mean, scale)
  ratio = jnp.exp(logp - batch["log_prob_old"])
  adv = jnp.clip(batch["adv"], -cfg.adv_clip_max, cfg.adv_clip_max)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
  policy_loss = jnp.mean(jnp.maximum(-adv * ratio, -adv * clipped))
  axes = tuple(range(1, x.ndim))
  kl = jnp.mean(jnp.mean(jnp.square(mean - mean_ref), axis=axes) / (2.0 * jnp.square(std.reshape(-1))))
  loss = policy_loss + cfg.kl_beta * kl
  return loss, {"policy_loss": policy_loss, "kl_ref": kl, "ratio_mean": jnp.mean(ratio),
                "clip_frac": jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_range).astype(jnp.float32))}
