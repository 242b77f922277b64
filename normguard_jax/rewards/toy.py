"""Cheap, deliberately hackable rewards for the CPU default (images in [-1, 1], NHWC).

They read raw sample values, unclipped, as a reward proxy that ignores what a display would clip:
that is the hack surface. Quality proxies that the reward does not see live in analysis/quality.py.
"""

import jax.numpy as jnp


def ink(images, cond):
  """Mean brightness (x + 1) / 2: more and brighter strokes score higher, also past the data range."""
  del cond
  return jnp.mean((images.astype(jnp.float32) + 1.0) / 2.0, axis=tuple(range(1, images.ndim)))


def contrast(images, cond):
  """Per-image pixel standard deviation: sharper, more saturated images score higher."""
  del cond
  x = images.astype(jnp.float32).reshape(images.shape[0], -1)
  return jnp.std(x, axis=1)


def center_ink(images, cond):
  """Brightness of the central 4x4 window minus the border's: rewards bold, centred strokes."""
  del cond
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  h, w = x.shape[1], x.shape[2]
  mask = jnp.zeros((h, w)).at[h // 4: 3 * h // 4, w // 4: 3 * w // 4].set(1.0)[None, :, :, None]
  inner = jnp.sum(x * mask, axis=(1, 2, 3)) / jnp.sum(mask)
  outer = jnp.sum(x * (1 - mask), axis=(1, 2, 3)) / jnp.sum(1 - mask)
  return inner - outer


TOY_REWARDS = {"ink": ink, "contrast": contrast, "center_ink": center_ink}
