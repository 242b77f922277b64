"""Tier 5: config loading, overrides and validation fail clearly and before any compute."""

import subprocess
import sys

import pytest

from normguard_jax import config as config_lib

CFG = "configs/tiny_digits.py"


def test_default_and_smoke_configs_validate():
  config_lib.validate(config_lib.load(CFG))
  smoke = config_lib.load(CFG + ":smoke")
  config_lib.validate(smoke)
  assert smoke.rl.iterations < config_lib.load(CFG).rl.iterations
  with pytest.raises(ValueError, match="variant"):
    config_lib.load(CFG + ":huge")


def test_overrides_parse_types():
  cfg = config_lib.apply_overrides(config_lib.load(CFG), ["rl.iterations=7", "rl.lr=1", "rl.methods=nft,dpo",
                                                          "normguard.lam.kind=adaptive",
                                                          "reward.terms={'contrast': 2.0}", "reward.options={}"])
  assert cfg.rl.iterations == 7 and cfg.rl.lr == 1.0 and isinstance(cfg.rl.lr, float)
  assert config_lib.csv(cfg.rl.methods) == ["nft", "dpo"]
  assert dict(cfg.reward.terms) == {"contrast": 2.0}
  config_lib.validate(cfg)


@pytest.mark.parametrize("override,match", [
    ("rl.iteratons=5", "unknown config key 'rl.iteratons'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("rl.iterations=many", "expects int"),
    ("rl.iterations", "key=value"),
])
def test_bad_override_names_the_key(override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.apply_overrides(config_lib.load(CFG), [override])


@pytest.mark.parametrize("override,match", [
    ("rl.methods=nft,ppo", "rl.methods: unknown method 'ppo'"),
    ("rl.normguard=maybe", "rl.normguard"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rl.lr=-1.0", "rl.lr"),
    ("normguard.mode=ratio", "normguard.mode"),
    ("normguard.lam.kind=pid", "normguard.lam.kind"),
    ("rl.fusion=concat", "needs LoRA"),
    ("rl.num_train_timesteps=20", "usable sampler steps"),
    ("reward.terms={'hps': 1.0}", "unknown reward 'hps'"),
])
def test_invalid_values_fail_validation(override, match):
  cfg = config_lib.apply_overrides(config_lib.load(CFG), [override])
  if override.startswith("rl.fusion"):
    cfg.rl.lora_rank = 0
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(cfg)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "normguard_jax.train", *args], capture_output=True, text=True,
                        timeout=120)


def test_cli_bad_key_and_missing_workdir_parent_fail_fast(tmp_path, capsys):
  r = _cli("--config", CFG, "--workdir", str(tmp_path / "w"), "--config.rl.bogus=1")  # the shell's exit status
  assert r.returncode == 2 and "unknown config key 'rl.bogus'" in r.stderr
  from normguard_jax.train import __main__ as cli  # the same main(argv), in this process (no interpreter start)
  assert cli.main(["--config", CFG, "--workdir", str(tmp_path / "missing" / "w")]) == 2
  assert "workdir parent" in capsys.readouterr().err
  assert not (tmp_path / "missing").exists()
  assert cli.main(["--config", "configs/nope.py", "--workdir", str(tmp_path / "w")]) == 2
  assert "config file not found" in capsys.readouterr().err


def test_open_groups_take_new_keys_and_unknown_keys_suggest_the_right_one():
  cfg = config_lib.apply_overrides(config_lib.load("configs/sd35_medium_nft.py"), [
      "reward.terms.remote=1.0", "reward.options.remote.url=http://127.0.0.1:9/score", "reward.options.remote.timeout_s=5"])
  assert dict(cfg.reward.terms) == {"pickscore": 1.0, "remote": 1.0}
  assert dict(cfg.reward.options.remote) == {"url": "http://127.0.0.1:9/score", "timeout_s": 5}
  with pytest.raises(config_lib.ConfigError, match=r"did you mean 'rl.iterations'"):
    config_lib.apply_overrides(config_lib.load(CFG), ["rl.iteration=3"])
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'rl.newkey'"):
    config_lib.apply_overrides(config_lib.load(CFG), ["rl.newkey=3"])  # only reward.terms / reward.options are open


@pytest.mark.parametrize("overrides,devices,match", [
    # issue 12: DPO with 3 prompts makes 6 rollout rows and 2 x 3 x T train rows; fsdp 8 divides neither
    (["rl.methods=dpo", "rollout.prompts_per_iter=3", "rollout.group_size=2"], 8, "rollout.prompts_per_iter"),
    (["rl.methods=nft", "rollout.chunk=4"], 8, "rollout.chunk"),
    (["rl.methods=nft", "rollout.chunk=5"], 1, r"rollout.chunk: 5 does not divide the 16"),
    (["rl.methods=nft", "rl.num_microbatches=16"], 8, "rl.num_microbatches"),
    (["rl.methods=dpo", "rl.num_microbatches=3"], 1, r"per half"),
    (["mesh.fsdp=3"], 8, "config.mesh"),
])
def test_batches_the_mesh_does_not_divide_are_refused_before_any_compute(overrides, devices, match):
  cfg = config_lib.apply_overrides(config_lib.load(CFG + ":smoke"), overrides)
  config_lib.validate(cfg)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.check_batch_layout(cfg, devices)


def test_batch_layout_of_the_shipped_configs_fits_8_devices():
  for name in (CFG, CFG + ":smoke"):
    sizes = config_lib.check_batch_layout(config_lib.load(name), 8)
    assert sizes == {"data": 1, "fsdp": 8, "tensor": 1}


def test_grpo_steps_it_cannot_serve_and_grpo_with_cfg_are_refused():
  base = ["rl.methods=grpo", "rollout.num_steps=10", "rl.timestep_fraction=1.0"]
  config_lib.validate(config_lib.apply_overrides(config_lib.load(CFG), base + ["rl.num_train_timesteps=9"]))
  with pytest.raises(config_lib.ConfigError, match="SDE transitions GRPO can train on"):
    config_lib.validate(config_lib.apply_overrides(config_lib.load(CFG), base + ["rl.num_train_timesteps=10"]))
  with pytest.raises(config_lib.ConfigError, match="Flow-GRPO with CFG is refused"):
    config_lib.validate(config_lib.apply_overrides(config_lib.load(CFG), base + ["rollout.cfg_scale=2.0"]))


def test_train_without_config_lists_the_recipes(tmp_path):
  from normguard_jax.train import __main__ as cli
  import contextlib
  import io
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    assert cli.main(["--workdir", str(tmp_path / "w")]) == 2
  assert "--config is required" in err.getvalue() and "configs/sd35_medium_nft.py" in err.getvalue()
  assert "--config.model.weights_dir=..." in cli.recipes_help()
