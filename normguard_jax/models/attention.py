"""Attention dispatcher: one entry, several implementations (DESIGN.md §2).

``xla`` is the plain reference (einsum + softmax in float32), always available. ``jax`` routes to
``jax.nn.dot_product_attention``, which picks cuDNN / TPU kernels where the backend has them.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "jax")


def dot_product_attention(q, k, v, *, impl="xla"):
  """Scaled dot-product attention over (B, L, H, Dh) tensors, no mask."""
  if impl == "xla":
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", weights, v)
  if impl == "jax":
    return jax.nn.dot_product_attention(q, k, v)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLEMENTATIONS}")
