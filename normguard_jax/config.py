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
from normguard_jax.models import dit, flux, layers, mmdit
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


def load_sibling(config_file, name):
  """Import ``name``.py from the directory of ``config_file``: recipes share a base config this way, wherever
  they are run from."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_ng_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


def reward_options(cfg):
  """{reward name: {option: value}} from ``reward.options`` (absent or empty: no options)."""
  opts = cfg.reward.get("options", None)
  return {} if opts is None else {k: dict(v) if v is not None else {} for k, v in dict(opts).items()}


def _check(cond, field, msg):
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


TASK_LORA_TARGETS = {"digits": dit.LORA_TARGETS, "sd3": mmdit.LORA_TARGETS, "flux": flux.LORA_TARGETS}


def _validate_digits(cfg):
  for name, field in [("pretrain.batch_size", cfg.pretrain.batch_size),
                      ("eval.samples_per_class", cfg.eval.samples_per_class)]:
    _check(isinstance(field, int) and field >= 1, name, f"must be an integer >= 1, got {field!r}")
  _check(cfg.pretrain.steps >= 0, "pretrain.steps", "must be >= 0")
  _check("://" not in str(cfg.pretrain.get("cache_dir", "")), "pretrain.cache_dir",
         "must be a path (mount an object-store bucket with gcsfuse at the same path on every host)")
  _check(cfg.pretrain.t_sampler in ("uniform", "logit_normal"), "pretrain.t_sampler",
         "expected 'uniform' or 'logit_normal'")
  _check(0 <= cfg.pretrain.cfg_dropout < 1, "pretrain.cfg_dropout", "must be in [0, 1)")


def _validate_text(cfg):
  """SD3 and FLUX (normguard_jax/tasks/text_to_image.py): local paths and model fields."""
  m, d = cfg.model, cfg.data
  _check(bool(m.weights_dir), "model.weights_dir",
         "is not set: pass --config.model.weights_dir=/path/to/a/local/diffusers/SD3.5/snapshot")
  _check(os.path.isdir(os.path.expanduser(m.weights_dir)), "model.weights_dir",
         f"{m.weights_dir!r} is not a directory")
  _check(bool(d.embeddings_dir), "data.embeddings_dir",
         "is not set: encode prompts with `python -m normguard_jax.data.encode_prompts` and pass the output dir")
  _check(os.path.isdir(os.path.expanduser(d.embeddings_dir)), "data.embeddings_dir",
         f"{d.embeddings_dir!r} is not a directory")
  _check(isinstance(m.resolution, int) and m.resolution > 0, "model.resolution", "must be a positive integer")
  _check(isinstance(cfg.eval.num_prompts, int) and cfg.eval.num_prompts >= 1, "eval.num_prompts",
         "must be an integer >= 1")
  _check(m.get("remat_policy", "full") in layers.REMAT_POLICIES, "model.remat_policy",
         f"expected one of {sorted(layers.REMAT_POLICIES)}")
  _check(isinstance(m.decode_batch, int) and m.decode_batch >= 0, "model.decode_batch",
         "must be an integer >= 0 (0 = decode all rows at once)")
  _check(cfg.rollout.cfg_scale >= 1.0, "rollout.cfg_scale", "must be >= 1 (1 = no CFG)")
  for field in ("dtype", "param_dtype"):
    _check(m[field] in ("float32", "bfloat16", "float16"), f"model.{field}",
           "expected 'float32', 'bfloat16' or 'float16'")


def validate(cfg):
  """Raise ConfigError on the first invalid value. Returns cfg."""
  task = cfg.get("task", "digits")
  _check(task in TASK_LORA_TARGETS, "task", f"unknown task {task!r}; expected one of {sorted(TASK_LORA_TARGETS)}")
  for m in csv(cfg.rl.methods):
    _check(m in BASE_LOSSES, "rl.methods", f"unknown method {m!r}; expected some of {sorted(BASE_LOSSES)}")
  _check(csv(cfg.rl.methods), "rl.methods", "names no method")
  for s in csv(cfg.rl.normguard):
    _check(s in ("off", "on"), "rl.normguard", f"{s!r} is not 'off' or 'on'")
  _check(csv(cfg.rl.normguard), "rl.normguard", "names no setting")
  for name, field in [("rl.iterations", cfg.rl.iterations), ("rollout.num_steps", cfg.rollout.num_steps),
                      ("rollout.prompts_per_iter", cfg.rollout.prompts_per_iter),
                      ("rl.num_train_timesteps", cfg.rl.num_train_timesteps),
                      ("rl.num_microbatches", cfg.rl.get("num_microbatches", 1)),
                      ("eval.every", cfg.eval.every)]:
    _check(isinstance(field, int) and field >= 1, name, f"must be an integer >= 1, got {field!r}")
  _check(cfg.rollout.group_size >= 2, "rollout.group_size", "must be >= 2 (advantages are per group)")
  _check(cfg.rl.lr > 0, "rl.lr", "must be > 0")
  _check(cfg.rl.lora_rank >= 0, "rl.lora_rank", "must be >= 0 (0 = full fine-tuning)")
  _check(cfg.rl.fusion in fused.STRATEGIES, "rl.fusion", f"expected one of {fused.STRATEGIES}")
  _check(not (cfg.rl.fusion == "concat" and cfg.rl.lora_rank == 0), "rl.fusion",
         "'concat' shares base weights across rows and needs LoRA (rl.lora_rank > 0)")
  for t in csv(cfg.rl.lora_targets):
    _check(t in TASK_LORA_TARGETS[task], "rl.lora_targets",
           f"unknown target {t!r}; expected some of {TASK_LORA_TARGETS[task]}")
  _check(cfg.rollout.shift > 0, "rollout.shift", "must be > 0")
  _check(cfg.rollout.noise_level >= 0, "rollout.noise_level", "must be >= 0")
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
  for name in reward_options(cfg):
    _check(name in cfg.reward.terms, "reward.options", f"options for {name!r}, which is not in reward.terms")
  usable = max(int(cfg.rollout.num_steps * cfg.rl.timestep_fraction), 1)
  _check(cfg.rl.num_train_timesteps <= usable, "rl.num_train_timesteps",
         f"{cfg.rl.num_train_timesteps} exceeds the {usable} usable sampler steps "
         f"(rollout.num_steps * rl.timestep_fraction)")
  (_validate_digits if task == "digits" else _validate_text)(cfg)
  return cfg
