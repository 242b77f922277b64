"""The main job (DESIGN.md §4): pretrain (or load) the reference, then for each method and NormGuard
setting an online RL run, then the report. Each run logs as it goes; a failed run is recorded and the
job moves on, and the report is written whatever happened.

Every jitted program is built by train/programs.py (traced under the activation mesh); each host builds only its
own rows of every batch (parallel/sharding.rows_from_process_local); decisions that change control flow
(preemption) are agreed by all hosts."""

import contextlib
import json
import logging
import os
import sys
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
from normguard_jax.train import checkpoint as ckpt_lib
from normguard_jax.train import programs
from normguard_jax.train.logging import MetricWriter, to_python

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  pass


class Preempted(RuntimeError):
  """SIGTERM arrived; the run saved a checkpoint and stopped. Rerun the same command to resume."""


from normguard_jax.tasks.digits import apply_fn_for, model_config  # noqa: E402,F401  (stable names)


@contextlib.contextmanager
def phase(what):
  """Log a phase of the job with its wall time (a real run is otherwise silent for minutes while it loads,
  converts and compiles)."""
  t0 = time.time()
  log.info("%s ...", what)
  yield
  log.info("%s: done in %.1f s", what, time.time() - t0)


def _rows(tree, lo, hi):
  return None if tree is None else jax.tree_util.tree_map(lambda a: a[lo:hi], tree)


_ROW_AXIS = {"x0": 0, "xs": 1, "log_probs": 1, "norm": 1, "norm_ref": 1, "rho": 1}


@jax.jit
def _concat_chunks(outs, rewards, parts):
  """The per-chunk rollout outputs, rewards and reward terms concatenated along their row axes (inside jit, so
  global arrays on several hosts are combined where they live)."""
  ro = {k: outs[0][k] if k not in _ROW_AXIS else jnp.concatenate([o[k] for o in outs], axis=_ROW_AXIS[k])
        for k in outs[0]}
  return ro, jnp.concatenate(rewards), {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}


def rollout_and_score(rollout_fn, decode, reward_fn, cond, uncond, prompts, key, chunk, place=lambda t: t,
                      num_rows=None):
  """Roll out, decode and score the rows in chunks of ``chunk`` rows (0: all at once). Chunk i+1's rollout is
  dispatched before chunk i is scored, so device sampling overlaps host-side (remote) rewards.

  ``cond`` / ``uncond``: the conditioning of all rows (``place`` puts a chunk's rows on the mesh), or functions
  ``(lo, hi) -> placed rows`` that build a chunk directly (``num_rows`` then gives the total).
  Returns (rollout dict over all rows, rewards (B,), {term: (B,)})."""
  b = num_rows if num_rows is not None else jax.tree_util.tree_leaves(cond)[0].shape[0]
  rows_of = lambda t: (None if t is None else t if callable(t) else (lambda lo, hi: place(_rows(t, lo, hi))))
  cond_rows, uncond_rows = rows_of(cond), rows_of(uncond)
  chunk = b if chunk <= 0 else min(chunk, b)
  if b % chunk:
    raise ValueError(f"rollout.chunk {chunk} does not divide the {b} rollout rows")
  spans = [(lo, lo + chunk) for lo in range(0, b, chunk)]
  keys = [key] if len(spans) == 1 else [jax.random.fold_in(key, i) for i in range(len(spans))]

  def launch(i):
    c = cond_rows(*spans[i])
    return c, rollout_fn(c, None if uncond_rows is None else uncond_rows(*spans[i]), keys[i])
  outs, rewards, parts = [], [], []
  pending = launch(0)
  for i, (lo, hi) in enumerate(spans):
    c, ro = pending
    if i + 1 < len(spans):
      pending = launch(i + 1)  # async dispatch: runs on the device while chunk i is scored
    total, terms = reward_fn(RewardBatch(decode(ro["x0"]), c, None if prompts is None else prompts[lo:hi]))
    outs.append(ro), rewards.append(total), parts.append(terms)
  if len(outs) == 1:
    return outs[0], rewards[0], parts[0]
  return _concat_chunks(outs, rewards, parts)


def _place_rows(tree, mesh):
  """Rows over the mesh's batch axes (sharding.place_rows, which refuses rows the axes do not divide)."""
  return sharding.place_rows(tree, mesh)


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


def host_rows(tree, idx):
  """Rows ``idx`` of a host pytree (numpy indexing)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[idx], tree)


class Evaluator:
  """Fixed eval set (same prompts and initial noise for every run): ODE samples, reward, quality, rho_k.

  The eval rows are padded to a multiple of the mesh's batch axes (copies of the last row, dropped afterwards), so
  the sampler runs split over the mesh whatever the eval size; each host builds only its rows. ``eval.chunk`` rows
  per sampler call (0: all at once) bound the memory of a large eval set (chunk i samples with key fold_in(key, i))."""

  def __init__(self, cfg, task, reward_fn, mesh):
    cond, self.prompts = task.eval_set()
    self.cond = jax.tree_util.tree_map(np.asarray, cond)
    self.rows = int(jax.tree_util.tree_leaves(self.cond)[0].shape[0])
    self.mesh = mesh
    n = sharding.batch_size_divisor(mesh)
    chunk = int(cfg.eval.get("chunk", 0) or 0)
    self.chunk = self.rows + (-self.rows % n) if chunk <= 0 or chunk >= self.rows else chunk + (-chunk % n)
    self.padded = self.rows + (-self.rows % self.chunk)
    self.pad_idx = np.minimum(np.arange(self.padded), self.rows - 1)
    self.uncond = None
    if cfg.rollout.cfg_scale != 1.0 or programs.eval_cfg_scale(cfg) != 1.0:
      self.uncond = jax.tree_util.tree_map(np.asarray, task.uncond(self.cond))
    self.key = jax.random.PRNGKey(cfg.seed + 12345)
    self.task, self.reward_fn, self.cfg = task, reward_fn, cfg
    self._rollouts = {}

  def _rows(self, tree, lo, hi):
    """Rows [lo, hi) of the padded eval set on the mesh, each host building its own."""
    return None if tree is None else sharding.rows_from_process_local(
        lambda i: host_rows(tree, self.pad_idx[lo + i]), hi - lo, self.mesh)

  def _rollout(self, model_cfg, lora):
    k = (model_cfg, lora)
    if k not in self._rollouts:
      kw = dict(programs.rollout_kwargs(self.cfg, self.task, None, eval_mode=True),
                apply_fn=self.task.apply_fn(model_cfg), lora=lora)
      self._rollouts[k] = programs.make_rollout_program(self.mesh, **kw)
    return self._rollouts[k]

  def __call__(self, policy_vars, ref_vars, model_cfg, lora):
    """-> (summary dict, images (rows, ...) host array, per-sample dict of host arrays)."""
    rollout, n = self._rollout(model_cfg, lora), self.rows
    spans = [(lo, lo + self.chunk) for lo in range(0, self.padded, self.chunk)]
    parts_out = []
    for i, (lo, hi) in enumerate(spans):
      cond = self._rows(self.cond, lo, hi)
      ro = rollout(policy_vars, ref_vars, cond, self._rows(self.uncond, lo, hi),
                   self.key if len(spans) == 1 else jax.random.fold_in(self.key, i))
      images = self.task.decode(ro["x0"])
      prompts = None if self.prompts is None else [self.prompts[j] for j in self.pad_idx[lo:hi]]
      total, terms = self.reward_fn(RewardBatch(images, cond, prompts))
      h = distributed.host_array
      parts_out.append({"images": h(images), "reward": h(total), **{f"reward_{k}": h(v) for k, v in terms.items()},
                        "rho": h(ro["rho"]), "norm": h(ro["norm"]), "norm_ref": h(ro["norm_ref"])})
    cat = lambda k, axis=0: np.concatenate([p[k] for p in parts_out], axis=axis)
    images = cat("images")[:n]
    terms = [k for k in parts_out[0] if k.startswith("reward_")]
    per_sample = {"reward": cat("reward")[:n], **{k: cat(k)[:n] for k in terms}, "rho": cat("rho", 1)[:, :n]}
    qs = self.task.quality_per_sample(images, self.cond)
    out = {"reward": float(per_sample["reward"].mean()), **{k: float(per_sample[k].mean()) for k in terms},
           **self.task.quality_aggregate(qs)}
    per_sample.update({f"q_{k}": v for k, v in qs.items()})
    rho = per_sample["rho"]
    out["rho_per_step"] = rho.mean(axis=1).tolist()
    out["mean_rho"] = float(rho.mean())
    out["norm_per_step"] = cat("norm", 1)[:, :n].mean(axis=1).tolist()
    out["norm_ref_per_step"] = cat("norm_ref", 1)[:, :n].mean(axis=1).tolist()
    return out, images, per_sample


def save_eval_samples(path, iteration, per_sample):
  """Per-sample eval values (reward, rho_k, ...) of one evaluation, for statistics over eval samples."""
  if not distributed.is_main_process():
    return
  os.makedirs(path, exist_ok=True)
  np.savez_compressed(os.path.join(path, f"{int(iteration):06d}.npz"), **per_sample)


def _prompt_rows(prompts_per_iter, group_size):
  """Row i of an iteration's rollout is prompt row_prompt[i] (groups contiguous)."""
  return np.repeat(np.arange(prompts_per_iter), group_size)


def initial_trainable(cfg, state, mesh):
  """``rl.init_from``: start from a trained run's final trainable params (LoRA adapters, or the full params) instead
  of a fresh adapter: a run folder (WORKDIR/runs/NAME) or its checkpoints/ folder. The optimizer, the old/EMA and
  evaluation copies start from them too; the tree must match this run's model and LoRA setting exactly."""
  from normguard_jax.analysis import workdir as workdir_lib
  src = os.path.abspath(os.path.expanduser(cfg.rl.init_from))
  ckpt_dir = src if os.path.basename(src) == "checkpoints" else os.path.join(src, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise config_lib.ConfigError(f"config.rl.init_from: {src} is not a run folder (WORKDIR/runs/NAME with "
                                 "checkpoints/); export a run with `normguard_jax.convert export-lora` to use it in "
                                 "diffusers instead")
  try:
    step, restored, _ = workdir_lib.restore_checkpoint(ckpt_dir, keys=("trainable",))
  except workdir_lib.WorkdirError as e:
    raise config_lib.ConfigError(f"config.rl.init_from: {e}") from e
  got, want = restored["trainable"], state.trainable
  shapes = lambda t: jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), t)
  if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(want) or shapes(got) != shapes(want):
    raise config_lib.ConfigError(
        f"config.rl.init_from: {ckpt_dir}/{step} holds trainable params of another shape (LoRA rank, targets, model "
        "or full fine-tuning differ from this run's)")
  log.info("initialising from %s (step %d)", ckpt_dir, step)
  put = lambda t: jax.device_put(t, rules.tree_shardings(t, mesh))
  return put(got)


def run_rl(cfg, task, method, use_ng, ref_params, evaluator, reward_fn, run_dir, key, mesh, guard=None):
  """One online RL run, resumed from its latest checkpoint when there is one. Returns a result dict with its
  eval history. Raises Preempted after saving when ``guard`` saw SIGTERM (agreed across hosts)."""
  rl, r = cfg.rl, cfg.rollout
  name = os.path.basename(run_dir)
  setup = programs.run_setup(cfg, task, method, use_ng)
  state = programs.init_state(setup, task, ref_params, key)
  if cfg.rl.get("init_from", ""):
    state = programs.restart_state(setup, state, initial_trainable(cfg, state, mesh))
  state = jax.device_put(state, rules.tree_shardings(state, mesh))  # FSDP/TP placement by the rules table
  progs = programs.build_run_programs(cfg, task, setup, mesh, state)

  ckpt = ckpt_lib.RunCheckpointer(os.path.join(run_dir, "checkpoints"), every=cfg.checkpoint.every,
                                  keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  history, consecutive_skips, t_start, start_it = [], 0, time.time(), 1
  restored = ckpt.restore_latest(programs.abstract_like(state))
  if restored is not None:
    step0, state, saved = restored
    history = saved["history"]
    done_at = int(saved.get("last_iteration", step0 - 1 if saved.get("done") else step0))
    if saved.get("done") and (done_at >= rl.iterations or saved["result"]["status"] != "ok"):  # finished: reuse
      ckpt.close()
      log.info("%s: already finished (%d iterations); reusing its result", name, done_at)
      return dict(saved["result"], samples=np.asarray(saved["samples"], np.float32))
    if saved.get("done"):  # finished at fewer iterations: extend it from its final state
      log.info("%s: extending the finished run from %d to %d iterations", name, done_at, rl.iterations)
      ckpt.delete(step0)  # its step number is the next iteration's; the state lives on in `state`
      history = [h for h in history if h["iteration"] <= done_at]
    else:
      log.info("%s: resumed from the checkpoint at iteration %d", name, done_at)
    start_it = done_at + 1
  writer = MetricWriter(run_dir, truncate_after=start_it - 1 if restored is not None else None,
                        enabled=distributed.is_main_process())
  if restored is None:
    record = dict(programs.recipe_record(cfg, task), method=method, normguard=use_ng)
    writer.hparams(record)
    if distributed.is_main_process():
      with open(os.path.join(run_dir, "recipe.json"), "w") as f:
        json.dump(record, f, indent=2)
  eval_dir = os.path.join(run_dir, "eval")

  def meta(it, **extra):
    return dict({"iteration": it, "last_iteration": it, "history": history, "name": name, "method": method,
                 "normguard": use_ng}, **extra)

  def evaluate(it):
    ev, images, per_sample = evaluator(programs.scored_variables(cfg, state), state.ref_variables(), setup.model_cfg,
                                       setup.lora)
    ev["iteration"] = it
    history.append(ev)
    writer.write(it, {k: v for k, v in ev.items() if not isinstance(v, list)}, prefix="eval/")
    save_eval_samples(eval_dir, it, per_sample)
    if distributed.is_main_process():
      grid = report_lib.image_grid(images, max_images=cfg.eval.get("grid_images", 64))
      writer.image(it, "eval/samples", grid)  # TensorBoard
      report_lib.save_image(grid, os.path.join(eval_dir, f"samples_{it:06d}.png"))  # and a PNG per eval
    return images

  row_prompt = _prompt_rows(r.prompts_per_iter, r.group_size)
  rows = len(row_prompt)
  images = None
  try:
    if not history:
      images = evaluate(0)
    bar = tqdm(range(start_it, rl.iterations + 1), desc=f"RL {name}", unit="it", dynamic_ncols=True,
               initial=start_it - 1, total=rl.iterations, mininterval=0.5 if sys.stderr.isatty() else 10.0)
    for it in bar:
      k_prompt, k_roll, k_batch = jax.random.split(jax.random.fold_in(setup_key(key), it), 3)
      cond_p, prompts_p = task.sample_prompts(k_prompt, r.prompts_per_iter)  # every process draws the same prompts
      cond_p = jax.tree_util.tree_map(np.asarray, cond_p)
      uncond_p = jax.tree_util.tree_map(np.asarray, task.uncond(cond_p)) if r.cfg_scale != 1.0 else None
      local = lambda tree: (lambda lo, hi: sharding.rows_from_process_local(
          lambda i: host_rows(tree, row_prompt[lo + i]), hi - lo, mesh))  # this host's rows of [lo, hi) only
      prompts = None if prompts_p is None else [prompts_p[i] for i in row_prompt]
      sample_vars = state.old_variables() if setup.with_old and method == "nft" else state.policy_variables()
      ro, rewards, parts = rollout_and_score(
          lambda c, u, k: progs.rollout(sample_vars, state.ref_variables(), c, u, k), task.decode, reward_fn,
          local(cond_p), None if uncond_p is None else local(uncond_p), prompts, k_roll, r.chunk, num_rows=rows)
      if not bool(jnp.all(jnp.isfinite(rewards))):
        raise TrainingDiverged(f"non-finite reward at iteration {it}: samples have diverged")
      batch = progs.make_batch(k_batch, ro, local(cond_p)(0, rows),
                               None if uncond_p is None else local(uncond_p)(0, rows), rewards)
      step_metrics = []
      for part in progs.split_updates(batch):  # rl.updates_per_iter optimizer updates on this rollout batch
        state, m = progs.train_step(state, part)
        step_metrics.append(to_python(m))
      if setup.with_old:
        state = progs.update_old(state, it)
      if setup.with_eval_ema and it % int(cfg.eval.get("ema_every", 1)) == 0:
        state = progs.update_eval_ema(state, it)
      metrics = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
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
      if it == start_it:
        log.info("%s: iteration %d took %.1f s (it compiles the rollout and the train step)", name, it,
                 time.time() - t_start)
      if it % cfg.eval.every == 0 or it == rl.iterations:
        images = evaluate(it)
      if guard is not None and guard.should_stop():  # a collective: every host decides at the same iteration
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
    _, images, _ = evaluator(programs.scored_variables(cfg, state), state.ref_variables(), setup.model_cfg,
                             setup.lora)
  result = {"name": name, "method": method, "normguard": use_ng, "status": status, "error": error,
            "history": history, "wall_s": time.time() - t_start}
  last = int(history[-1]["iteration"]) if history else 0
  done_step = max(rl.iterations, last) + 1
  ckpt.save(done_step, state, meta(done_step, last_iteration=max(rl.iterations, last) if status == "ok" else last,
                                   done=True, result=result, samples=np.asarray(images).tolist()), force=True)
  ckpt.close()
  return dict(result, samples=images)


def setup_key(key):
  """The run's loop key: the second half of its split key (the first initialises the adapters), as before."""
  return jax.random.split(key)[1]


# Fields that may change between a run and its resumption: how far to train, where files live, how the work is laid
# out on the devices. Everything else would mix two experiments in one workdir.
RESUMABLE = ("rl.iterations", "checkpoint.", "mesh.", "rollout.chunk", "model.decode_batch", "model.remat",
             "model.attention_impl", "model.weights_dir", "data.embeddings_dir", "data.negative_dir",
             "data.eval_embeddings_dir", "pretrain.cache_dir", "pretrain.log_every", "reward.options.")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _check_same_config(workdir, cfg):
  """A workdir holds one experiment: resuming with another config would mix results, so refuse clearly. Operational
  fields (RESUMABLE: more iterations, moved files, another mesh) may change. Returns the config JSON to write."""
  path = os.path.join(workdir, "config.json")
  now = json.loads(cfg.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    a, b = _flat(before), _flat(now)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    fixed = [k for k in diff if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUMABLE)]
    if fixed:
      raise config_lib.ConfigError(f"workdir {workdir} holds a run with a different config (fields {fixed}); "
                                   "use a new --workdir, or the same config to resume")
  return now


def _write_config(workdir, now):
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(now, f, indent=2)


def run_names(cfg):
  """The job's runs in order: (name, method, NormGuard on, seed)."""
  seeds = [int(s) for s in config_lib.csv(cfg.get("seeds", ""))] or [int(cfg.seed)]
  out = []
  for method in config_lib.csv(cfg.rl.methods):
    for setting in config_lib.csv(cfg.rl.normguard):
      for s in seeds:
        name = f"{method}_{'ng' if setting == 'on' else 'base'}" + (f"_s{s}" if len(seeds) > 1 else "")
        out.append((name, method, setting == "on", s))
  return out


def finished(workdir, cfg):
  """Whether every run of this config has finished (a done checkpoint at >= rl.iterations) and report.json exists:
  a rerun then says so and exits at once, without loading models."""
  if not os.path.exists(os.path.join(workdir, "report.json")):
    return False
  for name, *_ in run_names(cfg):
    meta = ckpt_lib.latest_meta(os.path.join(workdir, "runs", name, "checkpoints"))
    if meta is None or not meta.get("done") or int(meta.get("last_iteration", -1)) < cfg.rl.iterations:
      return False
  return True


def run(cfg, workdir, guard=None):
  """The whole job. Returns the report dict (also written to workdir/report.json). Rerunning the same command
  on the same workdir resumes: finished runs are reused and the others continue from their last checkpoint; a
  larger ``rl.iterations`` extends finished runs.

  Multi-host: every process runs this same function (launch/tpu_pod.sh); arrays are global, and only process 0
  writes the logs, plots and report (checkpoints are written by orbax from all processes). Other processes return
  {"runs": [{"name", "status"}, ...]} so that every process can set its exit status."""
  config_lib.validate(cfg)
  config_lib.check_batch_layout(cfg, jax.device_count())
  workdir = prepare_workdir(workdir)
  config_json = _check_same_config(workdir, cfg)
  if finished(workdir, cfg):
    log.info("%s: every run has finished (%d iterations); nothing to do. Raise rl.iterations to extend them.",
             workdir, cfg.rl.iterations)
    with open(os.path.join(workdir, "report.json")) as f:
      report = json.load(f)
    return dict(report, already_finished=True)
  with phase("loading the task (model configs, data) and the rewards"):
    task = tasks_lib.make_task(cfg)
    config_lib.check_task_layout(cfg, task)
    try:
      reward_fn = make_reward(dict(cfg.reward.terms), config_lib.reward_options(cfg))
    except ValueError as e:  # RewardOptionsError: missing or wrong model dirs, a remote reward without url, ...
      raise config_lib.ConfigError(f"config.{e}") from e
  if distributed.is_main_process():
    _write_config(workdir, config_json)  # only now: a start that fails on its inputs does not lock the workdir
  mesh = mesh_lib.make_mesh(cfg.mesh)
  log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
  ref_cfg = task.model_config(0)

  t0 = time.time()
  with phase("the reference model (load and convert, or pretrain)"):
    ref_params, pre_info = task.reference(workdir, guard)
  pre_info["wall_s"] = time.time() - t0
  if hasattr(task, "use_mesh"):  # latent tasks: the VAE decode splits its rows over the mesh
    task.use_mesh(mesh)
  evaluator = Evaluator(cfg, task, reward_fn, mesh)
  ref_eval, ref_images, ref_error = {}, None, None
  try:
    with phase("evaluating the reference (compiles the eval sampler)"):
      ref_eval, ref_images, ref_samples = evaluator({"params": ref_params}, {"params": ref_params}, ref_cfg, False)
      save_eval_samples(os.path.join(workdir, "runs", "reference", "eval"), 0, ref_samples)
  except Exception as e:  # e.g. a remote reward that is down: still write the report, with the error
    log.error("reference evaluation failed: %s", e)
    ref_error = f"{type(e).__name__}: {e}"
  real_quality = task.real_quality(evaluator.cond)  # the proxies' level on real data, same classes and size

  results = []
  report = None
  try:
    if ref_error is None:
      for name, method, use_ng, seed in run_names(cfg):
        stub = {"name": name, "method": method, "normguard": use_ng, "seed": seed, "history": [], "samples": None}
        key = jax.random.PRNGKey(seed + 1)  # same key for the base/NormGuard pair: matched rollouts at the start
        try:
          res = run_rl(cfg, task, method, use_ng, ref_params, evaluator, reward_fn,
                       os.path.join(workdir, "runs", name), key, mesh, guard)
          results.append(dict(res, seed=seed))
        except Preempted as e:
          log.warning("%s", e)  # on every process: each host says where it stopped
          results.append(dict(stub, status="preempted", error=str(e)))
          break
        except Exception as e:  # record, keep going, never lose the other runs
          log.error("run %s failed: %s", name, e)
          results.append(dict(stub, status="failed", error=f"{type(e).__name__}: {e}",
                              traceback=traceback.format_exc()))
  finally:
    if distributed.is_main_process():
      report = report_lib.write_report(workdir, cfg, task, pre_info, ref_eval, ref_images, real_quality, results,
                                       evaluator.cond, evaluator.prompts, reference_error=ref_error)
  if report is None:
    report = {"runs": [{"name": r["name"], "status": r["status"]} for r in results], "reference_error": ref_error}
  return report
