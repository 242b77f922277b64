"""LoRA dense layer with a per-row, per-adapter gate.

y = x W + b + (alpha / r) * sum_j gate[row, j] * (x A_j) B_j.

Adapters are stacked on the last axis of the ``lora`` leaves (A: (in, r, J), B: (r, out, J)), so that
stacking works the same whether or not layers are scanned. One batched forward
can serve policy rows (gate = [1, 0]), old-policy rows ([0, 1]) and reference rows ([0, 0]) with the
base weights shared (DESIGN.md §3, "Velocities"). Gate 0 gives the base model exactly: the delta is
multiplied by an exact zero. B is initialised to zero, so a fresh adapter is the base model too.
"""

import flax.linen as nn
import jax.numpy as jnp


class LoRADense(nn.Module):
  features: int
  lora_rank: int = 0
  lora_alpha: float = 1.0
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.xavier_uniform()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, lora_gate=None):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
    y = jnp.dot(x, kernel.astype(x.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
    if self.lora_rank <= 0:
      return y
    a = self.variable("lora", "lora_a",
                      lambda: nn.initializers.normal(1.0 / self.lora_rank)(
                          self.make_rng("params"), (x.shape[-1], self.lora_rank, 1))).value
    b = self.variable("lora", "lora_b", lambda: jnp.zeros((self.lora_rank, self.features, 1))).value
    num_adapters = a.shape[-1]
    if lora_gate is None:  # policy only: first adapter on every row
      lora_gate = jnp.zeros((x.shape[0], num_adapters), x.dtype).at[:, 0].set(1)
    # Every adapter's down-projection (..., r, J), gated per row, summed over (r, J) in the up-projection:
    # a single LoRA of rank r * J whose rank components are switched per row.
    h = jnp.einsum("...i,irj->...rj", x, a.astype(x.dtype))
    gate = lora_gate.astype(x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (1, num_adapters))
    delta = jnp.einsum("...rj,roj->...o", h * gate, b.astype(x.dtype))
    return y + (self.lora_alpha / self.lora_rank) * delta
