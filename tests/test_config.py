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
                                                          "reward.terms={'contrast': 2.0}"])
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


def test_cli_bad_key_and_missing_workdir_parent_fail_fast(tmp_path):
  r = _cli("--config", CFG, "--workdir", str(tmp_path / "w"), "--config.rl.bogus=1")
  assert r.returncode == 2 and "unknown config key 'rl.bogus'" in r.stderr
  r = _cli("--config", CFG, "--workdir", str(tmp_path / "missing" / "w"))
  assert r.returncode == 2 and "workdir parent" in r.stderr
  assert not (tmp_path / "missing").exists()
  r = _cli("--config", "configs/nope.py", "--workdir", str(tmp_path / "w"))
  assert r.returncode == 2 and "config file not found" in r.stderr
