"""The main job (DESIGN.md §4): pretrain (or load) the reference, then for each method and NormGuard
setting an online RL run, then the report. Each run logs as it goes; a failed run is recorded and the
job moves on, and the report is written whatever happened."""

import sys
import dataclasses
import functools
import json
import logging
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from normguard_jax import config as config_lib
from normguard_jax import tasks as tasks_lib
from normguard_jax.analysis import report as report_lib
from normguard_jax.parallel import distributed, mesh as mesh_lib, rules, sharding
from normguard_jax.rewards.api import RewardBatch, make_reward
from normguard_jax.rl import advantages
from normguard_jax.rl.losses import needs_old
from normguard_jax.train import batches, optim, rollout as rollout_lib
from normguard_jax.train import checkpoint as ckpt_lib
from normguard_jax.train import state as state_lib
from normguard_jax.train import step as step_lib
from normguard_jax.train.logging import MetricWriter, to_python

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  pass


class Preempted(RuntimeError):
  """SIGTERM arrived; the run saved a checkpoint and stopped. Rerun the same command to resume."""


from normguard_jax.tasks.digits import apply_fn_for, model_config  # noqa: E402,F401  (stable names)


def _repeat_rows(tree, n):
  return jax.tree_util.tree_map(lambda a: jnp.repeat(a, n, axis=0), tree)


def _rows(tree, lo, hi):
  return None if tree is None else jax.tree_util.tree_map(lambda a: a[lo:hi], tree)


def rollout_and_score(rollout_fn, decode, reward_fn, cond, uncond, prompts, key, chunk, place=lambda t: t):
  """Roll out, decode and score ``cond``'s rows in chunks of ``chunk`` rows (0: all at once). Chunk i+1's
  rollout is dispatched before chunk i is scored, so device sampling overlaps host-side (remote) rewards.
  Returns (rollout dict over all rows, rewards (B,), {term: (B,)})."""
  b = jax.tree_util.tree_leaves(cond)[0].shape[0]
  chunk = b if chunk <= 0 else min(chunk, b)
  if b % chunk:
    raise ValueError(f"rollout.chunk {chunk} does not divide the {b} rollout rows")
  spans = [(lo, lo + chunk) for lo in range(0, b, chunk)]
  keys = [key] if len(spans) == 1 else [jax.random.fold_in(key, i) for i in range(len(spans))]
  launch = lambda i: rollout_fn(place(_rows(cond, *spans[i])), None if uncond is None else place(
      _rows(uncond, *spans[i])), keys[i])
  outs, rewards, parts = [], [], []
  pending = launch(0)
  for i, (lo, hi) in enumerate(spans):
    ro = pending
    if i + 1 < len(spans):
      pending = launch(i + 1)  # async dispatch: runs on the device while chunk i is scored
    total, terms = reward_fn(RewardBatch(decode(ro["x0"]), _rows(cond, lo, hi),
                                         None if prompts is None else prompts[lo:hi]))
    outs.append(ro), rewards.append(total), parts.append(terms)
  if len(outs) == 1:
    return outs[0], rewards[0], parts[0]
  batch_axis = {"x0": 0, "xs": 1, "log_probs": 1, "norm": 1, "norm_ref": 1, "rho": 1}
  ro = {k: outs[0][k] if k not in batch_axis else jnp.concatenate([o[k] for o in outs], axis=batch_axis[k])
        for k in outs[0]}
  return (ro, jnp.concatenate(rewards),
          {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]})


def _place_rows(tree, mesh):
  """Split rows over the mesh's batch axes when they divide evenly (else replicate): rollouts then run
  data-parallel. Every process passes the same global value."""
  rows = jax.tree_util.tree_leaves(tree)[0].shape[0]
  sh = rules.batch_sharding(mesh, 1)
  if rows % (mesh.shape["data"] * mesh.shape["fsdp"]):
    sh = sharding.replicated(mesh)
  return jax.device_put(tree, sh)


def require_local_path(path, what):
  """Workdirs and caches are POSIX paths (metrics are appended, checkpoints moved aside): an object-store URL is a
  ConfigError that says to mount the bucket (gcsfuse; launch/tpu_pod.sh does it) at the same path on every host."""
  if "://" in str(path):
    scheme, _, rest = str(path).partition("://")
    raise config_lib.ConfigError(
        f"{what} {path!r}: {scheme}:// URLs are not opened directly; mount the bucket at the same path on every host "
        f"(gcsfuse; `launch/tpu_pod.sh train` mounts gs://BUCKET at /gcs/BUCKET) and pass /gcs/{rest}")
  return path


def prepare_workdir(workdir):
  workdir = os.path.abspath(os.path.expanduser(require_local_path(workdir, "--workdir")))
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f"workdir parent {parent!r} does not exist; create it or pick another --workdir")
  os.makedirs(workdir, exist_ok=True)
  return workdir


class Evaluator:
  """Fixed eval set (same prompts and initial noise for every run): ODE samples, reward, quality, rho_k."""

  def __init__(self, cfg, task, reward_fn):
    self.cond, self.prompts = task.eval_set()
    self.key = jax.random.PRNGKey(cfg.seed + 12345)
    self.task, self.reward_fn, self.cfg = task, reward_fn, cfg
    self.uncond = task.uncond(self.cond) if cfg.rollout.cfg_scale != 1.0 else None
    self._rollouts = {}

  def _rollout(self, model_cfg, lora):
    k = (model_cfg, lora)
    if k not in self._rollouts:
      r = self.cfg.rollout
      self._rollouts[k] = rollout_lib.make_rollout(
          apply_fn=self.task.apply_fn(model_cfg), image_shape=self.task.latent_shape, num_steps=r.num_steps,
          shift=r.shift, cfg_scale=r.cfg_scale, noise_level=0.0, lora=lora, track_rho=True,
          mu=getattr(self.task, "grid_mu", None))
    return self._rollouts[k]

  def __call__(self, policy_vars, ref_vars, model_cfg, lora):
    ro = self._rollout(model_cfg, lora)(policy_vars, ref_vars, self.cond, self.uncond, self.key)
    images = self.task.decode(ro["x0"])
    total, parts = self.reward_fn(RewardBatch(images, self.cond, self.prompts))
    images = distributed.host_array(images)
    out = {"reward": float(jnp.mean(total)), **{f"reward_{k}": float(jnp.mean(v)) for k, v in parts.items()},
           **self.task.quality(images, jax.tree_util.tree_map(distributed.host_array, self.cond))}
    rho = distributed.host_array(ro["rho"])
    out["rho_per_step"] = rho.mean(axis=1).tolist()
    out["mean_rho"] = float(rho.mean())
    out["norm_per_step"] = distributed.host_array(ro["norm"]).mean(axis=1).tolist()
    out["norm_ref_per_step"] = distributed.host_array(ro["norm_ref"]).mean(axis=1).tolist()
    return out, images


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_rl(cfg, task, method, use_ng, ref_params, evaluator, reward_fn, run_dir, key, guard=None):
  """One online RL run, resumed from its latest checkpoint when there is one. Returns a result dict with its
  eval history. Raises Preempted after saving when ``guard`` saw SIGTERM."""
  rl = cfg.rl
  lora = rl.lora_rank > 0
  model_cfg = task.model_config(rl.lora_rank)
  apply_fn = task.apply_fn(model_cfg)
  k_init, k_loop = jax.random.split(key)
  if lora:
    trainable = task.init_lora(model_cfg, k_init)
  else:
    trainable = jax.tree_util.tree_map(jnp.array, ref_params)
  with_old = needs_old(method, cfg)
  optimizer = optim.make_optimizer(rl, cfg.normguard if use_ng else None)
  state = state_lib.create(trainable, ref_params, optimizer, k_loop, lora=lora, with_old=with_old)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  state = jax.device_put(state, rules.tree_shardings(state, mesh))  # FSDP/TP placement by the rules table

  r = cfg.rollout
  noise_level = cfg.grpo.noise_level if method == "grpo" else r.noise_level
  rollout = rollout_lib.make_rollout(apply_fn=apply_fn, image_shape=task.latent_shape, num_steps=r.num_steps,
                                     shift=r.shift, cfg_scale=r.cfg_scale, noise_level=noise_level, lora=lora,
                                     track_rho=r.track_rho, mu=getattr(task, "grid_mu", None))
  train_step, _, batch_sh = step_lib.make_sharded_train_step(
      mesh, state, method=method, apply_fn=apply_fn, optimizer=optimizer, loss_cfg=cfg[method],
      ng_cfg=cfg.normguard, strategy=rl.fusion, num_microbatches=rl.num_microbatches)
  place_rows = functools.partial(_place_rows, mesh=mesh)
  @functools.partial(jax.jit, out_shardings=batch_sh)
  def make_batch(key, ro, cond, rewards):
    adv = advantages.group_advantages(rewards, r.group_size, global_std=rl.global_std)
    if method in ("nft", "awm"):
      return batches.forward_process_batch(key, ro["x0"], cond, adv, ro["grid"], rl.num_train_timesteps,
                                           rl.timestep_fraction)
    if method == "dpo":
      return batches.dpo_batch(key, ro["x0"], cond, rewards, r.group_size, rl.num_train_timesteps,
                               cfg.dpo.t_mean, cfg.dpo.t_std)
    return batches.grpo_batch(key, ro, cond, adv, rl.num_train_timesteps, rl.timestep_fraction)

  @jax.jit
  def update_old(state):
    decay = state_lib.old_decay(state.step, rl.old_ramp, rl.old_max_decay)
    return state.replace(old=state_lib.ema_update(state.old, state.trainable, decay))

  name = os.path.basename(run_dir)
  ckpt = ckpt_lib.RunCheckpointer(os.path.join(run_dir, "checkpoints"), every=cfg.checkpoint.every,
                                  keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  history, consecutive_skips, t_start, start_it = [], 0, time.time(), 1
  restored = ckpt.restore_latest(_abstract(state))
  if restored is not None:
    it0, state, saved = restored
    history, start_it = saved["history"], it0 + 1
    log.info("%s: resumed from the checkpoint at iteration %d", name, it0)
    if saved.get("done"):  # finished before: reuse it
      ckpt.close()
      return dict(saved["result"], samples=np.asarray(saved["samples"], np.float32))
  writer = MetricWriter(run_dir, truncate_after=start_it - 1 if restored is not None else None,
                        enabled=distributed.is_main_process())

  def meta(it, **extra):
    return dict({"iteration": it, "history": history, "name": name, "method": method, "normguard": use_ng},
                **extra)

  def evaluate(it):
    ev, images = evaluator(state.policy_variables(), state.ref_variables(), model_cfg, lora)
    ev["iteration"] = it
    history.append(ev)
    writer.write(it, {k: v for k, v in ev.items() if not isinstance(v, list)}, prefix="eval/")
    return images

  images = None
  try:
    if not history:
      images = evaluate(0)
    bar = tqdm(range(start_it, rl.iterations + 1), desc=f"RL {name}", unit="it", dynamic_ncols=True,
               initial=start_it - 1, total=rl.iterations, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for it in bar:
      k_prompt, k_roll, k_batch = jax.random.split(jax.random.fold_in(k_loop, it), 3)
      cond, prompts = task.sample_prompts(k_prompt, r.prompts_per_iter)
      cond = place_rows(_repeat_rows(cond, r.group_size))  # every process holds the same prompts
      prompts = None if prompts is None else [p for p in prompts for _ in range(r.group_size)]
      uncond = task.uncond(cond) if r.cfg_scale != 1.0 else None
      sample_vars = state.old_variables() if with_old and method == "nft" else state.policy_variables()
      ro, rewards, parts = rollout_and_score(
          lambda c, u, k: rollout(sample_vars, state.ref_variables(), c, u, k), task.decode, reward_fn,
          cond, uncond, prompts, k_roll, r.chunk, place_rows)
      if not bool(jnp.all(jnp.isfinite(rewards))):
        raise TrainingDiverged(f"non-finite reward at iteration {it}: samples have diverged")
      batch = make_batch(k_batch, ro, cond, rewards)
      state, metrics = train_step(state, batch)
      if with_old:
        state = update_old(state)
      metrics = to_python(metrics)
      metrics.update(reward_mean=float(jnp.mean(rewards)), reward_std=float(jnp.std(rewards)),
                     rollout_mean_rho=float(jnp.mean(ro["rho"])), wall_s=time.time() - t_start,
                     **{f"reward_{k}": float(jnp.mean(v)) for k, v in parts.items()})
      writer.write(it, metrics, prefix="train/")
      consecutive_skips = consecutive_skips + 1 if metrics["skipped"] else 0
      if metrics["skipped"]:
        log.warning("%s: iteration %d skipped (non-finite loss or gradient)", name, it)
      if consecutive_skips >= rl.max_consecutive_skips:
        raise TrainingDiverged(f"{consecutive_skips} consecutive steps had a non-finite loss or gradient")
      bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", rho=f"{metrics['rollout_mean_rho']:.3f}")
      if it % cfg.eval.every == 0 or it == rl.iterations:
        images = evaluate(it)
      if guard is not None and guard.requested:
        ckpt.save(it, state, meta(it), force=True)
        ckpt.wait()
        raise Preempted(f"{name}: SIGTERM at iteration {it}; checkpoint saved in {ckpt.directory}")
      ckpt.save(it, state, meta(it))
    status, error = "ok", None
  except TrainingDiverged as e:
    status, error = "diverged", str(e)
    log.error("%s: %s", name, e)
    images = evaluate(int(state.step))  # record where the run stopped
  finally:
    writer.close()
  if images is None:  # resumed at the very end
    _, images = evaluator(state.policy_variables(), state.ref_variables(), model_cfg, lora)
  result = {"name": name, "method": method, "normguard": use_ng, "status": status, "error": error,
            "history": history, "wall_s": time.time() - t_start}
  done_it = max(rl.iterations, int(history[-1]["iteration"]) if history else 0) + 1
  ckpt.save(done_it, state, meta(done_it, done=True, result=result, samples=np.asarray(images).tolist()), force=True)
  ckpt.close()
  return dict(result, samples=images)


def _check_same_config(workdir, cfg):
  """A workdir holds one experiment: resuming with another config would mix results, so refuse clearly."""
  path = os.path.join(workdir, "config.json")
  now = json.loads(cfg.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    if before != now:
      flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (
          flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
      a, b = flat(before), flat(now)
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise config_lib.ConfigError(f"workdir {workdir} holds a run with a different config (fields {diff}); "
                                   "use a new --workdir, or the same config to resume")
  with open(path, "w") as f:
    json.dump(now, f, indent=2)


def run(cfg, workdir, guard=None):
  """The whole job. Returns the report dict (also written to workdir/report.json). Rerunning the same command
  on the same workdir resumes: finished runs are reused and the others continue from their last checkpoint.

  Multi-host: every process runs this same function (launch/tpu_pod.sh); arrays are global, and only process 0
  writes the logs, plots and report (checkpoints are written by orbax from all processes)."""
  config_lib.validate(cfg)
  workdir = prepare_workdir(workdir)
  if distributed.is_main_process():
    _check_same_config(workdir, cfg)
  task = tasks_lib.make_task(cfg)
  reward_fn = make_reward(dict(cfg.reward.terms), config_lib.reward_options(cfg))
  ref_cfg = task.model_config(0)

  t0 = time.time()
  ref_params, pre_info = task.reference(workdir, guard)
  pre_info["wall_s"] = time.time() - t0
  evaluator = Evaluator(cfg, task, reward_fn)
  ref_eval, ref_images = evaluator({"params": ref_params}, {"params": ref_params}, ref_cfg, False)
  n_eval = int(jax.tree_util.tree_leaves(evaluator.cond)[0].shape[0])
  real_quality = task.real_quality(n_eval)  # the proxies' level on real data, same size

  results = []
  report = None
  try:
    for method in config_lib.csv(cfg.rl.methods):
      for setting in config_lib.csv(cfg.rl.normguard):
        name = f"{method}_{'ng' if setting == 'on' else 'base'}"
        stub = {"name": name, "method": method, "normguard": setting == "on", "history": [], "samples": None}
        key = jax.random.PRNGKey(cfg.seed + 1)  # same key for the pair: matched rollouts at the start
        try:
          results.append(run_rl(cfg, task, method, setting == "on", ref_params, evaluator, reward_fn,
                                os.path.join(workdir, "runs", name), key, guard))
        except Preempted as e:
          results.append(dict(stub, status="preempted", error=str(e)))
          break
        except Exception as e:  # record, keep going, never lose the other runs
          log.error("run %s failed: %s", name, e)
          results.append(dict(stub, status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()))
      else:
        continue
      break
  finally:
    if distributed.is_main_process():
      report = report_lib.write_report(workdir, cfg, task, pre_info, ref_eval, ref_images, real_quality, results,
                                       evaluator.cond, evaluator.prompts)
  return report
