"""The train step: fused velocities -> base loss + lambda * NormGuard -> one backward -> optax chain.

lambda is read from the optimizer state before the backward pass (rl/normguard.py); the hinge
statistics go back into the chain as extra args. A step whose loss or gradients are not finite is
skipped: params and optimizer state are kept, and ``skipped`` = 1 is logged.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from normguard_jax.rl import losses as losses_lib
from normguard_jax.rl import normguard as ng
from normguard_jax.train import fused


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def split_microbatches(batch, num_microbatches, *, paired=False):
  """Rows -> (M, rows / M, ...) for gradient accumulation. Microbatch j takes the strided rows j, j + M, ...,
  so a row-sharded batch stays row-sharded inside every microbatch. ``paired`` (DPO's [w; l] rows): each half
  is split alike, so row i of the winners still faces row i of the losers."""
  m = num_microbatches

  def split(x):
    n = x.shape[0]
    halves = jnp.split(x, 2) if paired else [x]
    per = n // len(halves)
    if per % m:
      raise ValueError(f"{per} rows{' per half' if paired else ''} do not split into {m} microbatches")
    parts = [h.reshape((per // m, m) + h.shape[1:]).swapaxes(0, 1) for h in halves]
    return jnp.concatenate(parts, axis=1)
  return jax.tree_util.tree_map(split, batch)


def guided_apply(apply_fn, cfg_scale):
  """CFG in the training forward (Flow-Factory's FLUX.2-klein trainers): the velocity of every branch is
  v_u + w (v_c - v_u), with gradients through both; ``cond`` is then {"c": cond, "u": uncond}."""
  from normguard_jax.flow import samplers

  def apply(variables, x, t, cond, gate):
    return samplers.cfg_combine(apply_fn(variables, x, t, cond["c"], gate), apply_fn(variables, x, t, cond["u"], gate),
                                cfg_scale)
  return apply


# NormGuard statistics that are means over the hinge's unmasked rows: with microbatches they are recombined
# weighted by each microbatch's unmasked fraction, so that they equal the whole-batch means.
_MASKED_MEANS = ("ng_excess", "ng_gap_mean", "ng_active_frac")


def train_step(state, batch, *, method, apply_fn, optimizer, loss_cfg, ng_cfg, strategy="split",
               num_microbatches=1, cfg_scale=1.0):
  """(state, batch) -> (state, metrics). ``batch`` holds x_t, t, cond and the loss's own fields (and ``uncond``
  when ``cfg_scale`` != 1: CFG in the training forward).

  With ``num_microbatches`` M > 1 the gradient is the mean over M equal microbatches, accumulated in a
  ``lax.scan`` (one optimizer update, the same as one big batch up to summation order); metrics are means.
  """
  base_loss = losses_lib.BASE_LOSSES[method]
  lam = ng.current_lambda(state.opt_state)
  if cfg_scale != 1.0:
    apply_fn = guided_apply(apply_fn, cfg_scale)
    batch = dict(batch, cond={"c": batch["cond"], "u": batch["uncond"]})
    del batch["uncond"]

  def loss_fn(trainable, batch):
    vel = fused.fused_velocities(apply_fn, trainable, state.frozen, state.old, batch["x_t"], batch["t"],
                                 batch["cond"], lora=state.lora, strategy=strategy)
    base, metrics = base_loss(vel, batch, loss_cfg)
    penalty, ng_metrics = ng.normguard_penalty(vel.policy, vel.ref, ng_cfg, t=batch["t"])
    total = base + lam * penalty
    return total, (base, penalty, metrics, ng_metrics)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    (total, (base, penalty, metrics, ng_metrics)), grads = grad_fn(state.trainable, batch)
  else:
    micro = split_microbatches(batch, num_microbatches, paired=method == "dpo")

    def accumulate(g_sum, mb):
      out, g = grad_fn(state.trainable, mb)
      return jax.tree_util.tree_map(jnp.add, g_sum, g), out

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    g_sum, outs = jax.lax.scan(accumulate, zeros, micro)
    grads = jax.tree_util.tree_map(lambda g: g / num_microbatches, g_sum)
    per_micro_ng = outs[1][3]
    total, (base, penalty, metrics, ng_metrics) = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), outs)
    w = per_micro_ng["ng_valid_frac"]
    ng_metrics = dict(ng_metrics, **{k: jnp.sum(per_micro_ng[k] * w) / jnp.maximum(jnp.sum(w), 1e-12)
                                     for k in _MASKED_MEANS})
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable,
                                        ng_excess=ng_metrics["ng_excess"],
                                        ng_active_frac=ng_metrics["ng_active_frac"],
                                        ng_gap_mean=ng_metrics["ng_gap_mean"],
                                        ng_valid_frac=ng_metrics["ng_valid_frac"])
  trainable = optax.apply_updates(state.trainable, updates)
  finite = jnp.isfinite(total) & _all_finite(grads)
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(step=state.step + finite.astype(jnp.int32),
                            trainable=keep(trainable, state.trainable),
                            opt_state=keep(opt_state, state.opt_state))
  weighted = lam * penalty
  out = dict(metrics, **ng_metrics)
  out.update(loss=total, base_loss=base, ng_lambda=lam,
             ng_share=jnp.abs(weighted) / jnp.maximum(jnp.abs(base) + jnp.abs(weighted), 1e-12),
             grad_norm=optax.tree.norm(grads), skipped=1.0 - finite.astype(jnp.float32))
  return new_state, out


def make_train_step(**kwargs):
  """Jitted train step with the state donated."""
  return jax.jit(functools.partial(train_step, **kwargs), donate_argnums=(0,))


def make_sharded_train_step(mesh, state, **kwargs):
  """The train step as one ``jax.jit`` with explicit in/out shardings from the rules table and the state donated.

  ``state`` may be concrete or abstract (ShapeDtypeStruct). The reference params (``state.frozen``) get the same
  shardings as the policy's, by the same rules. Every batch field is split on its leading (row) axis over
  ('data', 'fsdp'); metrics come back replicated. Returns (step, state_shardings, batch_sharding).
  """
  from normguard_jax.parallel import rules, sharding  # keep the single-device path import-light
  from normguard_jax.train import programs  # the one builder: traced under the activation mesh
  state_sh = rules.tree_shardings(state, mesh)
  batch_sh = rules.batch_sharding(mesh, 1)  # a pytree prefix: applies to every batch leaf
  step = programs.sharded_jit(functools.partial(train_step, **kwargs), mesh, in_shardings=(state_sh, batch_sh),
                              out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  return step, state_sh, batch_sh
