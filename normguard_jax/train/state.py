"""The RL train state: one pytree holding everything a step reads or writes.

LoRA: ``trainable`` is the adapter tree (``lora`` collection); ``frozen`` the base params, which with
the adapter gated off are also the reference. Full fine-tuning: ``trainable`` is the full param tree
and ``frozen`` the reference (pretrained) params, kept with the same structure (and shardings).
``old`` is the EMA "old"/sampling policy of the trainable tree (None when the method needs none).
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  old: Optional[Any]
  opt_state: Any
  rng: jax.Array
  lora: bool = flax.struct.field(pytree_node=False, default=False)

  def policy_variables(self, trainable=None):
    trainable = self.trainable if trainable is None else trainable
    return {"params": self.frozen, "lora": trainable} if self.lora else {"params": trainable}

  def old_variables(self):
    return {"params": self.frozen, "lora": self.old} if self.lora else {"params": self.old}

  def ref_variables(self):
    """Reference variables; with LoRA they must be called with an all-zero gate (adapter off)."""
    return {"params": self.frozen, "lora": self.trainable} if self.lora else {"params": self.frozen}


def create(trainable, frozen, optimizer, rng, *, lora, with_old):
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # the step donates the state: own its buffers
  old = copy(trainable) if with_old else None
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=copy(trainable), frozen=copy(frozen), old=old,
                    opt_state=optimizer.init(trainable), rng=jnp.array(rng), lora=lora)


def ema_update(old, new, decay):
  """old <- d old + (1 - d) new (NFT/AWM old-policy soft update, paper.md §5.2)."""
  return jax.tree_util.tree_map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


def old_decay(step, ramp=0.001, max_decay=0.5, flat_steps=0):
  """Piecewise-linear decay: 0 before ``flat_steps``, then min(ramp (step - flat), max) (decay_type 1)."""
  return jnp.where(step < flat_steps, 0.0, jnp.minimum(ramp * (step - flat_steps), max_decay))
