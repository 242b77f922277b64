"""Paired sampling: one Euler ODE trajectory (flow/samplers.sample, a lax.scan) with the policy AND the reference
evaluated at every state x_k, so that rho_k = ||v_theta(x_k, t_k, c)|| / ||v_ref(x_k, t_k, c)|| is measured on the
same trajectory (DESIGN.md §1, paper.md §3.3).

Which velocity drives the trajectory is a choice (``drive``):

* ``"policy"``:   x_{k+1} = x_k + (t_{k+1} - t_k) v_theta            (the policy's own trajectory)
* ``"reference"``: x_{k+1} = x_k + (t_{k+1} - t_k) v_ref              (the reference trajectory)
* ``"rescaled"``: x_{k+1} = x_k + (t_{k+1} - t_k) v_theta ||v_ref|| / ||v_theta||   (inference-time rescaling,
  paper.md §3.4; with CFG both sides are the guided velocities, as in CFG renormalisation)

Velocity functions are ``apply(variables, x, t, cond) -> v``; variables are arguments (not closed over), so one
compile serves every run of the same model config.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp

from normguard_jax.flow import norms, samplers
from normguard_jax.parallel import rules

DRIVES = ("policy", "reference", "rescaled")


def rescale_velocity(v, v_ref, eps=1e-12):
  """v' = v ||v_ref|| / ||v|| per sample (norms in float32): the direction of v with the reference's norm."""
  scale = norms.velocity_norm(v_ref) / jnp.maximum(norms.velocity_norm(v), eps)
  return (v.astype(jnp.float32) * scale.reshape((-1,) + (1,) * (v.ndim - 1))).astype(v.dtype)


def guided(apply, variables, x, t, cond, cfg_scale, uncond):
  """v = v(c) when cfg_scale == 1, else the CFG combination v_u + w (v_c - v_u) with the unconditional input
  ``uncond`` (a pytree like ``cond``: the null label, the negative prompt's embeddings; flow/samplers.cfg_combine).
  ``cfg_scale`` may be traced: the unconditional forward then sits under a lax.cond, so one compile serves CFG off
  and on (a traced scale with ``uncond=None`` means CFG off)."""
  v = apply(variables, x, t, cond)
  if isinstance(cfg_scale, (int, float)) and cfg_scale == 1.0:
    return v
  if uncond is None:
    if isinstance(cfg_scale, (int, float)):
      raise ValueError("CFG (cfg_scale != 1) needs the unconditional input uncond")
    return v  # a traced scale without uncond: the caller has checked that CFG is off
  with_cfg = lambda v: samplers.cfg_combine(v, apply(variables, x, t, uncond), cfg_scale)
  if isinstance(cfg_scale, (int, float)):
    return with_cfg(v)
  return jax.lax.cond(cfg_scale != 1.0, with_cfg, lambda v: v, v)


def _cosine(a, b, eps=1e-12):
  a = a.astype(jnp.float32).reshape(a.shape[0], -1)
  b = b.astype(jnp.float32).reshape(b.shape[0], -1)
  return jnp.sum(a * b, 1) / jnp.maximum(jnp.linalg.norm(a, axis=1) * jnp.linalg.norm(b, axis=1), eps)


def paired_sample(policy_vars, ref_vars, x1, cond, grid, *, policy_apply, ref_apply, drive="policy",
                  cfg_scale=1.0, uncond=None, solver="euler"):
  """Returns dict: ``x0`` (B, ...), ``xs`` (K+1, B, ...), and per step (K, B): ``norm`` = ||v_theta||,
  ``norm_ref`` = ||v_ref||, ``rho`` = norm / norm_ref, ``norm_drive`` = norm of the velocity that moved x, and
  ``cos`` = cosine(v_theta, v_ref). ``drive`` is a name or its index in DRIVES (may be traced); ``uncond`` is the
  unconditional input of CFG (needed when cfg_scale != 1); ``solver``: the ODE solver (flow/samplers.py)."""
  if isinstance(drive, str):
    if drive not in DRIVES:
      raise ValueError(f"unknown drive {drive!r}; expected one of {DRIVES}")
    drive = DRIVES.index(drive)

  def velocity_fn(x, t):
    v = guided(policy_apply, policy_vars, x, t, cond, cfg_scale, uncond)
    v_ref = guided(ref_apply, ref_vars, x, t, cond, cfg_scale, uncond)
    d = jnp.where(drive == 0, v, jnp.where(drive == 1, v_ref, rescale_velocity(v, v_ref)))
    n, n_ref = norms.velocity_norm(v), norms.velocity_norm(v_ref)
    return d, {"norm": n, "norm_ref": n_ref, "norm_drive": norms.velocity_norm(d), "cos": _cosine(v, v_ref)}

  traj = samplers.sample(velocity_fn, x1, grid, None, noise_level=0.0, solver=solver)
  a = traj.aux
  return {"x0": traj.xs[-1], "xs": traj.xs, "norm": a["norm"], "norm_ref": a["norm_ref"],
          "norm_drive": a["norm_drive"], "cos": a["cos"], "rho": a["norm"] / jnp.maximum(a["norm_ref"], 1e-12)}


@functools.partial(jax.jit, static_argnames=("policy_apply", "ref_apply", "solver", "mesh"))
def _paired_sample_jit(policy_vars, ref_vars, x1, cond, uncond, grid, drive, cfg_scale, *, policy_apply, ref_apply,
                       solver, mesh):
  if uncond is None:  # no CFG possible: the scale is not used
    cfg_scale = 1.0
  # traced under the activation mesh when the analysis runs sharded (DESIGN.md §5; train/programs.py)
  with (rules.activation_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
    return paired_sample(policy_vars, ref_vars, x1, cond, grid, policy_apply=policy_apply, ref_apply=ref_apply,
                         drive=drive, cfg_scale=cfg_scale, uncond=uncond, solver=solver)


def paired_sample_jit(policy_vars, ref_vars, x1, cond, grid, *, policy_apply, ref_apply, drive="policy",
                      cfg_scale=1.0, uncond=None, solver="euler", mesh=None):
  """Jitted :func:`paired_sample`; drive and CFG scale are traced, so one compile per (model pair, step count,
  with or without ``uncond``). ``mesh``: the analysis mesh (``--shard``), under which the program is traced."""
  if uncond is None and cfg_scale != 1.0:
    raise ValueError("CFG (cfg_scale != 1) needs the unconditional input uncond")
  return _paired_sample_jit(policy_vars, ref_vars, x1, cond, uncond, grid, jnp.int32(DRIVES.index(drive)),
                            jnp.float32(cfg_scale), policy_apply=policy_apply, ref_apply=ref_apply, solver=solver,
                            mesh=mesh)


def repeat_rows(tree, n):
  return jax.tree_util.tree_map(lambda a: jnp.repeat(a, n, axis=0), tree)


def eval_inputs(task, cfg, per_condition, seed_offset=777):
  """Held-out eval inputs -> (x1, cond, prompts): each of the task's distinct eval conditions (digits: every class;
  text tasks: the eval prompts) ``per_condition`` times, and initial noise x1 of the task's latent shape, from a key
  the training loop's evaluator does not use (it uses seed + 12345)."""
  cond, prompts = task.eval_conditions()
  cond = repeat_rows(cond, int(per_condition))
  if prompts is not None:
    prompts = [p for p in prompts for _ in range(int(per_condition))]
  rows = jax.tree_util.tree_leaves(cond)[0].shape[0]
  x1 = jax.random.normal(jax.random.PRNGKey(int(cfg.seed) + seed_offset), (rows,) + tuple(task.latent_shape),
                         jnp.float32)
  return x1, cond, prompts


def grid_for_task(task, cfg, num_steps):
  """The task's sampling grid, the rollout's own (task.sampling_grid: the recipe's grid kind, shift or FLUX mu)."""
  del cfg
  return jnp.asarray(task.sampling_grid(int(num_steps)))


def analysis_solver(cfg):
  """The ODE solver the analyses sample with: the run's evaluation solver (train/programs.eval_solver)."""
  return cfg.eval.get("solver", "") or cfg.rollout.get("solver", "euler")


def task_mu(task, num_steps):
  """FLUX's time shift mu at this step count (recorded in the analysis settings), None for static-shift tasks."""
  return task.grid_mu(int(num_steps)) if callable(getattr(task, "grid_mu", None)) else None
