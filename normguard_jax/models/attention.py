"""Attention dispatcher: one entry, several implementations (DESIGN.md §2).

``xla`` is the plain reference (einsum + softmax in float32), always available. ``jax`` routes to
``jax.nn.dot_product_attention``, which picks cuDNN / TPU kernels where the backend has them.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "jax")


def dot_product_attention(q, k, v, *, impl="xla", mask=None):
  """Scaled dot-product attention over (B, L, H, Dh) tensors.

  ``mask``: None, or a boolean array broadcastable to (B, H, L, M); True = the query may attend to the key.
  With ``xla`` a query row with no allowed key gets uniform weights over all keys (finite, never NaN).
  """
  if impl == "xla":
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("blhd,bmhd->bhlm", q, k).astype(jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhlm,bmhd->blhd", weights, v)
  if impl == "jax":
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLEMENTATIONS}")
