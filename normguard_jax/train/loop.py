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
from normguard_jax.analysis import quality as quality_lib
from normguard_jax.analysis import report as report_lib
from normguard_jax.data import digits
from normguard_jax.models import dit
from normguard_jax.parallel import mesh as mesh_lib, rules
from normguard_jax.rewards.api import make_reward
from normguard_jax.rl import advantages
from normguard_jax.rl.losses import needs_old
from normguard_jax.train import batches, optim, pretrain as pretrain_lib, rollout as rollout_lib
from normguard_jax.train import checkpoint as ckpt_lib
from normguard_jax.train import state as state_lib
from normguard_jax.train import step as step_lib
from normguard_jax.train.logging import MetricWriter, to_python

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  pass


class Preempted(RuntimeError):
  """SIGTERM arrived; the run saved a checkpoint and stopped. Rerun the same command to resume."""


def model_config(cfg, lora_rank=0):
  m = dict(cfg.model)
  return dit.DiTConfig(**m, lora_rank=lora_rank, lora_alpha=float(cfg.rl.lora_alpha),
                       lora_targets=tuple(config_lib.csv(cfg.rl.lora_targets)))


def apply_fn_for(model_cfg):
  def apply_fn(variables, x, t, cond, gate):
    return dit.velocity(variables, x, t, cond, cfg=model_cfg, lora_gate=gate)
  return apply_fn


def prepare_workdir(workdir):
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f"workdir parent {parent!r} does not exist; create it or pick another --workdir")
  os.makedirs(workdir, exist_ok=True)
  return workdir


class Evaluator:
  """Fixed eval set (same labels and initial noise for every run): ODE samples, reward, quality, rho_k."""

  def __init__(self, cfg, quality, reward_fn, model_cfg):
    n = cfg.eval.samples_per_class
    self.cond = jnp.repeat(jnp.arange(cfg.model.num_classes, dtype=jnp.int32), n)
    self.key = jax.random.PRNGKey(cfg.seed + 12345)
    self.quality, self.reward_fn, self.cfg = quality, reward_fn, cfg
    self._rollouts = {}

  def _rollout(self, model_cfg, lora):
    k = (model_cfg, lora)
    if k not in self._rollouts:
      r = self.cfg.rollout
      self._rollouts[k] = rollout_lib.make_rollout(
          apply_fn=apply_fn_for(model_cfg), image_shape=(self.cfg.model.image_size,) * 2 + (self.cfg.model.channels,),
          num_steps=r.num_steps, shift=r.shift, cfg_scale=r.cfg_scale, null_cond=self.cfg.model.num_classes,
          noise_level=0.0, lora=lora, track_rho=True)
    return self._rollouts[k]

  def __call__(self, policy_vars, ref_vars, model_cfg, lora):
    ro = self._rollout(model_cfg, lora)(policy_vars, ref_vars, self.cond, self.key)
    total, parts = self.reward_fn(ro["x0"], self.cond)
    x0 = np.asarray(ro["x0"])
    out = {"reward": float(jnp.mean(total)), **{f"reward_{k}": float(jnp.mean(v)) for k, v in parts.items()},
           **self.quality(x0, np.asarray(self.cond))}
    rho = np.asarray(ro["rho"])
    out["rho_per_step"] = rho.mean(axis=1).tolist()
    out["mean_rho"] = float(rho.mean())
    out["norm_per_step"] = np.asarray(ro["norm"]).mean(axis=1).tolist()
    out["norm_ref_per_step"] = np.asarray(ro["norm_ref"]).mean(axis=1).tolist()
    return out, x0


def _abstract(tree):
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_rl(cfg, method, use_ng, ref_params, evaluator, reward_fn, run_dir, key, guard=None):
  """One online RL run, resumed from its latest checkpoint when there is one. Returns a result dict with its
  eval history. Raises Preempted after saving when ``guard`` saw SIGTERM."""
  rl = cfg.rl
  lora = rl.lora_rank > 0
  model_cfg = model_config(cfg, rl.lora_rank)
  apply_fn = apply_fn_for(model_cfg)
  k_init, k_loop = jax.random.split(key)
  if lora:
    trainable = dit.init(model_cfg, k_init)["lora"]
  else:
    trainable = jax.tree_util.tree_map(jnp.array, ref_params)
  with_old = needs_old(method, cfg)
  optimizer = optim.make_optimizer(rl, cfg.normguard if use_ng else None)
  state = state_lib.create(trainable, ref_params, optimizer, k_loop, lora=lora, with_old=with_old)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  state = jax.device_put(state, rules.tree_shardings(state, mesh))  # FSDP/TP placement by the rules table

  r = cfg.rollout
  noise_level = cfg.grpo.noise_level if method == "grpo" else r.noise_level
  image_shape = (cfg.model.image_size,) * 2 + (cfg.model.channels,)
  rollout = rollout_lib.make_rollout(apply_fn=apply_fn, image_shape=image_shape, num_steps=r.num_steps,
                                     shift=r.shift, cfg_scale=r.cfg_scale, null_cond=cfg.model.num_classes,
                                     noise_level=noise_level, lora=lora, track_rho=r.track_rho)
  train_step, _, batch_sh = step_lib.make_sharded_train_step(
      mesh, state, method=method, apply_fn=apply_fn, optimizer=optimizer, loss_cfg=cfg[method],
      ng_cfg=cfg.normguard, strategy=rl.fusion)
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
  writer = MetricWriter(run_dir, truncate_after=start_it - 1 if restored is not None else None)

  def meta(it, **extra):
    return dict({"iteration": it, "history": history, "name": name, "method": method, "normguard": use_ng},
                **extra)

  def evaluate(it):
    ev, x0 = evaluator(state.policy_variables(), state.ref_variables(), model_cfg, lora)
    ev["iteration"] = it
    history.append(ev)
    writer.write(it, {k: v for k, v in ev.items() if not isinstance(v, list)}, prefix="eval/")
    return x0

  x0 = None
  try:
    if not history:
      x0 = evaluate(0)
    bar = tqdm(range(start_it, rl.iterations + 1), desc=f"RL {name}", unit="it", dynamic_ncols=True,
               initial=start_it - 1, total=rl.iterations, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for it in bar:
      k_prompt, k_roll, k_batch = jax.random.split(jax.random.fold_in(k_loop, it), 3)
      cond = jnp.repeat(jax.random.randint(k_prompt, (r.prompts_per_iter,), 0, cfg.model.num_classes), r.group_size)
      sample_vars = state.old_variables() if with_old and method == "nft" else state.policy_variables()
      ro = rollout(sample_vars, state.ref_variables(), cond, k_roll)
      rewards, parts = reward_fn(ro["x0"], cond)
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
        x0 = evaluate(it)
      if guard is not None and guard.requested:
        ckpt.save(it, state, meta(it), force=True)
        ckpt.wait()
        raise Preempted(f"{name}: SIGTERM at iteration {it}; checkpoint saved in {ckpt.directory}")
      ckpt.save(it, state, meta(it))
    status, error = "ok", None
  except TrainingDiverged as e:
    status, error = "diverged", str(e)
    log.error("%s: %s", name, e)
    x0 = evaluate(int(state.step))  # record where the run stopped
  finally:
    writer.close()
  if x0 is None:  # resumed at the very end
    _, x0 = evaluator(state.policy_variables(), state.ref_variables(), model_cfg, lora)
  result = {"name": name, "method": method, "normguard": use_ng, "status": status, "error": error,
            "history": history, "wall_s": time.time() - t_start}
  done_it = max(rl.iterations, int(history[-1]["iteration"]) if history else 0) + 1
  ckpt.save(done_it, state, meta(done_it, done=True, result=result, samples=np.asarray(x0).tolist()), force=True)
  ckpt.close()
  return dict(result, samples=x0)


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
  on the same workdir resumes: finished runs are reused and the others continue from their last checkpoint."""
  config_lib.validate(cfg)
  workdir = prepare_workdir(workdir)
  _check_same_config(workdir, cfg)
  images, labels = digits.load_digits()
  quality = quality_lib.DigitQuality(seed=cfg.seed)
  reward_fn = make_reward(dict(cfg.reward.terms))
  ref_cfg = model_config(cfg, 0)

  t0 = time.time()
  writer = MetricWriter(os.path.join(workdir, "runs", "pretrain"))
  ref_params, pre_info = pretrain_lib.load_or_pretrain(ref_cfg, cfg.pretrain, images, labels, cfg.seed, writer,
                                                          guard)
  writer.close()
  pre_info["wall_s"] = time.time() - t0
  evaluator = Evaluator(cfg, quality, reward_fn, ref_cfg)
  ref_eval, ref_x0 = evaluator({"params": ref_params}, {"params": ref_params}, ref_cfg, False)
  n_eval = int(evaluator.cond.shape[0])
  real_quality = quality(images[:n_eval], labels[:n_eval])  # the proxies' level on real data, same size

  results = []
  report = None
  try:
    for method in config_lib.csv(cfg.rl.methods):
      for setting in config_lib.csv(cfg.rl.normguard):
        name = f"{method}_{'ng' if setting == 'on' else 'base'}"
        stub = {"name": name, "method": method, "normguard": setting == "on", "history": [], "samples": None}
        key = jax.random.PRNGKey(cfg.seed + 1)  # same key for the pair: matched rollouts at the start
        try:
          results.append(run_rl(cfg, method, setting == "on", ref_params, evaluator, reward_fn,
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
    report = report_lib.write_report(workdir, cfg, pre_info, ref_eval, ref_x0, real_quality, results,
                                     evaluator.cond)
  return report
