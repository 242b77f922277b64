"""Config loading, overrides and validation (ml_collections, big_vision style).

Configs are Python files exposing ``get_config(arg)``; ``path.py:arg`` selects a variant. Overrides
are ``--config.a.b=value`` on the command line. Unknown keys and invalid values fail here, with a
message naming the field, before any compute.
"""

import ast
import importlib.util
import os

import ml_collections

from normguard_jax.rl import awm, normguard as ng
from normguard_jax.models import attention as attention_lib
from normguard_jax.models import dit
from normguard_jax.rewards.api import REGISTRY as REWARDS
from normguard_jax.rl.losses import BASE_LOSSES
from normguard_jax.train import fused


class ConfigError(ValueError):
  """A config that cannot run: named field, what is wrong, what is allowed."""


def load(path_and_arg):
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_ng_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg)")
  cfg = module.get_config(arg or None)
  cfg.lock()
  return cfg


def _parse_value(text, current):
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
    value = value.lower() == "true"
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return value


def apply_overrides(cfg, overrides):
  """``overrides``: list of 'a.b=value' strings. Unknown keys and type changes raise ConfigError."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r} in override {item!r}")
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    value = _parse_value(text, current)
    if isinstance(current, ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} is a group; override its fields, or pass a dict")
      value = ml_collections.ConfigDict(value)
      with node.unlocked():
        node[parts[-1]] = value
      continue
    if current is not None and type(value) is not type(current):
      raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")
    node[parts[-1]] = value
  return cfg


def csv(text):
  return [s.strip() for s in str(text).split(",") if s.strip()]


def _check(cond, field, msg):
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


def validate(cfg):
  """Raise ConfigError on the first invalid value. Returns cfg."""
  for m in csv(cfg.rl.methods):
    _check(m in BASE_LOSSES, "rl.methods", f"unknown method {m!r}; expected some of {sorted(BASE_LOSSES)}")
  _check(csv(cfg.rl.methods), "rl.methods", "names no method")
  for s in csv(cfg.rl.normguard):
    _check(s in ("off", "on"), "rl.normguard", f"{s!r} is not 'off' or 'on'")
  _check(csv(cfg.rl.normguard), "rl.normguard", "names no setting")
  for name, field in [("rl.iterations", cfg.rl.iterations), ("rollout.num_steps", cfg.rollout.num_steps),
                      ("rollout.prompts_per_iter", cfg.rollout.prompts_per_iter),
                      ("pretrain.batch_size", cfg.pretrain.batch_size),
                      ("rl.num_train_timesteps", cfg.rl.num_train_timesteps),
                      ("eval.every", cfg.eval.every), ("eval.samples_per_class", cfg.eval.samples_per_class)]:
    _check(isinstance(field, int) and field >= 1, name, f"must be an integer >= 1, got {field!r}")
  _check(cfg.pretrain.steps >= 0, "pretrain.steps", "must be >= 0")
  _check(cfg.rollout.group_size >= 2, "rollout.group_size", "must be >= 2 (advantages are per group)")
  _check(cfg.rl.lr > 0, "rl.lr", "must be > 0")
  _check(cfg.rl.lora_rank >= 0, "rl.lora_rank", "must be >= 0 (0 = full fine-tuning)")
  _check(cfg.rl.fusion in fused.STRATEGIES, "rl.fusion", f"expected one of {fused.STRATEGIES}")
  _check(not (cfg.rl.fusion == "concat" and cfg.rl.lora_rank == 0), "rl.fusion",
         "'concat' shares base weights across rows and needs LoRA (rl.lora_rank > 0)")
  for t in csv(cfg.rl.lora_targets):
    _check(t in dit.LORA_TARGETS, "rl.lora_targets", f"unknown target {t!r}; expected some of {dit.LORA_TARGETS}")
  _check(cfg.rollout.shift > 0, "rollout.shift", "must be > 0")
  _check(cfg.rollout.noise_level >= 0, "rollout.noise_level", "must be >= 0")
  _check(cfg.pretrain.t_sampler in ("uniform", "logit_normal"), "pretrain.t_sampler",
         "expected 'uniform' or 'logit_normal'")
  _check(0 <= cfg.pretrain.cfg_dropout < 1, "pretrain.cfg_dropout", "must be in [0, 1)")
  _check(cfg.model.attention_impl in attention_lib.IMPLEMENTATIONS, "model.attention_impl",
         f"expected one of {attention_lib.IMPLEMENTATIONS}")
  _check(cfg.nft.beta > 0, "nft.beta", "must be > 0")
  _check(cfg.nft.adv_clip_max > 0, "nft.adv_clip_max", "must be > 0")
  _check(cfg.awm.weighting in awm.WEIGHTINGS, "awm.weighting", f"expected one of {awm.WEIGHTINGS}")
  _check(cfg.dpo.beta > 0, "dpo.beta", "must be > 0")
  _check(cfg.grpo.noise_level > 0, "grpo.noise_level", "must be > 0: GRPO needs SDE rollouts")
  _check(cfg.normguard.mode in ng.MODES, "normguard.mode", f"expected one of {ng.MODES}")
  _check(cfg.normguard.hinge in ng.HINGES, "normguard.hinge", f"expected one of {ng.HINGES}")
  _check(cfg.normguard.margin >= 0, "normguard.margin", "must be >= 0")
  _check(cfg.normguard.lam.kind in ng.LAMBDA_KINDS, "normguard.lam.kind", f"expected one of {ng.LAMBDA_KINDS}")
  _check(cfg.normguard.lam.value >= 0, "normguard.lam.value", "must be >= 0")
  for name in cfg.reward.terms:
    _check(name in REWARDS, "reward.terms", f"unknown reward {name!r}; known: {sorted(REWARDS)}")
  usable = max(int(cfg.rollout.num_steps * cfg.rl.timestep_fraction), 1)
  _check(cfg.rl.num_train_timesteps <= usable, "rl.num_train_timesteps",
         f"{cfg.rl.num_train_timesteps} exceeds the {usable} usable sampler steps "
         f"(rollout.num_steps * rl.timestep_fraction)")
  return cfg
