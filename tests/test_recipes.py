"""The recipes reproduce their references (docs/recipes.md): every recipe and variant loads and validates, and the
settings the config determines equal the reference's, as read from its code (X-GenGroup/Flow-Factory@a0b2bc5,
NVlabs/DiffusionNFT@24af555, scxue/advantage_weighted_matching@be51372). A later edit that breaks fidelity fails
here. No model runs: configs, grids and timestep windows only."""

import os

import numpy as np
import pytest

from normguard_jax import config as config_lib
from normguard_jax.flow import schedules
from normguard_jax.models import flux, mmdit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe -> its variants besides the default
RECIPES = {
    "sd35_medium_nft": ("official", "smoke", "official,smoke"),
    "sd35_medium_awm": ("official", "smoke", "official,smoke"),
    "sd35_medium_dpo": ("smoke",),
    "flux1_dev_nft": ("smoke",), "flux1_dev_awm": ("smoke",), "flux1_dev_dpo": ("smoke",),
    "flux2_klein_nft": ("smoke",), "flux2_klein_awm": ("smoke",), "flux2_klein_dpo": ("smoke",),
}
ALL = [(r, "") for r in RECIPES] + [(r, v) for r, vs in RECIPES.items() for v in vs]

_FF_NFT = {"rl.timestep_rule": "value_range", "rl.global_std": False, "rl.adv_eps": 1e-6, "rl.adv_eps_kind": "floor",
           "rl.ema_kind": "piecewise_linear", "rl.old_ramp": 0.001, "rl.old_max_decay": 0.5, "rl.ema_step": "iteration",
           "rl.updates_per_iter": 1, "nft.adv_clip_max": 5.0, "nft.kl_beta": 0.0, "eval.policy": "old",
           "rollout.grid": "linear", "rollout.solver": "euler", "rollout.noise_level": 0.0}
_FF_AWM = {"rl.adv_eps": 1e-6, "rl.adv_eps_kind": "floor", "rl.adv_aggregation": "sum", "rl.ema_step": "iteration",
           "awm.adv_mode": "clamp", "awm.adv_clip": 1.0, "awm.weighting": "ghuber", "awm.ghuber_p": 0.25,
           "awm.clip_range": 1.0, "eval.policy": "old", "rollout.grid": "linear", "rollout.solver": "euler",
           "rollout.noise_level": 0.0}
_FF_DPO = {"rl.num_train_timesteps": 1, "rl.lr": 1e-5, "rollout.group_size": 4, "rollout.prompts_per_iter": 48,
           "dpo.beta": 100.0, "dpo.t_mean": 0.0, "dpo.t_std": 1.0, "dpo.t_clamp": 0.01, "dpo.t_share_pairs": 6,
           "dpo.ties": "same", "eval.policy": "ema", "eval.ema_kind": "power", "eval.ema_max": 0.99,
           "eval.ema_warmup": 10, "eval.ema_every": 4, "rollout.solver": "euler", "rollout.noise_level": 0.0}
_SD35 = {"model.resolution": 512, "rollout.shift": 3.0, "rl.lora_rank": 32, "rl.lora_alpha": 64.0,
         "rollout.cfg_scale": 1.0, "rl.train_cfg": False, "eval.resolution": 0}

# The audit's rows (recipe_fidelity.md Tables 1-6) that the config determines, per recipe and variant.
EXPECTED = {
    ("sd35_medium_nft", ""): {  # FF examples/nft/lora/sd3_5/default.yaml
        **_SD35, **_FF_NFT, "rollout.num_steps": 14, "rollout.prompts_per_iter": 48, "rollout.group_size": 16,
        "rl.num_train_timesteps": 4, "rl.timestep_fraction": 0.5, "rl.timestep_share_rows": 8,
        "rl.adv_aggregation": "sum", "rl.lr": 1e-4, "nft.beta": 1.0, "eval.num_steps": 40, "eval.every": 20,
        "data.max_sequence_length": 256},
    ("sd35_medium_nft", "official"): {  # DiffusionNFT config/nft.py sd3_pickscore
        **_SD35, "rollout.num_steps": 10, "rollout.grid": "diffusers", "rollout.solver": "dpm2",
        "rollout.noise_level": 0.0, "rollout.prompts_per_iter": 48, "rollout.group_size": 24,
        "rl.timestep_rule": "random_subset", "rl.num_train_timesteps": 9, "rl.timestep_share_rows": 0,
        "rl.global_std": True, "rl.adv_eps": 1e-4, "rl.adv_eps_kind": "add", "rl.adv_aggregation": "sum",
        "rl.ema_kind": "piecewise_linear", "rl.old_ramp": 0.001, "rl.old_max_decay": 0.5, "rl.ema_step": "update",
        "rl.updates_per_iter": 1, "rl.lr": 3e-4, "nft.beta": 1.0, "nft.kl_beta": 1e-4, "nft.adv_clip_max": 5.0,
        "eval.num_steps": 40, "eval.every": 10, "eval.policy": "ema", "eval.ema_kind": "power", "eval.ema_max": 0.9,
        "eval.ema_warmup": 10, "eval.ema_every": 1, "data.max_sequence_length": 128},
    ("sd35_medium_awm", ""): {  # FF examples/awm/lora/sd3_5/default.yaml
        **_SD35, **_FF_AWM, "rollout.num_steps": 14, "rollout.prompts_per_iter": 48, "rollout.group_size": 16,
        "rl.timestep_rule": "value_range_wo_init", "rl.timestep_fraction": 0.9, "rl.num_train_timesteps": 6,
        "rl.timestep_share_rows": 8, "rl.global_std": True, "rl.ema_kind": "linear_warmup", "rl.old_max_decay": 0.3,
        "rl.ema_warmup": 1000, "rl.updates_per_iter": 1, "rl.lr": 3e-4, "awm.kl_beta": 1e-4, "awm.ema_kl_beta": 1.0,
        "eval.num_steps": 40, "eval.every": 20, "data.max_sequence_length": 256},
    ("sd35_medium_awm", "official"): {  # AWM config/dgx_awm.py pickscore_sd3_no_cfg_1node
        **_SD35, "rollout.num_steps": 14, "rollout.grid": "diffusers", "rollout.solver": "euler",
        "rollout.prompts_per_iter": 24, "rollout.group_size": 24, "rl.timestep_rule": "index_range",
        "rl.timestep_fraction": 0.9, "rl.num_train_timesteps": 6, "rl.timestep_share_rows": 2, "rl.global_std": True,
        "rl.adv_eps": 1e-4, "rl.adv_eps_kind": "add", "rl.adv_aggregation": "sum", "rl.ema_kind": "piecewise_linear",
        "rl.old_ramp": 0.001, "rl.old_max_decay": 0.3, "rl.ema_step": "update", "rl.updates_per_iter": 1,
        "rl.lr": 3e-4, "awm.adv_mode": "div5", "awm.adv_clip": 5.0, "awm.adv_max": 1.0, "awm.kl_beta": 1e-4,
        "awm.ema_kl_beta": 1.0, "awm.weighting": "ghuber", "awm.ghuber_p": 0.25, "awm.clip_range": 1.0,
        "eval.num_steps": 40, "eval.every": 50, "eval.policy": "ema", "eval.ema_kind": "power", "eval.ema_max": 0.99,
        "eval.ema_warmup": 10, "eval.ema_every": 1, "data.max_sequence_length": 128},
    ("sd35_medium_dpo", ""): {  # FF examples/dpo/lora/sd3_5/default.yaml
        **_SD35, **_FF_DPO, "rollout.num_steps": 40, "rollout.grid": "linear", "rl.updates_per_iter": 1,
        "eval.num_steps": 40, "eval.every": 60, "data.max_sequence_length": 256},
    ("flux1_dev_nft", ""): {  # FF examples/nft/lora/flux1/default.yaml
        **_FF_NFT, "model.resolution": 384, "model.guidance": 3.5, "rollout.cfg_scale": 1.0, "rl.train_cfg": False,
        "rollout.num_steps": 8, "rollout.prompts_per_iter": 48, "rollout.group_size": 16, "rl.num_train_timesteps": 2,
        "rl.timestep_fraction": 0.7, "rl.timestep_share_rows": 1, "rl.adv_aggregation": "sum", "rl.lr": 3e-4,
        "nft.beta": 1.0, "eval.resolution": 1024, "eval.num_steps": 28, "eval.every": 20,
        "data.max_sequence_length": 512},
    ("flux1_dev_awm", ""): {  # FF examples/awm/lora/flux1/default.yaml
        **_FF_AWM, "model.resolution": 512, "model.guidance": 3.5, "rollout.cfg_scale": 1.0, "rl.train_cfg": False,
        "rollout.num_steps": 10, "rollout.prompts_per_iter": 48, "rollout.group_size": 16,
        "rl.timestep_rule": "value_range", "rl.timestep_fraction": 0.7, "rl.num_train_timesteps": 4,
        "rl.timestep_share_rows": 2, "rl.global_std": True, "rl.ema_kind": "linear_warmup", "rl.old_max_decay": 0.3,
        "rl.ema_warmup": 300, "rl.updates_per_iter": 1, "rl.lr": 3e-4, "awm.kl_beta": 0.0, "awm.ema_kl_beta": 0.1,
        "eval.resolution": 1024, "eval.num_steps": 20, "eval.every": 20, "data.max_sequence_length": 512},
    ("flux2_klein_nft", ""): {  # FF examples/nft/lora/flux2_klein_base/default.yaml
        **_FF_NFT, "model.resolution": 384, "rollout.cfg_scale": 4.0, "rl.train_cfg": True, "rollout.num_steps": 8,
        "rollout.prompts_per_iter": 48, "rollout.group_size": 16, "rl.num_train_timesteps": 2,
        "rl.timestep_fraction": 0.5, "rl.timestep_share_rows": 1, "rl.adv_aggregation": "gdpo", "rl.lr": 1e-4,
        "nft.beta": 0.1, "eval.resolution": 1024, "eval.num_steps": 28, "eval.cfg_scale": 4.0, "eval.every": 20,
        "data.max_sequence_length": 512},
    ("flux2_klein_awm", ""): {  # FF examples/awm/lora/flux2_klein_base/default.yaml
        **_FF_AWM, "model.resolution": 384, "rollout.cfg_scale": 4.0, "rl.train_cfg": True, "rollout.num_steps": 8,
        "rollout.prompts_per_iter": 48, "rollout.group_size": 16, "rl.timestep_rule": "value_range_wo_init",
        "rl.timestep_fraction": 0.7, "rl.num_train_timesteps": 4, "rl.timestep_share_rows": 1,
        "rl.global_std": False, "rl.ema_kind": "power", "rl.old_max_decay": 0.9, "rl.ema_warmup": 10,
        "rl.updates_per_iter": 2, "rl.lr": 3e-4, "awm.kl_beta": 0.0, "awm.ema_kl_beta": 0.1, "eval.resolution": 1024,
        "eval.num_steps": 28, "eval.cfg_scale": 4.0, "eval.every": 20, "data.max_sequence_length": 512},
    # no reference: FF's SD3.5 DPO values on the family's FF NFT sampling and evaluation
    ("flux1_dev_dpo", ""): {
        **_FF_DPO, "model.resolution": 384, "model.guidance": 3.5, "rollout.cfg_scale": 1.0, "rl.train_cfg": False,
        "rollout.num_steps": 8, "eval.resolution": 1024, "eval.num_steps": 28, "eval.every": 20,
        "data.max_sequence_length": 512},
    ("flux2_klein_dpo", ""): {
        **_FF_DPO, "model.resolution": 384, "rollout.cfg_scale": 4.0, "rl.train_cfg": True, "rollout.num_steps": 8,
        "eval.resolution": 1024, "eval.num_steps": 28, "eval.cfg_scale": 4.0, "eval.every": 20,
        "data.max_sequence_length": 512},
}

# Training-timestep windows (t of the first and last grid index the rule can draw), recipe_fidelity.md item 1 and
# Tables 1-5: FF `TimeSampler.discrete`, official AWM `discrete`, official NFT's random subset of the 10 steps.
WINDOWS = {
    ("sd35_medium_nft", ""): (0.625, 1.0), ("sd35_medium_nft", "official"): (0.009, 1.0),
    ("sd35_medium_awm", ""): (0.333, 0.975), ("sd35_medium_awm", "official"): (0.357, 1.0),
    ("flux1_dev_nft", ""): (0.511, 1.0), ("flux1_dev_awm", ""): (0.446, 1.0),
    ("flux2_klein_nft", ""): (0.704, 1.0), ("flux2_klein_awm", ""): (0.704, 0.980),
}

# What ``smoke`` must keep: the recipe's mechanisms, so the dry run runs its code paths.
MECHANISMS = ("rollout.grid", "rollout.solver", "rollout.num_steps", "rollout.cfg_scale", "rollout.noise_level",
              "rl.methods", "rl.normguard", "rl.timestep_rule", "rl.timestep_fraction", "rl.num_train_timesteps",
              "rl.global_std", "rl.adv_eps", "rl.adv_eps_kind", "rl.adv_aggregation", "rl.ema_kind",
              "rl.old_max_decay", "rl.ema_step", "rl.ema_warmup", "rl.updates_per_iter", "rl.train_cfg",
              "rl.lora_targets", "awm.adv_mode", "awm.adv_clip", "nft.beta", "nft.kl_beta", "dpo.ties", "dpo.t_clamp",
              "eval.policy", "eval.num_steps", "eval.ema_kind", "eval.ema_max")


def _path(recipe, variant=""):
  return os.path.join(ROOT, "configs", f"{recipe}.py") + (f":{variant}" if variant else "")


def _get(cfg, key):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def _with_paths(cfg, tmp_path):
  """The user's required paths, pointed at existing directories (validate only checks that they are dirs)."""
  return config_lib.apply_overrides(cfg, [f"model.weights_dir={tmp_path}", f"data.embeddings_dir={tmp_path}",
                                          f"reward.options.pickscore.model_dir={tmp_path}"])


def _grid(cfg, recipe, latent_factor=8):
  """The recipe's sampling grid as its task builds it: SD3 ``rollout.grid`` with the static shift; FLUX the linear
  grid with FLUX.1 ``calculate_shift`` / FLUX.2-klein ``compute_empirical_mu`` of (res / (factor x 2))^2 tokens."""
  r, k = cfg.rollout, cfg.rollout.num_steps
  if cfg.task == "sd3":
    return np.asarray(schedules.sampling_grid(k, r.shift, kind=r.grid))
  seq = (int(cfg.model.resolution) // (latent_factor * 2)) ** 2
  mu = schedules.flux2_empirical_mu(seq, k) if recipe.startswith("flux2") else schedules.flux_mu(seq)
  return np.asarray(schedules.sampling_grid(k, mu=mu))


@pytest.mark.parametrize("recipe,variant", ALL)
def test_every_recipe_and_variant_validates_and_fits_its_mesh(recipe, variant, tmp_path):
  cfg = config_lib.load(_path(recipe, variant))
  with pytest.raises(config_lib.ConfigError, match="model.weights_dir"):
    config_lib.validate(cfg)
  cfg = _with_paths(cfg, tmp_path)
  config_lib.validate(cfg)
  assert cfg.rl.normguard == "on" and cfg.model.attention_impl == "auto"  # splash on TPU, cuDNN on GPU
  # every batch of the full recipes splits over 8 and 32 devices; the smoke runs on one device
  if "smoke" in variant:
    assert cfg.mesh.num_devices == 1 and config_lib.check_batch_layout(cfg, 8)["fsdp"] == 1
  else:
    for n in (8, 32):
      assert config_lib.check_batch_layout(cfg, n)["fsdp"] == n


@pytest.mark.parametrize("recipe,variant", sorted(EXPECTED))
def test_recipe_matches_its_reference(recipe, variant):
  cfg = config_lib.load(_path(recipe, variant))
  wrong = {k: (_get(cfg, k), v) for k, v in EXPECTED[(recipe, variant)].items() if _get(cfg, k) != v}
  assert not wrong, f"{recipe}:{variant} departs from its reference in (ours, reference): {wrong}"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_lora_targets_are_the_reference_preset(recipe):
  cfg = config_lib.load(_path(recipe))
  if cfg.task == "sd3":
    preset, rank = mmdit.LORA_PRESETS["reference"], 32
    assert "attn2" not in cfg.rl.lora_targets
  else:
    family = "flux2" if recipe.startswith("flux2") else "flux"
    preset, rank = flux.LORA_PRESETS[family]["reference"], 64
    assert "ff.linear_in" in preset if family == "flux2" else "ff.net.2" in preset  # the FFNs are adapted
  assert tuple(config_lib.csv(cfg.rl.lora_targets)) == tuple(preset)
  assert (cfg.rl.lora_rank, cfg.rl.lora_alpha) == (rank, 2.0 * rank)


@pytest.mark.parametrize("recipe,variant", sorted(WINDOWS))
def test_training_timestep_window_is_the_references(recipe, variant):
  cfg = config_lib.load(_path(recipe, variant))
  rl, k = cfg.rl, cfg.rollout.num_steps
  grid = _grid(cfg, recipe)
  window = schedules.train_index_window(k, grid, rl.num_train_timesteps, rule=rl.timestep_rule,
                                        fraction=rl.timestep_fraction)
  got = (float(grid[max(window)]), float(grid[min(window)]))
  np.testing.assert_allclose(got, WINDOWS[(recipe, variant)], atol=6e-4, err_msg=f"{recipe}:{variant} window")
  assert list(window) == list(range(min(window), max(window) + 1))  # a contiguous index range


def test_the_official_sd35_grid_is_the_diffusers_scheduler_grid():
  """:official samples on FlowMatchEulerDiscreteScheduler's own grid (audit known item a), FF's default on the linear
  one; both end at 0."""
  off, ff = (_grid(config_lib.load(_path("sd35_medium_nft", v)), "sd35_medium_nft") for v in ("official", ""))
  np.testing.assert_allclose(off, [1, .960, .913, .858, .790, .707, .602, .465, .278, .009, 0], atol=6e-4)
  lin = np.linspace(1, 1 / 14, 14)  # FF scheduler/flow_match_euler_discrete.py:57, then the shift 3
  np.testing.assert_allclose(ff, np.append(3 * lin / (1 + 2 * lin), 0.0), atol=1e-6)
  cfg = config_lib.load(_path("sd35_medium_nft", "official"))
  assert cfg.rollout.solver == "dpm2" and cfg.rollout.grid == "diffusers"


@pytest.mark.parametrize("recipe,variant", [(r, v) for r, v in ALL if "smoke" in v])
def test_smoke_shrinks_the_run_and_keeps_the_mechanisms(recipe, variant):
  full = config_lib.load(_path(recipe, variant.replace("smoke", "").strip(",")))
  cfg = config_lib.load(_path(recipe, variant))
  kept = {k: (_get(cfg, k), _get(full, k)) for k in MECHANISMS if _get(cfg, k) != _get(full, k)}
  assert not kept, f"smoke changed the recipe's mechanisms (smoke, recipe): {kept}"
  assert (cfg.model.resolution, cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat) == (32, "float32",
                                                                                               "float32", False)
  assert (cfg.rollout.prompts_per_iter, cfg.rollout.group_size, cfg.rl.iterations) == (2, 4, 2)
  assert (cfg.eval.every, cfg.eval.num_prompts, cfg.eval.resolution, cfg.checkpoint.every) == (2, 2, 0, 2)
  assert (cfg.rl.lora_rank, cfg.rl.lora_alpha, cfg.data.max_sequence_length) == (4, 8.0, 0)
  assert cfg.eval.ema_every <= cfg.rl.iterations
  rows = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
  assert cfg.rl.timestep_share_rows == 0 or rows % cfg.rl.timestep_share_rows == 0
  assert cfg.dpo.t_share_pairs == 0 or (cfg.rollout.prompts_per_iter * cfg.rl.num_train_timesteps
                                        % cfg.dpo.t_share_pairs == 0)
  if cfg.rl.methods != "dpo":  # the rule still draws from the tiny snapshot's grid (2-level VAE: factor 2)
    grid = _grid(cfg, recipe, latent_factor=2)
    assert schedules.train_index_window(cfg.rollout.num_steps, grid, cfg.rl.num_train_timesteps,
                                        rule=cfg.rl.timestep_rule, fraction=cfg.rl.timestep_fraction)


def test_variants_are_a_comma_list_in_any_order_and_unknown_ones_are_refused():
  a = config_lib.load(_path("sd35_medium_awm", "official,smoke"))
  b = config_lib.load(_path("sd35_medium_awm", "smoke, official"))
  assert a.to_dict() == b.to_dict()
  with pytest.raises(ValueError, match=r"unknown variant\(s\) \['offical'\].*allowed: \['official', 'smoke'\]"):
    config_lib.load(_path("sd35_medium_nft", "offical"))
  for recipe in ("sd35_medium_dpo", "flux1_dev_nft", "flux2_klein_awm"):  # no official code to reproduce
    with pytest.raises(config_lib.ConfigError, match=r"allowed: \['smoke'\]"):
      config_lib.load(_path(recipe, "official"))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_a_recipe_without_its_paths_names_the_missing_field(recipe, tmp_path):
  cfg = config_lib.load(os.path.join(ROOT, "configs", f"{recipe}.py"))
  assert cfg.rl.methods == recipe.rsplit("_", 1)[1] and cfg.rl.normguard == "on"
  with pytest.raises(config_lib.ConfigError, match="model.weights_dir"):
    config_lib.validate(cfg)
  cfg = config_lib.apply_overrides(cfg, [f"model.weights_dir={tmp_path}", f"data.embeddings_dir={tmp_path}",
                                         "rollout.cfg_scale=0.5"])
  with pytest.raises(config_lib.ConfigError, match="rollout.cfg_scale"):
    config_lib.validate(cfg)
