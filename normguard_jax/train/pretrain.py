"""Pretraining of the reference model with conditional flow matching, cached with orbax.

    L = E_{t, x0, eps} || v_theta((1 - t) x0 + t eps, t, c) - (eps - x0) ||^2   (rectified flow / SD3)

with the class label dropped to the null label with probability cfg_dropout (for CFG). The cache key
hashes everything that changes the result, so a second run with the same settings skips pretraining.
"""

import sys
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from normguard_jax.flow import schedules
from normguard_jax.models import dit
from normguard_jax.parallel import distributed

log = logging.getLogger(__name__)


def cache_key(model_cfg, pre_cfg, seed):
  payload = {"model": dataclasses.asdict(model_cfg), "seed": seed,
             "pretrain": {k: v for k, v in pre_cfg.items() if k not in ("cache_dir", "log_every")}}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flow_matching_loss(params, batch, key, *, cfg: dit.DiTConfig, pre_cfg):
  x0, labels = batch
  k_t, k_eps, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  t = schedules.sample_train_t(k_t, (b,), pre_cfg.t_sampler)
  eps = jax.random.normal(k_eps, x0.shape)
  x_t = schedules.forward_noise(x0, eps, t)
  drop = jax.random.bernoulli(k_drop, pre_cfg.cfg_dropout, (b,))
  labels = jnp.where(drop, cfg.num_classes, labels)
  v = dit.velocity({"params": params}, x_t, t, labels, cfg=cfg)
  return jnp.mean(jnp.square(v - (eps - x0)))


def pretrain(model_cfg: dit.DiTConfig, pre_cfg, images, labels, key, writer=None, guard=None):
  """Trains from scratch; returns the params tree. Stops with an error if ``guard`` saw SIGTERM (nothing is
  cached then; the next run pretrains again)."""
  k_init, k_loop = jax.random.split(key)
  params = dit.init(model_cfg, k_init)["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, pre_cfg.lr, max(pre_cfg.warmup_steps, 1),
                                             max(pre_cfg.steps, pre_cfg.warmup_steps + 1), pre_cfg.lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
  opt_state = tx.init(params)
  images, labels = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_loss = jax.random.split(key)
    idx = jax.random.randint(k_idx, (pre_cfg.batch_size,), 0, images.shape[0])
    loss, grads = jax.value_and_grad(flow_matching_loss)(params, (images[idx], labels[idx]), k_loss,
                                                          cfg=model_cfg, pre_cfg=pre_cfg)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  bar = tqdm(range(pre_cfg.steps), desc="pretrain reference", unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 10.0)
  for i in bar:
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_loop, i))
    losses.append(loss)
    if guard is not None and guard.should_stop():  # agreed across hosts
      raise InterruptedError("SIGTERM during pretraining: the reference was not cached; rerun to pretrain again")
    if (i + 1) % pre_cfg.log_every == 0 or i + 1 == pre_cfg.steps:
      recent = float(np.mean(jax.device_get(losses[-pre_cfg.log_every:])))
      bar.set_postfix(loss=f"{recent:.4f}")
      if writer is not None:
        writer.write(i + 1, {"fm_loss": recent}, prefix="pretrain/")
  return params


def load_or_pretrain(model_cfg, pre_cfg, images, labels, seed, writer=None, guard=None):
  """Returns (params, info). Restores the orbax cache when present and readable; else trains and saves.

  Multi-host: every process pretrains the same way (same seed, same data), and the cache is written and read
  as host numpy arrays, which orbax writes from process 0 only."""
  cache_root = os.path.abspath(os.path.expanduser(pre_cfg.cache_dir))
  path = os.path.join(cache_root, cache_key(model_cfg, pre_cfg, seed))
  abstract = jax.eval_shape(lambda: dit.init(model_cfg, jax.random.PRNGKey(0))["params"])
  multi = jax.process_count() > 1
  if multi:
    abstract = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  ckptr = ocp.StandardCheckpointer()
  if distributed.any_process(os.path.isdir(path)):
    params, error = None, None
    try:
      params = ckptr.restore(path, abstract)
    except Exception as e:  # a corrupt or partial cache is rebuilt, never trusted
      error = e
    if not distributed.any_process(error is not None):  # every host restored it: use it
      return params, {"cache": path, "cached": True}
    log.warning("pretrain cache at %s is unreadable (%s); pretraining again", path, error or "on another host")
    if jax.process_index() == 0:
      shutil.rmtree(path, ignore_errors=True)
    distributed.barrier("normguard_pretrain_cache_removed")
  params = pretrain(model_cfg, pre_cfg, images, labels, jax.random.PRNGKey(seed), writer, guard)
  os.makedirs(cache_root, exist_ok=True)
  ckptr.save(path, jax.tree_util.tree_map(np.asarray, params) if multi else params)
  ckptr.wait_until_finished()
  return params, {"cache": path, "cached": False}
