"""A learned, semantic reward for the digits toy, in the role PickScore plays for text-to-image (issue 16).

    r(x, c) = log softmax(f(clip(x, -1, 1)) / T)[c]                     (range (-inf, 0])

``f`` is a small CNN trained with cross-entropy on 80% of digits part A (data/digits.py; the quality proxies
train on part B, so the reward never sees their data). ``T`` is fitted on the other 20% of part A by minimising
the held-out negative log-likelihood (temperature scaling, Guo et al. 2017): without it a net trained to
convergence is over-confident and the reward sits at 0 for most samples; with it the score is a calibrated log
probability of the prompted class, which saturates towards 0 as a learned preference model saturates, and is
smooth (swish activations, no batch statistics: each sample's score depends on that sample only, as the
adjoint analysis needs).

Pixels are clipped to [-1, 1] first, as PickScore sees them: the pipelines decode, then clamp to [0, 1] and
quantise before the reward model (Flow-Factory/flow_grpo pickscore scorers; rewards/clip_rewards.py
``preprocess``). Values past the data range therefore earn nothing, and their gradient is zero. ``clip=False``
scores raw values (a hackable variant, not the default).

Trained once per setting (400 AdamW steps; about 20 s, mostly compilation, on a busy 2-core machine) and cached
with orbax like the pretrained reference (train/pretrain.py): the cache key hashes the architecture, the training
settings, the seed, the part and the data; a cache that does not restore, or whose restored weights do not
reproduce the held-out score stored with them, is rebuilt, never trusted. Nothing is downloaded.
"""

import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from normguard_jax.data import digits

log = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
DEFAULT_CACHE_DIR = "~/.cache/normguard_jax/reward"
OPTIONS = {"cache_dir": DEFAULT_CACHE_DIR, "seed": 0, "part": "A", "clip": True}
_VERSION = 1  # bump when the code changes what a setting trains


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  conv_features: Tuple[int, ...] = (16, 32)
  hidden: int = 64
  steps: int = 400
  batch_size: int = 128
  lr: float = 2e-3
  weight_decay: float = 1e-4
  holdout_frac: float = 0.2  # of the part, held out for the temperature and the cache check


def _patches3x3(x, stride):
  """(B, H, W, C) -> (B, H/stride, W/stride, 9 C): the 3x3 'SAME' neighbourhoods, as shifted slices. A conv is then
  one matmul; XLA's CPU convolution (and its gradient) is ~20x slower at these sizes."""
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h:stride, j:j + w:stride] for i in range(3) for j in range(3)], axis=-1)


class DigitCNN(nn.Module):
  """conv3x3 -> swish -> conv3x3 stride 2 -> swish -> dense -> swish -> logits; no normalisation layers."""
  conv_features: Tuple[int, ...]
  hidden: int
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.conv_features):
      x = nn.swish(nn.Dense(f, name=f"conv{i}")(_patches3x3(x, 1 if i == 0 else 2)))
    x = x.reshape(x.shape[0], -1)
    x = nn.swish(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def _model(cfg: TrainConfig):
  return DigitCNN(tuple(cfg.conv_features), cfg.hidden)


def logits(params, images, cfg: TrainConfig = TrainConfig()):
  """(B, 8, 8, 1) images as given (no clipping) -> (B, 10) logits."""
  return _model(cfg).apply({"params": params}, jnp.asarray(images, jnp.float32))


def log_probs(params, temperature, images, *, clip=True, cfg: TrainConfig = TrainConfig()):
  """(B, 10) calibrated log p(class | image)."""
  x = jnp.asarray(images, jnp.float32)
  if clip:
    x = jnp.clip(x, -1.0, 1.0)
  return jax.nn.log_softmax(logits(params, x, cfg) / temperature, axis=-1)


def _check_labels(cond):
  """Out-of-range labels (e.g. the null label) are an error where the labels can be read on this host; under jit
  (or for a multi-host global array) they score NaN instead."""
  if isinstance(cond, jax.core.Tracer) or not getattr(cond, "is_fully_addressable", True):
    return
  c = np.asarray(cond)
  bad = (c < 0) | (c >= NUM_CLASSES)
  if bad.any():
    raise ValueError(f"digit_classifier: batch.cond must hold class labels in [0, {NUM_CLASSES}), got "
                     f"{c[bad][:5].tolist()}")


def _score(params, temperature, images, cond, clip, cfg):
  cond = jnp.asarray(cond).astype(jnp.int32)
  lp = log_probs(params, temperature, images, clip=clip, cfg=cfg)
  picked = jnp.take_along_axis(lp, jnp.clip(cond, 0, NUM_CLASSES - 1)[:, None], axis=1)[:, 0]
  return jnp.where((cond >= 0) & (cond < NUM_CLASSES), picked, jnp.nan)


_score_jit = jax.jit(_score, static_argnames=("clip", "cfg"))


def score(params, temperature, images, cond, *, clip=True, cfg: TrainConfig = TrainConfig()):
  """(B,) log p_T(cond | image), jitted (params and T are arguments, not constants)."""
  _check_labels(cond)
  return _score_jit(params, jnp.float32(temperature), images, cond, clip, cfg)


def _holdout_split(labels, frac):
  """Deterministic stratified split of a part: a ``frac`` of each class, drawn by a frozen RandomState, is held
  out (the data is in writer order; a contiguous tail would hold out writers, not samples)."""
  fit, held = [], []
  rng = np.random.RandomState(1)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_held = max(1, int(round(frac * len(idx))))
    fit.append(idx[:-n_held])
    held.append(idx[-n_held:])
  return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def _fit_temperature(logit_arr, labels):
  """argmin_T NLL(softmax(logits / T)) over a log-spaced grid (1-D, deterministic; step 0.5% in T)."""
  ts = np.exp(np.linspace(np.log(0.05), np.log(20.0), 1201))
  z = logit_arr.astype(np.float64)[None] / ts[:, None, None]
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  nll = (lse - np.take_along_axis(z, labels[None, :, None], axis=2)[..., 0]).mean(-1)
  return float(ts[np.argmin(nll)])


@functools.lru_cache(maxsize=4)
def _train_program(cfg: TrainConfig):
  """jit(params, keys (steps, 2), images, labels) -> params: cross-entropy, AdamW, one lax.scan (compiled once per
  setting and process; a rebuilt cache reuses it)."""
  model = _model(cfg)
  tx = optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps), weight_decay=cfg.weight_decay)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  def run(params, keys, images, labels):
    def step(carry, key):
      p, s = carry
      idx = jax.random.randint(key, (cfg.batch_size,), 0, images.shape[0])
      updates, s = tx.update(jax.grad(loss_fn)(p, images[idx], labels[idx]), s, p)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (params, tx.init(params)), keys)[0][0]

  return jax.jit(run)


def train(cfg: TrainConfig, images, labels, seed):
  """Trains from scratch on (images, labels) with minibatches of ``cfg.batch_size``; returns the params."""
  k_init, k_loop = jax.random.split(jax.random.PRNGKey(seed))
  params = _model(cfg).init(k_init, jnp.zeros((1,) + IMAGE_SHAPE))["params"]
  return _train_program(cfg)(params, jax.random.split(k_loop, cfg.steps), jnp.asarray(images, jnp.float32),
                             jnp.asarray(labels, jnp.int32))


def _data_digest(images, labels):
  h = hashlib.sha256()
  h.update(np.ascontiguousarray(images, np.float32).tobytes())
  h.update(np.ascontiguousarray(labels, np.int32).tobytes())
  return h.hexdigest()[:16]


def cache_key(cfg: TrainConfig, seed, part, images, labels):
  payload = {"version": _VERSION, "train": dataclasses.asdict(cfg), "seed": int(seed), "part": part,
             "data": _data_digest(images, labels)}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _holdout_check(params, temperature, images, labels, cfg):
  """Mean held-out log p_T(label | image): stored with the weights, recomputed on restore."""
  return float(jnp.mean(score(params, temperature, images, labels, clip=True, cfg=cfg)))


def load_or_train(cache_dir=DEFAULT_CACHE_DIR, seed=0, part="A", cfg: TrainConfig = TrainConfig()):
  """Returns (params, temperature, info). Restores the orbax cache when present, readable and consistent; else
  trains, calibrates and saves. ``info``: cache path, cached, train_s (when trained), temperature, and the held-out
  accuracy and mean log p_T (``holdout_acc``, ``holdout_logp``).

  Several single-process jobs on one machine (parallel tests, a sweep) may ask at once: they take turns on a lock
  file in the cache root, so one trains and the others restore. Multi-process jobs skip the lock (their save is an
  orbax collective that every process must enter together)."""
  root = os.path.abspath(os.path.expanduser(str(cache_dir)))
  if jax.process_count() > 1:
    return _load_or_train(root, seed, part, cfg)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    return _load_or_train(root, seed, part, cfg)


def _load_or_train(root, seed, part, cfg):
  images, labels = digits.load_digits(part)
  fit, held = _holdout_split(labels, cfg.holdout_frac)
  path = os.path.join(root, f"digit_classifier-{cache_key(cfg, seed, part, images, labels)}")
  abstract = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype),
      {"params": jax.eval_shape(lambda: _model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE)))
       ["params"], "temperature": jax.ShapeDtypeStruct((), np.float32),
       "check": jax.ShapeDtypeStruct((), np.float32)})
  ckptr = ocp.StandardCheckpointer()
  info = {"cache": path, "part": part, "seed": int(seed), "n_fit": int(len(fit)), "n_holdout": int(len(held))}
  if os.path.isdir(path):
    try:
      tree = ckptr.restore(path, abstract)
      params, temperature = tree["params"], float(tree["temperature"])
      check = _holdout_check(params, temperature, images[held], labels[held], cfg)
      if not np.isfinite(check) or abs(check - float(tree["check"])) > 1e-3 * max(1.0, abs(check)):
        raise ValueError(f"held-out score {check:.6f} != stored {float(tree['check']):.6f}")
      return params, temperature, dict(info, cached=True, temperature=temperature, holdout_logp=check,
                                       **_holdout_stats(params, temperature, images[held], labels[held], cfg))
    except Exception as e:  # a corrupt or partial cache is rebuilt, never trusted
      log.warning("digit_classifier cache at %s is unusable (%s); training again", path, e)
      if jax.process_index() == 0:
        shutil.rmtree(path, ignore_errors=True)
  t0 = time.time()
  params = jax.device_get(train(cfg, images[fit], labels[fit], seed))
  temperature = float(np.float32(_fit_temperature(np.asarray(logits(params, images[held], cfg)), labels[held])))
  train_s = time.time() - t0
  check = _holdout_check(params, temperature, images[held], labels[held], cfg)
  os.makedirs(root, exist_ok=True)
  ckptr.save(path, {"params": jax.tree_util.tree_map(np.asarray, params),
                    "temperature": np.float32(temperature), "check": np.float32(check)})
  ckptr.wait_until_finished()
  return params, temperature, dict(info, cached=False, train_s=train_s, temperature=temperature, holdout_logp=check,
                                   **_holdout_stats(params, temperature, images[held], labels[held], cfg))


def _holdout_stats(params, temperature, images, labels, cfg):
  lp = np.asarray(log_probs(params, temperature, images, cfg=cfg))
  return {"holdout_acc": float((lp.argmax(1) == labels).mean())}


@functools.lru_cache(maxsize=8)
def trained(cache_dir=DEFAULT_CACHE_DIR, seed=0, part="A"):
  """(params, temperature, info), once per process per setting (the cache makes later processes fast)."""
  params, temperature, info = load_or_train(cache_dir, seed, part)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  log.info("digit_classifier: %s", info)
  return params, temperature, info


def build(options):
  """Reward builder (rewards/api.py REGISTRY ``"digit_classifier"``). Options: ``cache_dir``
  (default ~/.cache/normguard_jax/reward), ``seed`` (0), ``part`` ("A"; "B" trains on the proxies' data, a
  control only), ``clip`` (True: score clipped pixels)."""
  unknown = sorted(set(options) - set(OPTIONS))
  if unknown:
    raise ValueError(f"reward 'digit_classifier': unknown option(s) {unknown}; known: {sorted(OPTIONS)}")
  opts = dict(OPTIONS, **options)
  if opts["part"] not in digits.PARTS:
    raise ValueError(f"reward 'digit_classifier': option 'part' must be one of {digits.PARTS}, got {opts['part']!r}")
  if not isinstance(opts["seed"], int) or isinstance(opts["seed"], bool):
    raise ValueError(f"reward 'digit_classifier': option 'seed' must be an integer, got {opts['seed']!r}")
  if not isinstance(opts["clip"], bool):
    raise ValueError(f"reward 'digit_classifier': option 'clip' must be true or false, got {opts['clip']!r}")
  if "://" in str(opts["cache_dir"]):
    raise ValueError("reward 'digit_classifier': option 'cache_dir' must be a local path")
  root = os.path.abspath(os.path.expanduser(str(opts["cache_dir"])))
  params, temperature, _ = trained(root, opts["seed"], opts["part"])
  clip = opts["clip"]

  def reward(batch):
    images = batch.images
    if tuple(images.shape[1:]) != IMAGE_SHAPE:
      raise ValueError(f"reward 'digit_classifier' scores (B, 8, 8, 1) digits, got images of shape {images.shape}")
    if batch.cond is None:
      raise ValueError("reward 'digit_classifier' needs the class labels in batch.cond")
    return score(params, temperature, images, batch.cond, clip=clip)  # jitted; traceable under an outer jit

  return reward
