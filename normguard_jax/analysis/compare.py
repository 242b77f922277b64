"""Compare a PyTorch run's scalar logs with ours (``runs/<name>/metrics.jsonl``), side by side.

Readers (``read_scalars(path)`` -> {name: (steps, values)}; a folder is searched recursively):

* TensorBoard event files (``events.out.tfevents.*``): TFRecord framing (u64 length, u32 masked CRC, payload,
  u32 masked CRC) with ``Event`` protos decoded by tensorboardX's bundled ``event_pb2`` (no TensorFlow or
  tensorboard needed); scalars from ``simple_value`` or a scalar ``tensor`` (float_val/double_val/tensor_content).
* CSV: wide (a step column ``step``/``Step``/``global_step``/``_step``/``iteration``/``epoch`` plus one column per
  metric, e.g. a wandb export), long (``step, tag|name|metric, value``), or TensorBoard's single-series export
  (``Wall time, Step, Value``: the metric is named after the file).
* JSONL: one object per line with a step key as above; every other numeric field is a metric.

Name mapping (``map_name``): a foreign name is mapped to our metrics.jsonl key by, in order, a user mapping
(``--map foreign=ours``), the Flow-Factory table below (X-GenGroup/Flow-Factory trainers/{nft,awm,dpo,grpo}.py log
``train/{k}`` for each ``loss_info`` key and the reward/advantage statistics in ``compute_advantages``), the
flow_grpo/DiffusionNFT script names, then identity (a name that already is one of ours, with or without its
``train/``/``eval/`` prefix).

=================================  ==========================  ===================================================
foreign name                       ours                        note
=================================  ==========================  ===================================================
train/reward_mean                  train/reward_mean           mean aggregated (weighted) reward of the rollouts
train/reward_std                   train/reward_std
train/reward_<r>_mean              train/reward_<r>            per-term reward (ours: mean of term <r>)
train/loss                         train/loss                  total loss (ours includes lambda * hinge)
train/policy_loss                  train/policy_loss           base-method loss term
train/unweighted_policy_loss       train/base_loss             NFT loss before the adv_clip_max scale
train/kl_div                       train/kl_ref                KL/velocity-MSE to the reference
train/grad_norm                    train/grad_norm
train/clip_frac, train/clipfrac    train/clip_frac             GRPO ratio clipping
train/approx_kl                    train/approx_kl             GRPO
eval/reward_<r>_mean               eval/reward_<r>             held-out eval reward term
eval/reward_mean                   eval/reward
reward_mean, reward, rewards/mean  train/reward_mean           flow_grpo / DiffusionNFT scripts, generic
kl, kl_loss                        train/kl_ref
loss                               train/loss
rho, mean_rho, norm_ratio          train/rollout_mean_rho      NormGuard diagnostic on rollouts
ng_active_frac, hinge_active_frac  train/ng_active_frac
ng_lambda, lambda, normguard_lam…  train/ng_lambda
=================================  ==========================  ===================================================

Unmapped names are listed in the JSON, never dropped silently. Steps are each side's own (PyTorch optimizer steps
vs our RL iterations); ``--x fraction`` plots both against the fraction of training instead.
"""

import csv
import glob
import json
import logging
import os
import re
import struct

import numpy as np

from normguard_jax.analysis import common
from normguard_jax.analysis import workdir as workdir_lib

log = logging.getLogger(__name__)

class ScalarLogError(ValueError):
  """A path holds no readable scalar log, or a corrupt one."""


STEP_KEYS = ("step", "Step", "global_step", "_step", "iteration", "epoch", "Epoch")

FLOW_FACTORY_MAP = {
    "train/reward_mean": "train/reward_mean", "train/reward_std": "train/reward_std",
    "train/loss": "train/loss", "train/policy_loss": "train/policy_loss",
    "train/unweighted_policy_loss": "train/base_loss", "train/kl_div": "train/kl_ref",
    "train/grad_norm": "train/grad_norm", "train/clip_frac": "train/clip_frac", "train/clipfrac": "train/clip_frac",
    "train/approx_kl": "train/approx_kl", "eval/reward_mean": "eval/reward",
    # flow_grpo / DiffusionNFT scripts and generic names
    "reward_mean": "train/reward_mean", "reward": "train/reward_mean", "rewards/mean": "train/reward_mean",
    "reward_std": "train/reward_std", "kl": "train/kl_ref", "kl_loss": "train/kl_ref", "loss": "train/loss",
    "policy_loss": "train/policy_loss", "grad_norm": "train/grad_norm", "clipfrac": "train/clip_frac",
    "approx_kl": "train/approx_kl",
    # NormGuard diagnostics a PyTorch implementation may log
    "rho": "train/rollout_mean_rho", "mean_rho": "train/rollout_mean_rho", "norm_ratio": "train/rollout_mean_rho",
    "train/rho": "train/rollout_mean_rho", "train/norm_ratio": "train/rollout_mean_rho",
    "ng_active_frac": "train/ng_active_frac", "hinge_active_frac": "train/ng_active_frac",
    "ng_lambda": "train/ng_lambda", "lambda": "train/ng_lambda", "normguard_lambda": "train/ng_lambda",
}
FLOW_FACTORY_PATTERNS = [
    (re.compile(r"^train/reward_(?!mean$|std$)(.+)_mean$"), r"train/reward_\1"),
    (re.compile(r"^eval/reward_(?!mean$|std$)(.+)_mean$"), r"eval/reward_\1"),
]


def map_name(name, ours=(), user=None):
  """Foreign metric name -> our metrics.jsonl key, or None (see the table in the module docstring)."""
  user = user or {}
  if name in user:
    return user[name]
  if name in FLOW_FACTORY_MAP:
    return FLOW_FACTORY_MAP[name]
  for pat, repl in FLOW_FACTORY_PATTERNS:
    if pat.match(name):
      return pat.sub(repl, name)
  ours = set(ours)
  if name in ours:
    return name
  for prefix in ("train/", "eval/"):
    if prefix + name in ours:
      return prefix + name
  return None


# ------------------------------------------------------------------ readers

def _masked_crc(data):
  from tensorboardX.crc32c import crc32c
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecords(path, check_crc=True):
  """Payloads of a TFRecord file; stops at a truncated tail (a file still being written)."""
  with open(path, "rb") as f:
    while True:
      head = f.read(12)
      if len(head) < 12:
        return
      (length,), (len_crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
      if check_crc and _masked_crc(head[:8]) != len_crc:
        raise ScalarLogError(f"{path}: corrupt record length (CRC mismatch)")
      data = f.read(length)
      tail = f.read(4)
      if len(data) < length or len(tail) < 4:
        return
      if check_crc and _masked_crc(data) != struct.unpack("<I", tail)[0]:
        raise ScalarLogError(f"{path}: corrupt record payload (CRC mismatch)")
      yield data


def _tensor_scalar(t):
  for field in ("float_val", "double_val", "half_val", "int_val", "int64_val"):
    vals = getattr(t, field, None)
    if vals is not None and len(vals) == 1:
      return float(vals[0])
  if t.tensor_content:
    dt = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}.get(int(t.dtype))
    if dt is not None:
      arr = np.frombuffer(t.tensor_content, dt)
      if arr.size == 1:
        return float(arr[0])
  return None


def read_event_file(path, out=None):
  from tensorboardX.proto import event_pb2
  out = {} if out is None else out
  for rec in iter_tfrecords(path):
    ev = event_pb2.Event()
    ev.ParseFromString(rec)
    if not ev.HasField("summary"):
      continue
    for v in ev.summary.value:
      kind = v.WhichOneof("value")
      val = v.simple_value if kind == "simple_value" else _tensor_scalar(v.tensor) if kind == "tensor" else None
      if val is not None:
        out.setdefault(v.tag, []).append((int(ev.step), float(val)))
  return out


def _num(x):
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return v


def read_csv(path, out=None):
  out = {} if out is None else out
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    return out
  cols = list(rows[0])
  low = {c.lower().strip(): c for c in cols}
  step_col = next((c for c in cols if c.strip() in STEP_KEYS), None)
  if {"wall time", "step", "value"} <= set(low):  # TensorBoard's single-series CSV export
    name = re.sub(r"^run[-_].*?[-_]tag[-_]", "", os.path.splitext(os.path.basename(path))[0])
    for r in rows:
      s, v = _num(r[low["step"]]), _num(r[low["value"]])
      if s is not None and v is not None:
        out.setdefault(name, []).append((int(s), v))
    return out
  name_col = next((low[k] for k in ("tag", "name", "metric", "key") if k in low), None)
  if name_col is not None and "value" in low:  # long format
    for i, r in enumerate(rows):
      s, v = (_num(r[step_col]) if step_col else i), _num(r[low["value"]])
      if v is not None:
        out.setdefault(r[name_col], []).append((int(s if s is not None else i), v))
    return out
  for i, r in enumerate(rows):  # wide format
    s = _num(r[step_col]) if step_col else i
    for c in cols:
      if c == step_col or c.lower().strip() in ("wall time", "_timestamp", "_runtime", "timestamp"):
        continue
      v = _num(r[c])
      if v is not None:
        out.setdefault(c, []).append((int(s if s is not None else i), v))
  return out


def read_jsonl(path, out=None):
  out = {} if out is None else out
  with open(path) as f:
    for i, line in enumerate(f):
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except ValueError:
        continue
      step = next((row[k] for k in STEP_KEYS if k in row), i)
      for k, v in row.items():
        if k in STEP_KEYS or isinstance(v, bool) or not isinstance(v, (int, float)):
          continue
        out.setdefault(k, []).append((int(step), float(v)))
  return out


def _finish(out):
  res = {}
  for k, pts in out.items():
    d = {}
    for s, v in pts:  # last value per step wins (as TensorBoard shows resumed runs)
      d[s] = v
    steps = np.array(sorted(d), np.int64)
    res[k] = (steps, np.array([d[s] for s in steps], np.float64))
  return res


def read_scalars(path):
  """-> {name: (steps int64 (N,), values float64 (N,))} from an event file, CSV, JSONL, or a folder of them."""
  if os.path.isdir(path):
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
  elif os.path.isfile(path):
    files = [path]
  else:
    raise FileNotFoundError(f"no scalar log at {path!r}")
  out, used = {}, 0
  for p in files:
    base = os.path.basename(p)
    if "tfevents" in base:
      read_event_file(p, out)
    elif base.endswith(".csv"):
      read_csv(p, out)
    elif base.endswith(".jsonl"):
      read_jsonl(p, out)
    else:
      continue
    used += 1
  if not used:
    raise ScalarLogError(f"{path!r}: no event files (events.out.tfevents.*), .csv or .jsonl found")
  return _finish(out)


def _summary(steps, values):
  v = np.asarray(values, np.float64)
  tenth = max(1, len(v) // 10)
  return {"n": int(len(v)), "first_step": int(steps[0]), "last_step": int(steps[-1]), "first": float(v[0]),
          "last": float(v[-1]), "mean": float(np.nanmean(v)), "last_10pct_mean": float(np.nanmean(v[-tenth:]))}


RECIPE_FIELDS_IGNORED = ("method", "normguard")  # the runs of one job differ in these by design


def recipe_of(path):
  """The settings record (train.programs.recipe_record) of one of our run folders (recipe.json) or workdirs
  (report.json), or None for a foreign (PyTorch) log folder."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, "recipe.json")):
    with open(os.path.join(path, "recipe.json")) as f:
      return json.load(f)
  if os.path.isfile(os.path.join(path, "report.json")):
    with open(os.path.join(path, "report.json")) as f:
      return json.load(f).get("recipe")
  return None


def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def recipe_differences(a, b):
  """["field: a != b", ...] over the settings that change the numbers (reference, grid, solver, timestep rule,
  advantage mode, LoRA target count, ...)."""
  fa, fb = _flat(a), _flat(b)
  keys = sorted((set(fa) | set(fb)) - set(RECIPE_FIELDS_IGNORED))
  return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def run(workdir, out_dir, torch_paths, *, runs=None, user_map=None, x="step", label=None):
  """Command body: read the PyTorch logs and our runs' metrics.jsonl, map names, write compare.json and
  compare.png (one panel per mapped metric; foreign curves solid black, ours coloured)."""
  names = workdir_lib.run_names(workdir)
  if runs:
    names = [n for n in names if n in runs]
  ours = {n: _finish(read_jsonl(os.path.join(workdir, "runs", n, "metrics.jsonl"))) for n in names}
  our_keys = sorted({k for d in ours.values() for k in d})
  sources = {}
  for p in torch_paths:
    scalars = read_scalars(p)
    mapping = {k: map_name(k, our_keys, user_map) for k in scalars}
    sources[p] = {"label": label or os.path.basename(os.path.normpath(p)), "scalars": scalars,
                  "mapping": {k: v for k, v in mapping.items() if v},
                  "unmapped": sorted(k for k, v in mapping.items() if not v)}
  metrics = {}
  for p, src in sources.items():
    for foreign, mine in src["mapping"].items():
      m = metrics.setdefault(mine, {"torch": {}, "ours": {}})
      m["torch"][f"{src['label']}:{foreign}"] = _summary(*src["scalars"][foreign])
      for n, d in ours.items():
        if mine in d:
          m["ours"][n] = _summary(*d[mine])
  # runs made differently cannot be compared curve for curve: warn on every setting that differs (issue 19)
  mine = {n: recipe_of(os.path.join(workdir, "runs", n)) for n in names}
  differences = {}
  for p in torch_paths:
    theirs = recipe_of(p)
    if theirs is None:
      continue
    for n, rec in mine.items():
      diff = recipe_differences(rec, theirs) if rec is not None else ["(our run has no recipe.json)"]
      if diff:
        differences[f"{n} vs {p}"] = diff
        log.warning("compare: %s and %s were made differently: %s", n, p, "; ".join(diff))
  result = {"workdir": os.path.abspath(workdir), "x": x, "runs": names, "recipe_differences": differences,
            "sources": {p: {k: v for k, v in s.items() if k != "scalars"} for p, s in sources.items()},
            "metrics": metrics, "mapping_table": {**FLOW_FACTORY_MAP, **{p.pattern: r for p, r in
                                                                          FLOW_FACTORY_PATTERNS}}}
  common.write_json(os.path.join(out_dir, "compare.json"), result)
  _plot(sources, ours, metrics, x, os.path.join(out_dir, "compare.png"))
  return result


def _plot(sources, ours, metrics, x, path):
  plt = common.plt()
  keys = sorted(metrics) or ["(no mapped metric)"]
  cols = min(3, len(keys))
  rows = (len(keys) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows), squeeze=False)
  xs = lambda s: s / max(s.max(), 1) if x == "fraction" else s
  for ax, key in zip(axes.reshape(-1), keys):
    for p, src in sources.items():
      for foreign, mine in src["mapping"].items():
        if mine == key:
          s, v = src["scalars"][foreign]
          ax.plot(xs(s), v, color="k", lw=1.4, label=f"torch {src['label']}: {foreign}")
    for n, d in ours.items():
      if key in d:
        s, v = d[key]
        ax.plot(xs(s), v, lw=1, ls="-" if n.endswith("_ng") else "--", label=f"ours {n}")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("fraction of training" if x == "fraction" else "step (each side's own)")
    ax.legend(fontsize=5)
  for ax in axes.reshape(-1)[len(keys):]:
    ax.axis("off")
  fig.suptitle("PyTorch run (black) against ours", fontsize=9)
  fig.tight_layout(); fig.savefig(path, dpi=100); plt.close(fig)
