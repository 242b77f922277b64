"""NormGuard: a hinge on the per-step velocity norm, active only where ||v_theta|| > ||v_ref||.

    L_total = L_base + lambda * mean_b h(||v_theta||, sg(||v_ref||))                (paper.md §3.2)
    h = relu(g) (linear) or relu(g)^2 (squared), with the gap
    g = ||v_theta|| - (1 + m) ||v_ref||   (abs)   or   ||v_theta|| / ||v_ref|| - (1 + m)   (relative).

The gradient of the linear hinge w.r.t. v_theta is radial, lambda v / ||v|| (per active sample, divided
by the batch size), and zero below the reference: it shrinks magnitude and never turns direction.

lambda is owned by an optax ``GradientTransformationExtraArgs`` (:func:`normguard_lambda`) placed in
the optimizer chain: a constant, a schedule of the update count, or dual ascent on the measured excess
(lambda <- clip(lambda + eta (excess - target), 0, lambda_max)). The train step reads lambda from the
optimizer state (:func:`current_lambda`) before its single backward pass, then hands the hinge
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
  rho_sg = jax.lax.stop_gradient(rho)
  metrics = {
      "ng_penalty": penalty,
      "ng_active_frac": jnp.sum((gap > 0) * mask) / jnp.maximum(jnp.sum(mask), 1.0),
      "ng_mean_rho": jnp.mean(rho_sg),
      # The measured excess that drives dual ascent: mean relative inflation above the reference.
      "ng_excess": jnp.mean(jax.nn.relu(rho_sg - 1.0)),
  }
  return penalty, metrics


class NormGuardState(NamedTuple):
  normguard_lambda: jax.Array   # the current weight, read by the train step before backward
  count: jax.Array              # number of updates seen
  last_excess: jax.Array        # hinge statistics received as extra args on the last update
  last_active_frac: jax.Array


def normguard_lambda(kind="constant", value=1.0, *, schedule=None, dual_lr=1.0, target=0.0,
                     lambda_max=1e4):
  """optax transform owning NormGuard's lambda. Gradients pass through unchanged.

  kind 'constant': lambda = value. 'schedule': lambda = schedule(count) (an optax schedule).
  'adaptive': lambda_{k+1} = clip(lambda_k + dual_lr (excess_k - target), 0, lambda_max), starting at
  ``value``, where excess_k = mean relu(rho - 1) measured on the step (dual ascent on the constraint
  E relu(rho - 1) <= target).
  """
  if kind not in LAMBDA_KINDS:
    raise ValueError(f"unknown NormGuard lambda kind {kind!r}; expected one of {LAMBDA_KINDS}")
  if kind == "schedule" and schedule is None:
    raise ValueError("NormGuard lambda kind 'schedule' needs a schedule")

  def lam_at(count):
    return jnp.asarray(schedule(count) if kind == "schedule" else value, jnp.float32)

  def init_fn(params):
    del params
    # distinct buffers: the train step donates the optimizer state
    return NormGuardState(lam_at(jnp.zeros((), jnp.int32)), jnp.zeros((), jnp.int32),
                          jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, ng_excess=None, ng_active_frac=None, **extra):
    del params, extra
    excess = jnp.zeros((), jnp.float32) if ng_excess is None else jnp.asarray(ng_excess, jnp.float32)
    active = jnp.zeros((), jnp.float32) if ng_active_frac is None else jnp.asarray(ng_active_frac, jnp.float32)
    count = state.count + 1
    if kind == "adaptive":
      lam = jnp.clip(state.normguard_lambda + dual_lr * (excess - target), 0.0, lambda_max)
    else:
      lam = lam_at(count)
    return updates, NormGuardState(lam, count, excess, active)

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
