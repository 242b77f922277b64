"""NormGuard: a hinge on the per-step velocity norm, active only where ||v_theta|| > ||v_ref||.

    L_total = L_base + lambda * mean_b h(||v_theta||, sg(||v_ref||))                (paper.md §3.2)
    h = relu(g) (linear) or relu(g)^2 (squared), with the gap
    g = ||v_theta|| - (1 + m) ||v_ref||   (abs)   or   ||v_theta|| / ||v_ref|| - (1 + m)   (relative).

The gradient of the linear hinge w.r.t. v_theta is radial, lambda v / ||v|| (per active sample, divided
by the batch size), and zero below the reference: it shrinks magnitude and never turns direction.

lambda is owned by an optax ``GradientTransformationExtraArgs`` (:func:`normguard_lambda`) placed in
the optimizer chain: a constant, a schedule of the update count, or dual ascent on a constraint measured
by the penalty itself (lambda <- clip(lambda + eta (c - target), 0, lambda_max), where c is the masked mean
of relu(g) ('hinge') or of g ('signed'), over the rows the penalty sees). The train step reads lambda from
the optimizer state (:func:`current_lambda`) before its single backward pass, then hands the hinge
statistics to the chain as extra args; the transform leaves the gradients untouched.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from normguard_jax.flow.norms import velocity_norm

MODES = ("relative", "abs")
HINGES = ("linear", "squared")
LAMBDA_KINDS = ("constant", "schedule", "adaptive")
EXCESS_KINDS = ("hinge", "signed")


def normguard_penalty(v, v_ref, cfg, t=None):
  """Returns (penalty, metrics). ``cfg``: mode, hinge, margin, t_min. Samples with t < t_min are
  excluded (the hinge can skip the last low-noise steps); ``t`` is then required."""
  n = velocity_norm(v)
  n_ref = jax.lax.stop_gradient(velocity_norm(v_ref))
  n_ref = jnp.maximum(n_ref, 1e-12)
  rho = n / n_ref
  if cfg.mode == "abs":
    gap = n - (1.0 + cfg.margin) * n_ref
  elif cfg.mode == "relative":
    gap = rho - (1.0 + cfg.margin)
  else:
    raise ValueError(f"unknown NormGuard mode {cfg.mode!r}; expected one of {MODES}")
  if cfg.hinge == "linear":
    h = jax.nn.relu(gap)
  elif cfg.hinge == "squared":
    h = jnp.square(jax.nn.relu(gap))
  else:
    raise ValueError(f"unknown NormGuard hinge {cfg.hinge!r}; expected one of {HINGES}")
  mask = jnp.ones_like(h) if (t is None or cfg.t_min <= 0) else (t >= cfg.t_min).astype(h.dtype)
  penalty = jnp.sum(h * mask) / h.shape[0]
  rho_sg, gap_sg = jax.lax.stop_gradient(rho), jax.lax.stop_gradient(gap)
  count = jnp.sum(mask)
  masked_mean = lambda x: jnp.sum(x * mask) / jnp.maximum(count, 1.0)
  metrics = {
      "ng_penalty": penalty,
      "ng_active_frac": masked_mean((gap > 0).astype(h.dtype)),
      "ng_mean_rho": jnp.mean(rho_sg),
      # The constraint statistics that drive dual ascent, under the penalty's own gap (margin, mode) and mask:
      # the hinge excess E relu(g) and the signed gap E g, means over the unmasked rows (0 if none).
      "ng_excess": masked_mean(jax.nn.relu(gap_sg)),
      "ng_gap_mean": masked_mean(gap_sg),
      "ng_valid_frac": count / h.shape[0],
  }
  return penalty, metrics


class NormGuardState(NamedTuple):
  normguard_lambda: jax.Array   # the current weight, read by the train step before backward
  count: jax.Array              # number of updates seen
  last_excess: jax.Array        # hinge statistics received as extra args on the last update
  last_active_frac: jax.Array


def normguard_lambda(kind="constant", value=1.0, *, schedule=None, dual_lr=1.0, target=0.0,
                     lambda_max=1e4, excess="hinge"):
  """optax transform owning NormGuard's lambda. Gradients pass through unchanged.

  kind 'constant': lambda = value. 'schedule': lambda = schedule(count) (an optax schedule).
  'adaptive': dual ascent lambda_{k+1} = clip(lambda_k + dual_lr (c_k - target), 0, lambda_max), starting at
  ``value``, on a statistic c_k of the penalty's own gap g (margin and mode included) under its own t_min mask
  (:func:`normguard_penalty`), received as extra args:
    excess 'hinge':  c = ``ng_excess`` = E relu(g), the constraint E relu(g) <= target. c >= 0, so with
                     target 0 lambda can only grow (findings.md, "Adaptive lambda ...");
    excess 'signed': c = ``ng_gap_mean`` = E g, the constraint E g <= target, i.e. E rho <= 1 + m + target in
                     relative mode: lambda falls while the policy sits under 1 + m and rises above it.
  A step whose rows are all masked (extra arg ``ng_valid_frac`` = 0) leaves lambda where it is.
  """
  if kind not in LAMBDA_KINDS:
    raise ValueError(f"unknown NormGuard lambda kind {kind!r}; expected one of {LAMBDA_KINDS}")
  if kind == "schedule" and schedule is None:
    raise ValueError("NormGuard lambda kind 'schedule' needs a schedule")
  if excess not in EXCESS_KINDS:
    raise ValueError(f"unknown NormGuard lambda excess {excess!r}; expected one of {EXCESS_KINDS}")

  def lam_at(count):
    return jnp.asarray(schedule(count) if kind == "schedule" else value, jnp.float32)

  def init_fn(params):
    del params
    # distinct buffers: the train step donates the optimizer state
    return NormGuardState(lam_at(jnp.zeros((), jnp.int32)), jnp.zeros((), jnp.int32),
                          jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, ng_excess=None, ng_active_frac=None, ng_gap_mean=None,
                ng_valid_frac=None, **extra):
    del params, extra
    as_f32 = lambda x: jnp.zeros((), jnp.float32) if x is None else jnp.asarray(x, jnp.float32)
    stat = ng_excess
    if kind == "adaptive" and excess == "signed":
      if ng_gap_mean is None:
        raise ValueError("normguard_lambda(excess='signed') needs the ng_gap_mean extra arg from the train step")
      stat = ng_gap_mean
    stat, active = as_f32(stat), as_f32(ng_active_frac)
    count = state.count + 1
    if kind == "adaptive":
      lam = jnp.clip(state.normguard_lambda + dual_lr * (stat - target), 0.0, lambda_max)
      if ng_valid_frac is not None:
        lam = jnp.where(jnp.asarray(ng_valid_frac) > 0, lam, state.normguard_lambda)
    else:
      lam = lam_at(count)
    return updates, NormGuardState(lam, count, stat, active)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def current_lambda(opt_state):
  """lambda from the NormGuard transform's state inside an optax chain; 0.0 if the chain has none."""
  found = []

  def visit(x):
    if isinstance(x, NormGuardState):
      found.append(x.normguard_lambda)
    return x

  jax.tree_util.tree_map(visit, opt_state, is_leaf=lambda x: isinstance(x, NormGuardState))
  if len(found) > 1:
    raise ValueError("the optimizer chain holds more than one NormGuard transform")
  return found[0] if found else jnp.zeros((), jnp.float32)
