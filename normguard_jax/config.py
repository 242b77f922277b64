"""Config loading, overrides and validation (ml_collections, big_vision style).

Configs are Python files exposing ``get_config(arg)``; ``path.py:arg`` selects a variant. Overrides
are ``--config.a.b=value`` on the command line. Unknown keys and invalid values fail here, with a
message naming the field, before any compute.
"""

import ast
import importlib.util
import os

import ml_collections

from normguard_jax.flow import samplers, schedules
from normguard_jax.rl import advantages, awm, normguard as ng
from normguard_jax.models import attention as attention_lib
from normguard_jax.models import dit, flux, layers, mmdit
from normguard_jax.rewards.api import REGISTRY as REWARDS
from normguard_jax.rl.losses import BASE_LOSSES
from normguard_jax.train import fused
from normguard_jax.train import state as state_lib


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


# Groups whose keys are names chosen by the user (a reward's name, a reward's option): an override may add a key
# there, e.g. --config.reward.terms.remote=1.0 --config.reward.options.remote.url=http://host:8000/score.
OPEN_GROUPS = ("reward.terms", "reward.options")


def _flat_keys(node, prefix=""):
  out = []
  for k in node.keys():
    v = node[k]
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_flat_keys(v, f"{prefix}{k}."))
  return out


def _unknown_key(cfg, key, item):
  import difflib
  close = difflib.get_close_matches(key, _flat_keys(cfg), n=3, cutoff=0.6)
  hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  return ConfigError(f"unknown config key {key!r} in override {item!r}{hint}")


def apply_overrides(cfg, overrides):
  """``overrides``: list of 'a.b=value' strings. Unknown keys (with a "did you mean") and type changes raise
  ConfigError; keys under OPEN_GROUPS may be added."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not of the form key=value")
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts[:-1]):
      path = ".".join(parts[:i + 1])
      if isinstance(node, ml_collections.ConfigDict) and part not in node and any(
          path.startswith(g + ".") for g in OPEN_GROUPS):
        with node.unlocked():
          node[part] = ml_collections.ConfigDict()  # a new named group, e.g. reward.options.remote
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise _unknown_key(cfg, path, item)
      node = node[part]
    last = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict):
      raise _unknown_key(cfg, key, item)
    if last not in node:
      if not any(key.startswith(g + ".") for g in OPEN_GROUPS):
        raise _unknown_key(cfg, key, item)
      value = _parse_value(text, None)
      with node.unlocked():
        node[last] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
      continue
    current = node[last]
    value = _parse_value(text, current)
    if isinstance(current, ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} is a group; override its fields, or pass a dict")
      value = ml_collections.ConfigDict(value)
      with node.unlocked():
        node[last] = value
      continue
    if current is not None and type(value) is not type(current):
      raise ConfigError(f"config key {key!r} expects {type(current).__name__}, got {text!r}")
    node[last] = value
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
         "must be an integer >= 0: rows per chip per VAE decode call (0 = all rows at once)")
  _check(cfg.rollout.cfg_scale >= 1.0, "rollout.cfg_scale", "must be >= 1 (1 = no CFG)")
  for field in ("dtype", "param_dtype"):
    _check(m[field] in ("float32", "bfloat16", "float16"), f"model.{field}",
           "expected 'float32', 'bfloat16' or 'float16'")


def train_rows(cfg, method):
  """Rows of one train batch (before microbatching): NFT/AWM/GRPO one per rollout row and training timestep; DPO
  one winner and one loser row per group and training timestep."""
  r, t = cfg.rollout, cfg.rl.num_train_timesteps
  return 2 * r.prompts_per_iter * t if method == "dpo" else r.prompts_per_iter * r.group_size * t


def check_task_layout(cfg, task):
  """Checks that need the task's sampling grid: the training-timestep window of the NFT/AWM rule is not empty."""
  rl = cfg.rl
  if not {"nft", "awm"} & set(csv(rl.methods)):
    return
  k = cfg.rollout.num_steps
  try:
    window = schedules.train_index_window(k, task.sampling_grid(k), rl.num_train_timesteps,
                                          rule=rl.get("timestep_rule", "index_fraction"), fraction=rl.timestep_fraction)
  except ValueError as e:
    raise ConfigError(f"config.rl.timestep_rule: {e}") from e
  if not window:
    raise ConfigError(f"config.rl.timestep_rule: the rule draws no sampler step of the {k}-step grid")


def check_batch_layout(cfg, num_devices):
  """Every batch the loop builds (rollout chunks, train batches, microbatches) must split evenly over the mesh's
  batch axes data x fsdp: otherwise the step fails at its first call with a sharding error, or (rollouts) every chip
  computes every row. Checked before any compute; the error names the field and the mesh. Evaluation batches are
  padded instead (exact: the copies are dropped)."""
  from normguard_jax.parallel import mesh as mesh_lib
  m = cfg.mesh
  if int(m.get("num_devices", 0)):
    _check(int(m.num_devices) <= num_devices, "mesh.num_devices",
           f"{m.num_devices} exceeds the {num_devices} devices available")
    num_devices = int(m.num_devices)
  dcn = [int(m.get(f"dcn_{a}", 1)) for a in mesh_lib.AXES]
  slices = dcn[0] * dcn[1] * dcn[2]
  try:
    if num_devices % slices:
      raise ValueError(f"{num_devices} devices do not split into {slices} slices")
    ici = mesh_lib.resolve_axis_sizes([int(m.get(a, 1)) for a in mesh_lib.AXES], num_devices // slices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  sizes = {a: i * d for a, i, d in zip(mesh_lib.AXES, ici, dcn)}
  n = sizes["data"] * sizes["fsdp"]
  where = f"the mesh's batch axes data x fsdp = {sizes['data']} x {sizes['fsdp']} = {n} (mesh {sizes}, " \
          f"{num_devices} devices)"
  r, rl = cfg.rollout, cfg.rl
  rows = r.prompts_per_iter * r.group_size
  chunk = rows if r.chunk <= 0 else min(r.chunk, rows)
  _check(rows % chunk == 0, "rollout.chunk", f"{chunk} does not divide the {rows} rollout rows "
         f"(rollout.prompts_per_iter x rollout.group_size)")
  _check(chunk % n == 0, "rollout.chunk" if chunk < rows else "rollout.prompts_per_iter",
         f"a rollout call of {chunk} rows does not split over {where}; pick a multiple of {n}")
  updates = int(rl.get("updates_per_iter", 1))
  for method in csv(rl.methods):
    total, mb = train_rows(cfg, method), int(rl.get("num_microbatches", 1))
    half = total // 2 if method == "dpo" else total
    _check(half % updates == 0, "rl.updates_per_iter", f"{updates} updates do not divide the {half} {method} train "
           f"rows{' per half (winners, losers)' if method == 'dpo' else ''}")
    half //= updates
    _check(half % mb == 0, "rl.num_microbatches", f"{mb} microbatches do not divide the {half} {method} train rows"
           f"{' per half (winners, losers)' if method == 'dpo' else ''}{' of an update' if updates > 1 else ''}")
    rows_mb = total // (mb * updates)
    field = "rl.num_microbatches" if mb > 1 else "rl.updates_per_iter" if updates > 1 else "rollout.prompts_per_iter"
    _check(rows_mb % n == 0, field, f"a {method} train {'micro' if mb > 1 else ''}batch of {rows_mb} rows does not "
           f"split over {where}")
  return sizes


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
  _check(cfg.dpo.get("ties", "next") in advantages.TIE_RULES, "dpo.ties", f"expected one of {advantages.TIE_RULES}")
  _check(0 <= cfg.dpo.get("t_clamp", 0.0) < 0.5, "dpo.t_clamp", "must be in [0, 0.5)")
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
  rl, r = cfg.rl, cfg.rollout
  rule = rl.get("timestep_rule", "index_fraction")
  _check(rule in schedules.TRAIN_INDEX_RULES, "rl.timestep_rule",
         f"unknown rule {rule!r}; expected one of {schedules.TRAIN_INDEX_RULES}")
  _check(0 < rl.timestep_fraction <= 1, "rl.timestep_fraction", "must be in (0, 1]")
  if rule == "index_fraction":
    usable = max(int(r.num_steps * rl.timestep_fraction), 1)
    _check(rl.num_train_timesteps <= usable, "rl.num_train_timesteps",
           f"{rl.num_train_timesteps} exceeds the {usable} usable sampler steps "
           f"(rollout.num_steps * rl.timestep_fraction)")
  elif rule == "random_subset":
    _check(rl.num_train_timesteps <= r.num_steps, "rl.num_train_timesteps",
           f"{rl.num_train_timesteps} exceeds the {r.num_steps} sampler steps (rl.timestep_rule 'random_subset')")
  share = int(rl.get("timestep_share_rows", 0))
  _check(share >= 0, "rl.timestep_share_rows", "must be >= 0 (0 = one draw per sample)")
  if share:
    _check((r.prompts_per_iter * r.group_size) % share == 0, "rl.timestep_share_rows",
           f"{share} does not divide the {r.prompts_per_iter * r.group_size} rollout rows")
  _check(r.get("grid", "linear") in schedules.GRID_KINDS, "rollout.grid", f"expected one of {schedules.GRID_KINDS}")
  solver = r.get("solver", "euler")
  _check(solver in samplers.SOLVERS, "rollout.solver", f"expected one of {samplers.SOLVERS}")
  _check(solver == "euler" or r.noise_level == 0, "rollout.solver",
         f"{solver!r} is deterministic; rollout.noise_level must be 0 (the SDE runs with 'euler')")
  _check(rl.get("adv_eps_kind", "add") in advantages.EPS_KINDS, "rl.adv_eps_kind",
         f"expected one of {advantages.EPS_KINDS}")
  _check(rl.get("adv_aggregation", "sum") in advantages.AGGREGATIONS, "rl.adv_aggregation",
         f"expected one of {advantages.AGGREGATIONS}")
  _check(rl.get("adv_eps", 1e-4) > 0, "rl.adv_eps", "must be > 0")
  _check(rl.get("ema_kind", "piecewise_linear") in state_lib.EMA_KINDS, "rl.ema_kind",
         f"expected one of {state_lib.EMA_KINDS}")
  _check(rl.get("ema_step", "update") in ("update", "iteration"), "rl.ema_step", "expected 'update' or 'iteration'")
  _check(isinstance(rl.get("updates_per_iter", 1), int) and rl.get("updates_per_iter", 1) >= 1,
         "rl.updates_per_iter", "must be an integer >= 1")
  _check(cfg.awm.get("adv_mode", "div5") in awm.ADV_MODES, "awm.adv_mode", f"expected one of {awm.ADV_MODES}")
  _check(isinstance(cfg.eval.get("chunk", 0), int) and cfg.eval.get("chunk", 0) >= 0, "eval.chunk",
         "must be an integer >= 0 (0 = every eval row in one sampler call)")
  _check(cfg.eval.get("solver", "") in ("",) + samplers.SOLVERS, "eval.solver",
         f"expected '' (the rollouts') or one of {samplers.SOLVERS}")
  _check(cfg.eval.get("policy", "raw") in ("raw", "old", "ema"), "eval.policy", "expected 'raw', 'old' or 'ema'")
  _check(cfg.eval.get("ema_kind", "power") in state_lib.EMA_KINDS, "eval.ema_kind",
         f"expected one of {state_lib.EMA_KINDS}")
  _check(cfg.normguard.lam.get("excess", "hinge") in ng.EXCESS_KINDS, "normguard.lam.excess",
         f"expected one of {ng.EXCESS_KINDS}")
  if rl.get("init_from", ""):
    _check(os.path.isdir(os.path.expanduser(rl.init_from)), "rl.init_from",
           f"{rl.init_from!r} is not a directory (a run folder WORKDIR/runs/NAME)")
  if rl.get("train_cfg", False):
    _check(r.cfg_scale != 1.0, "rl.train_cfg", "CFG in the training forward needs rollout.cfg_scale != 1")
  if "grpo" in csv(cfg.rl.methods):
    k = cfg.rollout.num_steps  # GRPO trains on stored SDE transitions; the last step is deterministic (no log-prob)
    grpo_usable = max(int(k * min(cfg.rl.timestep_fraction, (k - 1) / k)), 1)
    _check(k >= 2 and cfg.rl.num_train_timesteps <= grpo_usable, "rl.num_train_timesteps",
           f"{cfg.rl.num_train_timesteps} exceeds the {grpo_usable} SDE transitions GRPO can train on "
           f"(min(rl.timestep_fraction, (K - 1) / K) of K = rollout.num_steps = {k}; the last step has no log-prob)")
    _check(cfg.rollout.cfg_scale == 1.0 or cfg.rl.get("train_cfg", False), "rollout.cfg_scale",
           "Flow-GRPO with CFG is refused unless the training forward applies the same CFG: the rollout log-probs "
           "include CFG, so the importance ratio would start away from 1; use rollout.cfg_scale=1 or "
           "rl.train_cfg=true")
  (_validate_digits if task == "digits" else _validate_text)(cfg)
  return cfg
