"""Diffusion-DPO for flow matching (Wallace et al. 2024; flow_grpo / Flow-Factory form, paper.md §7.2).

Rows are [winners; losers], sharing noise and t per pair. With e = mean (v - (eps - x0))^2:
    L = -log sigmoid(-beta / 2 * ((e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)))
"""

import jax
import jax.numpy as jnp


def dpo_loss(vel, batch, cfg):
  """``batch``: x0, eps (rows [w; l]). ``cfg``: beta."""
  u = batch["eps"] - batch["x0"]
  axes = tuple(range(1, u.ndim))
  e_theta = jnp.mean(jnp.square(vel.policy.astype(jnp.float32) - u), axis=axes)
  e_ref = jnp.mean(jnp.square(vel.ref.astype(jnp.float32) - u), axis=axes)
  n = e_theta.shape[0] // 2
  diff_w, diff_l = e_theta[:n] - e_ref[:n], e_theta[n:] - e_ref[n:]
  logits = -0.5 * cfg.beta * (diff_w - diff_l)
  loss = -jnp.mean(jax.nn.log_sigmoid(logits))
  return loss, {"policy_loss": loss, "implicit_acc": jnp.mean((logits > 0).astype(jnp.float32)),
                "e_theta_w": jnp.mean(e_theta[:n]), "e_theta_l": jnp.mean(e_theta[n:]),
                "e_ref_w": jnp.mean(e_ref[:n]), "e_ref_l": jnp.mean(e_ref[n:])}
