"""DiffusionNFT loss (Zheng et al. 2025, arXiv 2509.16117; official code, paper.md §5.2).

    r = clip(A, -c, c) / c / 2 + 1/2                       optimality probability
    v+ = beta v + (1 - beta) v_old,   v- = (1 + beta) v_old - beta v
    L+ = mean (x0_hat(v+) - x0)^2 / sg(mean |x0_hat(v+) - x0|)   (adaptive x0-space weight, clip 1e-5)
    L = c * mean_b (r L+ + (1 - r) L-) / beta + kl_beta * mean (v - v_ref)^2
"""

import jax
import jax.numpy as jnp


def _mean_nb(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _adaptive_x0_loss(v, x_t, x0, t):
  x0_hat = x_t - t.reshape((-1,) + (1,) * (x_t.ndim - 1)) * v
  w = jax.lax.stop_gradient(jnp.maximum(_mean_nb(jnp.abs(x0_hat - x0)), 1e-5))
  return _mean_nb(jnp.square(x0_hat - x0)) / w


def nft_loss(vel, batch, cfg):
  """``batch``: x0, x_t, t, adv. ``cfg``: beta, adv_clip_max, kl_beta. Needs vel.old (v_old, no grad)."""
  c = cfg.adv_clip_max
  r = jnp.clip(jnp.clip(batch["adv"], -c, c) / c / 2.0 + 0.5, 0.0, 1.0)
  v, v_old = vel.policy.astype(jnp.float32), vel.old.astype(jnp.float32)
  v_pos = cfg.beta * v + (1.0 - cfg.beta) * v_old
  v_neg = (1.0 + cfg.beta) * v_old - cfg.beta * v
  l_pos = _adaptive_x0_loss(v_pos, batch["x_t"], batch["x0"], batch["t"])
  l_neg = _adaptive_x0_loss(v_neg, batch["x_t"], batch["x0"], batch["t"])
  policy_loss = jnp.mean((r * l_pos + (1.0 - r) * l_neg) / cfg.beta) * c
  kl = jnp.mean(_mean_nb(jnp.square(v - vel.ref.astype(jnp.float32))))
  loss = policy_loss + cfg.kl_beta * kl
  return loss, {"policy_loss": policy_loss, "kl_ref": kl, "r_mean": jnp.mean(r)}
