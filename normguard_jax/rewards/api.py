"""One reward API: a batch of images (with its conditioning and, where the data has them, prompt strings) in,
one score per image out. Rewards combine with weights and every term is returned for separate logging.

A reward is built once from its options: ``builder(options: dict) -> reward``, and ``reward(batch) -> (B,)``.
JAX rewards are jittable in ``batch.images``/``batch.cond``; host rewards (a remote server) may not be, and
must raise rather than return a made-up score. Builders of heavy rewards are named as ``"module:function"``
and imported only when used, so validating a config never loads a model.
"""

import dataclasses
import importlib
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp

from normguard_jax.rewards import toy


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardBatch:
  """``images``: (B, H, W, C) in [-1, 1]; ``cond``: the model's conditioning pytree (class labels, text
  embeddings); ``prompts``: B prompt strings or None (static: not traced)."""
  images: jax.Array
  cond: Any = None
  prompts: Optional[Sequence[str]] = dataclasses.field(default=None, metadata=dict(static=True))


Reward = Callable[[RewardBatch], jax.Array]


class RewardOptionsError(ValueError):
  """A reward could not be built from its options (missing or wrong model files, a missing url, ...)."""


def _toy(fn):
  def build(options):
    if options:
      raise ValueError(f"reward {fn.__name__!r} takes no options, got {sorted(options)}")
    return lambda batch: fn(batch.images, batch.cond)
  return build


# name -> builder(options) -> reward, or "module:function" naming the builder (imported lazily)
REGISTRY: Dict[str, Any] = {name: _toy(fn) for name, fn in toy.TOY_REWARDS.items()}
REGISTRY.update({
    "pickscore": "normguard_jax.rewards.clip_rewards:build_pickscore",  # PickScore (CLIP-H/14) in JAX, /26
    "clip_score": "normguard_jax.rewards.clip_rewards:build_clip_score",
    "aesthetic": "normguard_jax.rewards.clip_rewards:build_aesthetic",  # LAION aesthetic MLP on CLIP embeds
    "remote": "normguard_jax.rewards.remote:build",  # HTTP reward server (HPSv3, GenEval, OCR, VLM judges)
    "digit_classifier": "normguard_jax.rewards.digit_classifier:build",  # learned log p(class), digits part A
})


def register(name, builder):
  """Add a reward: ``builder(options: dict) -> reward`` (or a "module:function" string naming it)."""
  REGISTRY[name] = builder


def get_builder(name):
  if name not in REGISTRY:
    raise ValueError(f"unknown reward {name!r}; known: {sorted(REGISTRY)}")
  builder = REGISTRY[name]
  if isinstance(builder, str):
    module, _, fn = builder.partition(":")
    builder = getattr(importlib.import_module(module), fn)
  return builder


def make_reward(terms, options=None):
  """``terms``: {name: weight}; ``options``: {name: {option: value}}.

  Returns fn(batch: RewardBatch) -> (total (B,) float32, {name: (B,) float32}).
  """
  if not terms:
    raise ValueError("reward.terms is empty: name at least one reward")
  options = dict(options or {})
  unknown = sorted(set(terms) - set(REGISTRY))
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown}; known: {sorted(REGISTRY)}")
  stray = sorted(set(options) - set(terms))
  if stray:
    raise ValueError(f"reward.options names reward(s) {stray} that are not in reward.terms")
  rewards = {}
  for name in terms:
    try:
      rewards[name] = get_builder(name)(dict(options.get(name) or {}))
    except (ValueError, KeyError, OSError) as e:  # bad options or model files: name the reward and its options
      raise RewardOptionsError(f"reward.options.{name}: {e}") from e

  def reward_fn(batch):
    parts = {name: jnp.asarray(r(batch), jnp.float32) for name, r in rewards.items()}
    total = sum(float(w) * parts[name] for name, w in terms.items())
    return jnp.asarray(total, jnp.float32), parts

  return reward_fn
