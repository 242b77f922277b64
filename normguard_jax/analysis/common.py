"""Shared pieces of the analysis commands: reward from the workdir's config, scoring a sample set (reward and the
quality proxies of analysis/quality.py), JSON output, and summary statistics of per-step arrays."""

import json
import math
import os

import numpy as np


def reward_fn_for(cfg):
  """The job's reward, built as the trainer builds it: ``make_reward(terms, reward.options)``."""
  from normguard_jax import config as config_lib
  from normguard_jax.rewards.api import make_reward
  return make_reward(dict(cfg.reward.terms), config_lib.reward_options(cfg))


def host(tree):
  """Device values (possibly sharded over several hosts) as numpy arrays on every process."""
  import jax
  from normguard_jax.parallel import distributed
  return jax.tree_util.tree_map(distributed.host_array, tree)


def is_main():
  """Process 0 writes the JSON, plots and samples; every process computes (multi-host --shard)."""
  import jax
  return jax.process_index() == 0


def score(images, cond, prompts, reward_fn, quality):
  """Mean reward (total and each term) and the quality proxies of a decoded sample set (pixels in [-1, 1])."""
  from normguard_jax.rewards.api import RewardBatch
  total, parts = reward_fn(RewardBatch(images, cond, prompts))
  total, parts = host((total, parts))
  out = {"reward": float(np.mean(total)), **{f"reward_{k}": float(np.mean(v)) for k, v in parts.items()}}
  if quality is not None:
    out.update(quality(host(images), host(cond)))
  return out


def per_step(a):
  """(K, B) -> per-step batch means as a list."""
  return np.asarray(host(a), np.float64).mean(axis=1).tolist()


def _clean(obj):
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _clean(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    v = float(obj)
    return v if math.isfinite(v) else None
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  if hasattr(obj, "shape") and hasattr(obj, "dtype"):  # jax arrays
    return _clean(np.asarray(obj))
  return obj


def write_json(path, obj):
  """JSON with numpy/jax values converted; non-finite floats written as null. Process 0 only."""
  if not is_main():
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(_clean(obj), f, indent=2)
  return path


def plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot
  return pyplot
