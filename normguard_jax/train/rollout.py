"""Rollout: sample with the sampling policy as a lax.scan, with rho_k against the reference on the
same trajectory (DESIGN.md §3, "Rollout"), then score with the reward."""

import jax
import jax.numpy as jnp

from normguard_jax.flow import norms, samplers


def rollout(sample_vars, ref_vars, cond, uncond, key, *, apply_fn, image_shape, grid, cfg_scale, noise_level, lora,
            track_rho=True, solver="euler"):
  """Returns dict: x0 (B, ...), xs (K+1, B, ...), log_probs (K, B), grid (K+1,), rho (K, B),
  norm (K, B), norm_ref (K, B). ``cond`` and ``uncond`` (the null conditioning for CFG; unused when
  ``cfg_scale`` is 1) are pytrees with B rows. With LoRA, ``ref_vars`` are called with the adapter gated off.
  ``grid``: the task's sampling grid t_0 = 1 > ... > t_K = 0 (``task.sampling_grid``: the recipe's grid kind, shift
  or FLUX mu); ``solver``: 'euler' (ODE, or the Flow-GRPO SDE when ``noise_level`` > 0) or 'dpm2'
  (flow/samplers.py)."""
  b = jax.tree_util.tree_leaves(cond)[0].shape[0]
  k_noise, k_sde = jax.random.split(key)
  x1 = jax.random.normal(k_noise, (b,) + tuple(image_shape), jnp.float32)
  grid = jnp.asarray(grid, jnp.float32)
  ref_gate = jnp.zeros((b, 1), jnp.float32) if lora else None

  def guided(variables, gate, x, t):
    v = apply_fn(variables, x, t, cond, gate)
    if cfg_scale == 1.0:
      return v
    return samplers.cfg_combine(v, apply_fn(variables, x, t, uncond, gate), cfg_scale)

  def velocity_fn(x, t):
    v = guided(sample_vars, None, x, t)
    n = norms.velocity_norm(v)
    n_ref = norms.velocity_norm(guided(ref_vars, ref_gate, x, t)) if track_rho else n
    return v, {"norm": n, "norm_ref": n_ref}

  traj = samplers.sample(velocity_fn, x1, grid, k_sde if noise_level > 0 else None, noise_level=noise_level,
                         solver=solver)
  return {"x0": traj.xs[-1], "xs": traj.xs, "log_probs": traj.log_probs, "grid": grid,
          "norm": traj.aux["norm"], "norm_ref": traj.aux["norm_ref"],
          "rho": traj.aux["norm"] / jnp.maximum(traj.aux["norm_ref"], 1e-12)}
