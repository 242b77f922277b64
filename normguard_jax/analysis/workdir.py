"""Load a finished main-job workdir for analysis, independently of the training loop's internals.

Depends only on the on-disk contract (README "Outputs in the workdir", train/checkpoint.py):

* ``WORKDIR/config.json``: the job's ml_collections config as JSON;
* ``WORKDIR/runs/<name>/checkpoints/<step>/`` orbax items ``state`` (TrainState fields ``step, trainable, frozen,
  old, opt_state, rng``) and ``meta`` (JSON; the final checkpoint has ``done=True`` and the run's ``result``);
* ``WORKDIR/runs/<name>/metrics.jsonl``;

plus the job's task (normguard_jax/tasks: ``config.task``; digits, sd3, flux) for the model config, the velocity
function, the held-out conditions, CFG's unconditional input and the decoder. A text-to-image task reads the local
files its config names (``model.weights_dir`` for the VAE and the transformer's config.json, ``data.embeddings_dir``
for the eval prompts); ``overrides`` (``--set key=value`` on the command line) repoint them when they have moved.
Checkpoints are restored onto one local device (a target built from the checkpoint's own metadata), whatever device
count or mesh they were saved from.

Policy variables (train/state.py): LoRA runs ``{"params": frozen, "lora": trainable}`` (adapter on), full fine-tuning
``{"params": trainable}``. The reference is ``{"params": frozen}`` under the LoRA-free model config, i.e. the base
model exactly (DESIGN.md §3, LoRA gate 0 = base model).
"""

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

log = logging.getLogger(__name__)


class WorkdirError(RuntimeError):
  """The workdir is missing, unfinished or unreadable; the message says which file and what to do."""


@dataclasses.dataclass
class RunModel:
  name: str
  method: Optional[str]
  normguard: Optional[bool]
  lora: bool
  step: int                      # checkpoint step (done checkpoints sit at iterations + 1)
  iteration: int                 # training iterations the params have seen (TrainState.step)
  done: bool
  status: Optional[str]          # "ok", "diverged", ... from the final meta; None when unfinished
  model_cfg: Any                 # dit.DiTConfig of the policy
  variables: Dict[str, Any]      # policy variables for models/dit.velocity
  meta: Dict[str, Any]


@dataclasses.dataclass
class Workdir:
  path: str
  cfg: ml_collections.ConfigDict
  ref_model_cfg: Any
  ref_params: Any
  runs: Dict[str, RunModel]
  task: Any = None               # the job's task (tasks/__init__.py), built from cfg
  mesh: Any = None               # None: one device; else params placed by the rules table over this mesh

  def velocity_apply(self, model_cfg):
    return velocity_apply(self.task, model_cfg)

  def place(self, tree):
    """Analysis inputs (noise, conditions): rows over the mesh's (data, fsdp) axes when they divide evenly, else
    replicated; unchanged without a mesh. Every process passes the same value."""
    if self.mesh is None or tree is None:
      return tree
    from normguard_jax.train import loop  # the trainer's placement of rollout rows
    return loop._place_rows(tree, self.mesh)

  @property
  def ref_variables(self):
    return {"params": self.ref_params}

  def pairs(self):
    """method -> {"base": RunModel|None, "ng": RunModel|None} (names ``<method>_base`` / ``<method>_ng``)."""
    out = {}
    for r in self.runs.values():
      method = r.method or r.name.rsplit("_", 1)[0]
      out.setdefault(method, {"base": None, "ng": None})["ng" if r.normguard else "base"] = r
    return out


_APPLY = {}


def velocity_apply(task, model_cfg):
  """``f(variables, x, t, cond) -> v`` for a model config (adapter on for LoRA variables). Cached per (task class,
  config), on which the velocity depends, so that jitted analysis functions taking it as a static argument compile
  once per model, not once per run or per command."""
  key = (type(task).__name__, model_cfg)
  if key not in _APPLY:
    apply_fn = task.apply_fn(model_cfg)

    def f(variables, x, t, cond):
      return apply_fn(variables, x, t, cond, None)
    _APPLY[key] = f
  return _APPLY[key]


def load_config(workdir, overrides=()):
  """``WORKDIR/config.json`` as a ConfigDict, with ``key=value`` overrides applied (config.apply_overrides)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir!r} does not exist")
  if not os.path.isfile(path):
    raise WorkdirError(f"{path} is missing: {workdir!r} is not a main-job workdir "
                       "(python -m normguard_jax.train --config ... --workdir DIR writes it first)")
  try:
    with open(path) as f:
      cfg = ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} is not readable JSON: {e}") from e
  if overrides:
    from normguard_jax import config as config_lib
    try:
      cfg = config_lib.apply_overrides(cfg, list(overrides))
    except (config_lib.ConfigError, ValueError, KeyError, AttributeError) as e:
      raise WorkdirError(f"--set {list(overrides)}: {e}") from e
  return cfg


def make_task(cfg, workdir):
  """The job's task from its config; a file it names that is gone or unreadable is a WorkdirError."""
  from normguard_jax import config as config_lib
  from normguard_jax import tasks as tasks_lib
  try:
    return tasks_lib.make_task(cfg)
  except (config_lib.ConfigError, FileNotFoundError, KeyError, ValueError) as e:
    raise WorkdirError(f"{workdir}/config.json names files the {cfg.get('task', 'digits')!r} task cannot read "
                       f"here: {type(e).__name__}: {e}. Repoint them with --set, e.g. --set "
                       "model.weights_dir=/path/to/snapshot --set data.embeddings_dir=/path/to/embeddings") from e


def run_names(workdir):
  """Names of the RL runs in ``WORKDIR/runs`` (folders with a ``checkpoints`` subfolder), in config order when
  the config names them (rl.methods x rl.normguard), then any others sorted."""
  root = os.path.join(workdir, "runs")
  found = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                 if os.path.isdir(os.path.join(root, n, "checkpoints")))
  return found


def _ordered(names, cfg):
  try:
    csv = lambda s: [x.strip() for x in str(s).split(",") if x.strip()]
    order = [f"{m}_{'ng' if s == 'on' else 'base'}" for m in csv(cfg.rl.methods) for s in csv(cfg.rl.normguard)]
  except (AttributeError, KeyError):
    order = []
  return [n for n in order if n in names] + [n for n in names if n not in order]


def _steps(ckpt_dir):
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isfile(os.path.join(ckpt_dir, n, "_CHECKPOINT_METADATA")))


ANALYSIS_KEYS = ("step", "trainable", "frozen")  # what the analysis needs: not the optimizer state or old params


def restore_checkpoint(ckpt_dir, step=None, mesh=None, keys=ANALYSIS_KEYS):
  """Restore the ``keys`` of one checkpoint's state (the newest by default). Returns (step, state dict, meta).

  The restore target is built from the checkpoint's own array metadata (shape, dtype), so a checkpoint saved on N
  devices or another mesh restores here: onto the first local device, or with ``mesh`` placed by the rules table
  (parallel/rules.py: FSDP/TP over the mesh, as in training). Only ``keys`` are read (an orbax partial restore): the
  Adam moments and the old/EMA params, as large as the policy, stay on disk."""
  import orbax.checkpoint as ocp
  if not os.path.isdir(ckpt_dir):
    raise WorkdirError(f"no checkpoint folder {ckpt_dir}")
  steps = _steps(ckpt_dir)
  if not steps:
    raise WorkdirError(f"{ckpt_dir} holds no finished checkpoint (the run has not saved yet, or every save was "
                       "interrupted); --runs picks the runs to analyse")
  step = steps[-1] if step is None else step
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "meta"), item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    md = mngr.item_metadata(step)["state"]
    tree = dict(getattr(md, "tree", md))
    missing = [k for k in keys if k not in tree]
    if missing:
      raise WorkdirError(f"checkpoint {ckpt_dir}/{step} has no {missing} (keys: {sorted(tree)}): not a train state")
    is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    sds = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype) if is_array(x) else x,
                                 {k: tree[k] for k in keys}, is_leaf=is_array)
    if mesh is None:
      one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      shardings = jax.tree_util.tree_map(lambda _: one, sds)
    else:
      from normguard_jax.parallel import rules
      shardings = rules.tree_shardings(sds, mesh)
    target = jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sds,
                                    shardings)
    restore_args = jax.tree_util.tree_map(lambda sh: ocp.ArrayRestoreArgs(sharding=sh), shardings)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
        meta=ocp.args.JsonRestore()))
  except WorkdirError:
    raise
  except Exception as e:
    raise WorkdirError(f"checkpoint {ckpt_dir}/{step} does not restore: {type(e).__name__}: {e}") from e
  finally:
    mngr.close()
  return step, dict(out.state), dict(out.meta or {})


def _is_lora(trainable):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)]
  return bool(paths) and all("lora_" in p for p in paths)


def load_run(workdir, name, cfg, task, require_done=True, mesh=None):
  """-> (RunModel, reference params of that run: its state's ``frozen`` field)."""
  ckpt_dir = os.path.join(workdir, "runs", name, "checkpoints")
  step, state, meta = restore_checkpoint(ckpt_dir, mesh=mesh)
  done = bool(meta.get("done"))
  if require_done and not done:
    raise WorkdirError(f"run {name!r} in {workdir} is unfinished: its newest checkpoint ({step}) is not the final "
                       "one (meta.done is not set). Rerun the training command on this workdir to finish it, or "
                       "pass --allow-unfinished to analyse the latest checkpoint.")
  lora = _is_lora(state["trainable"])
  rank = int(cfg.rl.lora_rank) if lora else 0
  mcfg = task.model_config(rank)
  variables = {"params": state["frozen"], "lora": state["trainable"]} if lora else {"params": state["trainable"]}
  result = meta.get("result") or {}
  return RunModel(name=name, method=meta.get("method"), normguard=meta.get("normguard"), lora=lora, step=step,
                  iteration=int(np.asarray(state["step"].addressable_data(0))), done=done, status=result.get("status"),
                  model_cfg=mcfg, variables=variables,
                  meta={k: v for k, v in meta.items() if k not in ("samples", "history")}), state["frozen"]


def load_workdir(workdir, runs: Optional[List[str]] = None, require_done=True, overrides=(), shard=False):
  """Load config, task, reference params and every (or the named) run's final policy variables. ``shard``: place
  params by the rules table over a mesh of all devices (``config.mesh`` sizes, as in training; ``--set mesh.*``
  to change them), for models that do not fit one device; on several hosts every host runs the same command."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  cfg = load_config(workdir, overrides)
  names = _ordered(run_names(workdir), cfg)
  if runs:
    missing = sorted(set(runs) - set(names))
    if missing:
      raise WorkdirError(f"run(s) {missing} not found in {workdir}/runs (have {names})")
    names = [n for n in names if n in runs]
  if not names:
    raise WorkdirError(f"{workdir} has no RL run checkpoints under runs/<name>/checkpoints: the job has not "
                       "finished a run yet")
  task = make_task(cfg, workdir)
  mesh = None
  if shard:
    from normguard_jax.parallel import mesh as mesh_lib
    try:
      mesh = mesh_lib.make_mesh(cfg.get("mesh"))
    except ValueError as e:
      raise WorkdirError(f"--shard: config.mesh {dict(cfg.get('mesh') or {})} does not fit the {jax.device_count()} "
                         f"devices here ({e}); change it with --set mesh.fsdp=-1 --set mesh.data=1 ...") from e
  loaded, ref_params = {}, None
  for name in names:
    run, ref = load_run(workdir, name, cfg, task, require_done=require_done, mesh=mesh)
    if ref_params is None:
      ref_params = ref
    else:
      same = jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), ref_params, ref))
      if not same:
        log.warning("run %s has different frozen (reference) params from the first run; using the first", name)
    loaded[name] = run
  if mesh is not None and hasattr(task, "use_mesh"):
    task.use_mesh(mesh)  # the VAE decode splits its rows over the mesh
  return Workdir(path=workdir, cfg=cfg, ref_model_cfg=task.model_config(0), ref_params=ref_params, runs=loaded,
                 task=task, mesh=mesh)


def read_metrics(path):
  """``metrics.jsonl`` -> list of dicts (blank or truncated lines skipped)."""
  rows = []
  if not os.path.isfile(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue  # a line cut by a crash mid-write
  return rows
