"""Shared building blocks: timestep embedding, adaLN modulation, 2D sin-cos positions, patchify."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def timestep_embedding(t, dim, max_period=10000.0):
  """Sinusoidal embedding of t (in [0, 1]) scaled to diffusers' 0..1000 timesteps (DiT / SD3).

  Returns [cos, sin] halves, as ``Timesteps(flip_sin_to_cos=True)`` in diffusers.
  """
  t = jnp.asarray(t, jnp.float32) * 1000.0
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, with per-sample (B, D) shift and scale over tokens."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def sincos_pos_embed_2d(dim, grid_h, grid_w):
  """Fixed 2D sin-cos position embedding (MAE/DiT), shape (grid_h * grid_w, dim)."""
  assert dim % 4 == 0, "2D sin-cos embedding needs dim divisible by 4"

  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  emb = np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1)
  return jnp.asarray(emb, jnp.float32)


def patchify(x, p):
  """(B, H, W, C) -> (B, H/p * W/p, p*p*C) tokens, row-major over patches."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens, p, h, w, c):
  """Inverse of :func:`patchify`."""
  b = tokens.shape[0]
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


# Named rematerialisation (gradient checkpointing) policies for nn.remat, chosen by name in model configs:
# what each block keeps from its forward pass for the backward (MaxText's ``remat_policy`` names, simplified).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,               # keep only block inputs; recompute all
    "dots": jax.checkpoint_policies.dots_saveable,                  # keep every matmul output
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
    "minimal_offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def remat_policy(name):
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]
