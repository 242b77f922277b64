"""The one builder of the trainer's jitted programs (DESIGN.md §5).

Every program that runs a model on sharded data traces under the activation mesh (``rules.activation_mesh``): the
train step, the rollout sampler, the evaluation sampler, the analysis samplers and the VAE decode. Without it XLA
keeps the weights sharded (FSDP) and replicates the activations over the batch, so per-chip memory grows with the
pod (measured for the SD3.5-M rollout on v5p-128: 12.1 GiB of temporaries per chip against 0.67 GiB with it).
:func:`sharded_jit` is that builder; :func:`build_run_programs` builds one RL run's programs from its config, for
the training loop (train/loop.py) and for the ahead-of-time compile of a recipe (parallel/aot.py) alike, so the
compiled programs are the trainer's own.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from normguard_jax.parallel import rules, sharding
from normguard_jax.rl import advantages
from normguard_jax.rl.losses import needs_old
from normguard_jax.train import batches, optim
from normguard_jax.train import rollout as rollout_lib
from normguard_jax.train import state as state_lib
from normguard_jax.train import step as step_lib


def sharded_jit(fn, mesh, **jit_kwargs):
  """``jax.jit(fn, **jit_kwargs)``, traced under ``rules.activation_mesh(mesh)`` (a plain jit when ``mesh`` is
  None). The models pin their activations by the rules table while tracing (``rules.constrain``), so the program
  splits the rows over the data axes and keeps per-chip memory independent of the number of chips."""
  if mesh is None:
    return jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with rules.activation_mesh(mesh):
      return fn(*args, **kwargs)
  return jax.jit(traced, **jit_kwargs)


def row_sharding(mesh, ndim, axis=0):
  """Rows (dim ``axis``) over the mesh's batch axes ('data', 'fsdp'); everything else replicated."""
  spec = [None] * ndim
  spec[axis] = rules.batch_sharding(mesh, 1).spec[0]
  return NamedSharding(mesh, P(*spec))


def rollout_shardings(mesh, image_ndim):
  """Out shardings of :func:`train.rollout.rollout`: every per-row output stays split over the batch axes."""
  per_step = row_sharding(mesh, 2, axis=1)  # (K, B)
  return {"x0": row_sharding(mesh, image_ndim), "xs": row_sharding(mesh, image_ndim + 1, axis=1),
          "log_probs": per_step, "grid": sharding.replicated(mesh), "rho": per_step, "norm": per_step,
          "norm_ref": per_step}


def make_rollout_program(mesh, **rollout_kwargs):
  """The rollout sampler (train/rollout.py) as a sharded program: ``(sample_vars, ref_vars, cond, uncond, key)``."""
  out = None if mesh is None else rollout_shardings(mesh, len(rollout_kwargs["image_shape"]) + 1)
  return sharded_jit(functools.partial(rollout_lib.rollout, **rollout_kwargs), mesh, out_shardings=out)


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What one RL run trains and how: built from the config alone (no weights), shared by the loop and the AOT tool."""
  method: str
  use_ng: bool
  lora: bool
  with_old: bool
  model_cfg: Any
  apply_fn: Callable
  optimizer: Any
  with_eval_ema: bool = False


def run_setup(cfg, task, method, use_ng):
  rl = cfg.rl
  model_cfg = task.model_config(rl.lora_rank)
  with_old = needs_old(method, cfg) or eval_policy(cfg) == "old"  # the eval protocol may score the old/EMA copy
  return RunSetup(method=method, use_ng=use_ng, lora=rl.lora_rank > 0, with_old=with_old,
                  with_eval_ema=eval_policy(cfg) == "ema",
                  model_cfg=model_cfg, apply_fn=task.apply_fn(model_cfg),
                  optimizer=optim.make_optimizer(rl, cfg.normguard if use_ng else None))


def eval_policy(cfg):
  """Which weights the evaluation scores: 'raw' (the current policy), 'old' (the run's old/EMA copy: Flow-Factory
  evaluates NFT under its sampling EMA and AWM under its EMA) or 'ema' (a separate evaluation EMA, ``eval.ema_*``:
  official DiffusionNFT's min((1 + s) / (10 + s), 0.9), Flow-Factory's DPO power EMA)."""
  return cfg.eval.get("policy", "raw")


def scored_variables(cfg, state):
  """The variables the evaluation scores (:func:`eval_policy`)."""
  policy = eval_policy(cfg)
  return (state.old_variables() if policy == "old" else state.eval_ema_variables() if policy == "ema"
          else state.policy_variables())


def init_state(setup: RunSetup, task, ref_params, key):
  """The run's initial TrainState (works under ``jax.eval_shape`` with abstract ``ref_params``).

  LoRA: fresh adapters (B = 0: the policy starts as the reference). Full fine-tuning: the trainable params, the
  old/EMA copy and the Adam moments are float32 master copies of the reference, whatever ``model.param_dtype`` is;
  the forward casts them to the compute dtype (``model.dtype``), and the frozen reference keeps ``param_dtype``."""
  k_init, k_loop = jax.random.split(key)
  if setup.lora:
    trainable = task.init_lora(setup.model_cfg, k_init)
  else:
    trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), ref_params)
  return state_lib.create(trainable, ref_params, setup.optimizer, k_loop, lora=setup.lora, with_old=setup.with_old,
                          with_eval_ema=setup.with_eval_ema)


def restart_state(setup: RunSetup, state, trainable):
  """``state`` restarted from given trainable params (``rl.init_from``): fresh optimizer, old/EMA and evaluation
  copies equal to them, step 0."""
  copy = lambda t: jax.tree_util.tree_map(jnp.array, t)
  return state.replace(trainable=copy(trainable), opt_state=setup.optimizer.init(trainable),
                       old=copy(trainable) if state.old is not None else None,
                       eval_ema=copy(trainable) if state.eval_ema is not None else None)


@dataclasses.dataclass(frozen=True)
class RunPrograms:
  """One RL run's jitted programs, all traced under the activation mesh."""
  train_step: Callable      # (state, batch) -> (state, metrics); state donated
  rollout: Callable         # (sample_vars, ref_vars, cond, uncond, key) -> rollout dict
  make_batch: Callable      # (key, rollout, cond, uncond, rewards) -> train batch (rows over the batch axes)
  split_updates: Callable   # train batch -> [batch per optimizer update] (rl.updates_per_iter)
  update_old: Callable      # (state, iteration) -> state with the old/EMA params moved towards the policy
  update_eval_ema: Callable  # (state, iteration) -> state with the evaluation EMA moved towards the policy
  state_shardings: Any
  batch_sharding: Any


def rollout_kwargs(cfg, task, method, *, eval_mode=False):
  """The sampler settings of a run's rollouts (or, with ``eval_mode``, of its evaluation: ODE, rho tracked, the
  eval protocol's steps and CFG scale when ``eval.num_steps`` / ``eval.cfg_scale`` set them)."""
  r, e = cfg.rollout, cfg.eval
  steps = int(e.get("num_steps", 0) or r.num_steps) if eval_mode else r.num_steps
  res = int(e.get("resolution", 0)) if eval_mode else 0  # the eval protocol's resolution (0: the training one)
  noise = 0.0 if eval_mode else (cfg.grpo.noise_level if method == "grpo" else r.noise_level)
  return dict(apply_fn=None, image_shape=task.latent_shape_at(res) if res else task.latent_shape,
              grid=task.sampling_grid(steps, res),
              cfg_scale=eval_cfg_scale(cfg) if eval_mode else r.cfg_scale, noise_level=noise,
              lora=cfg.rl.lora_rank > 0, track_rho=True if eval_mode else r.track_rho,
              solver=eval_solver(cfg) if eval_mode else (r.get("solver", "euler") if noise == 0.0 else "euler"))


def eval_solver(cfg):
  """The evaluation's ODE solver: ``eval.solver`` when set, else the rollouts' (official DiffusionNFT rolls out with
  dpm2 and evaluates with Euler)."""
  return cfg.eval.get("solver", "") or cfg.rollout.get("solver", "euler")


def eval_cfg_scale(cfg):
  """The evaluation's CFG scale: ``eval.cfg_scale`` when set (> 0), else the rollouts'."""
  return float(cfg.eval.get("cfg_scale", 0.0) or cfg.rollout.cfg_scale)


def ema_step(cfg, state, iteration):
  """The step index of the old/EMA decay schedule: the update count after this iteration's updates (official
  NFT/AWM ``global_step``; ``rl.ema_step='update'``) or the 0-based iteration (Flow-Factory's epoch; 'iteration')."""
  return state.step if cfg.rl.get("ema_step", "update") == "update" else iteration - 1


def build_run_programs(cfg, task, setup: RunSetup, mesh, state):
  """The train step, rollout, batch builder and old-policy update of one run, exactly as the loop runs them.
  ``state`` may be concrete or abstract (ShapeDtypeStructs), e.g. for ahead-of-time compilation."""
  rl, r, method = cfg.rl, cfg.rollout, setup.method
  train_cfg = bool(rl.get("train_cfg", False)) and r.cfg_scale != 1.0
  train_step, state_sh, batch_sh = step_lib.make_sharded_train_step(
      mesh, state, method=method, apply_fn=setup.apply_fn, optimizer=setup.optimizer, loss_cfg=cfg[method],
      ng_cfg=cfg.normguard, strategy=rl.fusion, num_microbatches=rl.num_microbatches,
      cfg_scale=r.cfg_scale if train_cfg else 1.0)
  kw = dict(rollout_kwargs(cfg, task, method), apply_fn=setup.apply_fn)
  rollout = make_rollout_program(mesh, **kw)
  grid = kw["grid"]  # concrete: the value-range timestep rules read it

  def make_batch(key, ro, cond, uncond, rewards):
    adv = advantages.group_advantages(rewards, r.group_size, global_std=rl.global_std, eps=rl.get("adv_eps", 1e-4),
                                      eps_kind=rl.get("adv_eps_kind", "add"),
                                      aggregation=rl.get("adv_aggregation", "sum"))
    if method in ("nft", "awm"):
      batch = batches.forward_process_batch(key, ro["x0"], cond, adv, grid, rl.num_train_timesteps,
                                            rl.timestep_fraction, rule=rl.get("timestep_rule", "index_fraction"),
                                            share_rows=int(rl.get("timestep_share_rows", 0)))
    elif method == "dpo":
      d = cfg.dpo
      batch = batches.dpo_batch(key, ro["x0"], cond, rewards, r.group_size, rl.num_train_timesteps, d.t_mean,
                                d.t_std, t_clamp=d.get("t_clamp", 0.0), t_share_pairs=int(d.get("t_share_pairs", 0)),
                                ties=d.get("ties", "next"))
    else:
      batch = batches.grpo_batch(key, ro, cond, adv, rl.num_train_timesteps, rl.timestep_fraction)
    if train_cfg:  # the negative prompt, the same on every row
      n = batch["t"].shape[0]
      batch["uncond"] = jax.tree_util.tree_map(lambda u: jnp.broadcast_to(u[:1], (n,) + u.shape[1:]), uncond)
    return batch

  def update_old(state, iteration):
    decay = state_lib.old_decay(ema_step(cfg, state, iteration), rl.old_ramp, rl.old_max_decay,
                                kind=rl.get("ema_kind", "piecewise_linear"),
                                warmup=rl.get("ema_warmup", 10))
    return state.replace(old=state_lib.ema_update(state.old, state.trainable, decay))

  e = cfg.eval

  def update_eval_ema(state, iteration):
    decay = state_lib.old_decay(iteration, max_decay=e.get("ema_max", 0.9), kind=e.get("ema_kind", "power"),
                                warmup=e.get("ema_warmup", 10), ramp=e.get("ema_ramp", 0.001))
    return state.replace(eval_ema=state_lib.ema_update(state.eval_ema, state.trainable, decay))

  updates = int(rl.get("updates_per_iter", 1))
  split = lambda batch: split_updates(batch, updates, paired=method == "dpo")
  return RunPrograms(train_step=train_step, rollout=rollout,
                     make_batch=sharded_jit(make_batch, mesh, out_shardings=batch_sh),
                     split_updates=sharded_jit(split, mesh, out_shardings=[batch_sh] * updates),
                     update_old=sharded_jit(update_old, mesh, in_shardings=(state_sh, None), out_shardings=state_sh,
                                            donate_argnums=(0,)),
                     update_eval_ema=sharded_jit(update_eval_ema, mesh, in_shardings=(state_sh, None),
                                                 out_shardings=state_sh, donate_argnums=(0,)),
                     state_shardings=state_sh, batch_sharding=batch_sh)


def lora_count(task, model_cfg):
  """(adapted Linear modules, LoRA parameters) of a model config, from its abstract adapter tree (a scanned group's
  stacked leaves count once per layer)."""
  tree = jax.eval_shape(lambda k: task.init_lora(model_cfg, k), jax.random.PRNGKey(0))
  modules = params = 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    params += int(np.prod(x.shape))
    if str(getattr(path[-1], "key", path[-1])) == "lora_a":
      modules += int(np.prod(x.shape[:-3]))  # leading scan axes (layers); the last three are (in, r, adapters)
  return modules, params


def recipe_record(cfg, task):
  """How a run was made (issue 19): the reference it reproduces and the settings that change the numbers, recorded
  in report.json and TensorBoard, and compared by ``analysis compare`` between runs."""
  r, rl, e = cfg.rollout, cfg.rl, cfg.eval
  modules, params = lora_count(task, task.model_config(rl.lora_rank)) if rl.lora_rank > 0 else (0, 0)
  return {"reference": cfg.get("reference", ""), "grid": r.get("grid", "linear"),
          "solver": r.get("solver", "euler"), "num_steps": int(r.num_steps), "shift": float(r.shift),
          "cfg_scale": float(r.cfg_scale), "timestep_rule": rl.get("timestep_rule", "index_fraction"),
          "timestep_fraction": float(rl.timestep_fraction), "num_train_timesteps": int(rl.num_train_timesteps),
          "timestep_share_rows": int(rl.get("timestep_share_rows", 0)),
          "advantage": {"std": "global" if rl.global_std else "group", "eps": float(rl.get("adv_eps", 1e-4)),
                        "eps_kind": rl.get("adv_eps_kind", "add"), "aggregation": rl.get("adv_aggregation", "sum"),
                        "awm_mode": cfg.awm.get("adv_mode", "div5")},
          "ema": {"kind": rl.get("ema_kind", "piecewise_linear"), "max": float(rl.old_max_decay),
                  "step": rl.get("ema_step", "update")},
          "lora": {"rank": int(rl.lora_rank), "targets": config_csv(rl.lora_targets), "modules": modules,
                   "params": params},
          "train_cfg": bool(rl.get("train_cfg", False)), "updates_per_iter": int(rl.get("updates_per_iter", 1)),
          "eval": {"policy": eval_policy(cfg), "num_steps": int(e.get("num_steps", 0) or r.num_steps),
                   "solver": eval_solver(cfg), "held_out_prompts": getattr(task, "held_out", None)}}


def config_csv(text):
  return [s.strip() for s in str(text).split(",") if s.strip()]


def split_updates(batch, num_updates, *, paired=False):
  """A train batch split into ``num_updates`` equal parts (strided rows, as microbatches), one optimizer update each
  (Flow-Factory's several gradient steps per epoch, e.g. its FLUX.2-klein AWM example's 2)."""
  if num_updates == 1:
    return [batch]
  parts = step_lib.split_microbatches(batch, num_updates, paired=paired)
  return [jax.tree_util.tree_map(lambda x, i=i: x[i], parts) for i in range(num_updates)]


def abstract_like(tree, shardings: Optional[Any] = None):
  """ShapeDtypeStructs of ``tree`` carrying ``shardings`` (default: the leaves' own)."""
  if shardings is None:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
