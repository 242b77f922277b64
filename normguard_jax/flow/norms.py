"""Velocity norms and the per-step ratio rho_k = ||v_theta|| / ||v_ref|| (DESIGN.md §1)."""

import jax.numpy as jnp


def velocity_norm(v):
  """Per-sample L2 norm over all non-batch elements, always in float32."""
  v = v.astype(jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim))))


def norm_ratio(v, v_ref, eps=1e-12):
  """rho = ||v|| / ||v_ref|| per sample."""
  return velocity_norm(v) / jnp.maximum(velocity_norm(v_ref), eps)
