"""The RL train state: one pytree holding everything a step reads or writes.

LoRA: ``trainable`` is the adapter tree (``lora`` collection); ``frozen`` the base params, which with
the adapter gated off are also the reference. Full fine-tuning: ``trainable`` is the full param tree
and ``frozen`` the reference (pretrained) params, kept with the same structure (and shardings).
``old`` is the EMA "old"/sampling policy of the trainable tree (None when the method needs none).
``eval_ema`` is a separate EMA of the trainable tree that only the evaluation scores (official DiffusionNFT's
eval EMA, min((1 + s) / (10 + s), 0.9); Flow-Factory's DPO eval EMA), None unless ``eval.policy`` is 'ema'.
The trainable tree, ``old``, ``eval_ema`` and the optimizer moments are float32 master copies; ``frozen`` keeps
the model's ``param_dtype``.
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
  eval_ema: Optional[Any] = None
  lora: bool = flax.struct.field(pytree_node=False, default=False)

  def policy_variables(self, trainable=None):
    trainable = self.trainable if trainable is None else trainable
    return {"params": self.frozen, "lora": trainable} if self.lora else {"params": trainable}

  def old_variables(self):
    return {"params": self.frozen, "lora": self.old} if self.lora else {"params": self.old}

  def eval_ema_variables(self):
    return {"params": self.frozen, "lora": self.eval_ema} if self.lora else {"params": self.eval_ema}

  def ref_variables(self):
    """Reference variables; with LoRA they must be called with an all-zero gate (adapter off)."""
    return {"params": self.frozen, "lora": self.trainable} if self.lora else {"params": self.frozen}


def create(trainable, frozen, optimizer, rng, *, lora, with_old, with_eval_ema=False):
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # the step donates the state: own its buffers
  old = copy(trainable) if with_old else None
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=copy(trainable), frozen=copy(frozen), old=old,
                    opt_state=optimizer.init(trainable), rng=jnp.array(rng),
                    eval_ema=copy(trainable) if with_eval_ema else None, lora=lora)


def ema_update(old, new, decay):
  """old <- d old + (1 - d) new (NFT/AWM old-policy soft update, paper.md §5.2)."""
  return jax.tree_util.tree_map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


EMA_KINDS = ("piecewise_linear", "linear_warmup", "power", "constant")


def old_decay(step, ramp=0.001, max_decay=0.5, flat_steps=0, *, kind="piecewise_linear", warmup=10,
              initial_decay=0.0):
  """Decay d of the old/EMA soft update old <- d old + (1 - d) new, at ``step``.

  kind 'piecewise_linear': 0 before ``flat_steps``, then min(ramp (step - flat), max_decay): official DiffusionNFT
    ``return_decay`` (decay_type 1: ramp 0.001, max 0.5; train_nft_sd3.py:169-189), official AWM's 'linear' EMA
    (min(0.3, 0.001 step), train_sd3_awm.py:1410-1413) and Flow-Factory ``piecewise_linear`` (ema_utils.py:78-102).
  kind 'linear_warmup': Flow-Factory ``linear`` (ema_utils.py:55-75): initial + (max - initial) min(step / warmup,
    1). FF's SD3.5 AWM example (warmup 1000, max 0.3) gives 0.0003 step; its FLUX.1 AWM (warmup 300) = min(0.001
    step, 0.3).
  kind 'power': Flow-Factory ``power`` (ema_utils.py:38-52): min(max_decay, (1 + step) / (warmup + step)), a
    constant max_decay when warmup = 0; FF's default warmup is 10 (create_decay_fn, ema_utils.py:154-160).
  kind 'constant': max_decay (FF ``constant``; official AWM ``kl_ema_decay_type`` 'constant').
  The step index differs between the references, and the caller passes the one it reproduces:
    official NFT / AWM: ``global_step`` after its increment, i.e. the number of optimizer updates so far (1 after
    the first update; train_nft_sd3.py:1021,1035; train_sd3_awm.py:1413). That is ``TrainState.step`` after
    the update.
    Flow-Factory: the 0-based epoch (rollout iteration) whose update just finished (``ema_step(step=self.epoch)``
    before ``epoch += 1``, trainers/nft.py:237, trainers/awm.py:125-126): one step behind the official index with
    one update per iteration, and not the update count when an iteration makes several updates.
  """
  step = jnp.asarray(step, jnp.float32)
  if kind == "piecewise_linear":
    return jnp.where(step < flat_steps, 0.0, jnp.minimum(ramp * (step - flat_steps), max_decay))
  if kind == "linear_warmup":
    if warmup <= 0:
      raise ValueError(f"EMA kind 'linear_warmup' needs warmup > 0, got {warmup}")
    return initial_decay + (max_decay - initial_decay) * jnp.minimum(step / warmup, 1.0)
  if kind == "power":
    if warmup < 0:
      raise ValueError(f"EMA kind 'power' needs warmup >= 0, got {warmup}")
    if warmup == 0:
      return jnp.full_like(step, max_decay)
    return jnp.minimum(max_decay, (1.0 + step) / (warmup + step))
  if kind == "constant":
    return jnp.full_like(step, max_decay)
  raise ValueError(f"unknown EMA decay kind {kind!r}; expected one of {EMA_KINDS}")
