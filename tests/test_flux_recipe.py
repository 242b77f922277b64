"""Tier 5 for FLUX: the FLUX recipes (configs/flux*_*.py) run the same loop and train step as SD3 on a tiny random
diffusers FLUX.1-dev-style snapshot (guidance embedding; transformer/ + a 4-channel AutoencoderKL in vae/) and a tiny
text-embedding set, with NormGuard; every recipe validates."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax import config as config_lib  # noqa: E402
from normguard_jax import tasks  # noqa: E402
from normguard_jax.data import text_embeddings  # noqa: E402
from normguard_jax.train import loop  # noqa: E402
from tests.test_flux_parity import _F1  # noqa: E402
from tests.test_vae_parity import TINY as VAE_TINY  # noqa: E402
from tests.torch_helpers import randomize_torch  # noqa: E402

RECIPES = [f"{fam}_{m}" for fam in ("flux1_dev", "flux2_klein") for m in ("nft", "awm", "dpo")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("flux_tiny")
  randomize_torch(diffusers.FluxTransformer2DModel(**_F1, guidance_embeds=True), seed=0).save_pretrained(
      root / "snap" / "transformer")
  randomize_torch(diffusers.AutoencoderKL(**dict(VAE_TINY, latent_channels=4)), seed=1).save_pretrained(
      root / "snap" / "vae")
  rng = np.random.RandomState(0)
  d, p = _F1["joint_attention_dim"], _F1["pooled_projection_dim"]
  examples = [{"prompt": f"prompt {i}", "prompt_embeds": rng.randn(5, d).astype(np.float32),
               "pooled": rng.randn(p).astype(np.float32)} for i in range(6)]
  text_embeddings.write_text_embeddings(root / "emb", examples, seq_len=5, embed_dim=d, pooled_dim=p)
  return root


def _cfg(assets, recipe, *extra):
  cfg = config_lib.load(f"configs/{recipe}.py")
  return config_lib.apply_overrides(cfg, [
      f"model.weights_dir={assets / 'snap'}", f"data.embeddings_dir={assets / 'emb'}", "model.resolution=16",
      "model.dtype=float32", "model.param_dtype=float32", "reward.terms={'contrast': 1.0}", "reward.options={}",
      *extra])


@pytest.mark.parametrize("recipe", RECIPES)
def test_flux_recipes_validate(assets, recipe):
  cfg = config_lib.load(f"configs/{recipe}.py")
  assert cfg.task == "flux" and cfg.rl.lora_rank == 64 and cfg.rl.lora_alpha == 128.0 and cfg.rl.normguard == "on"
  with pytest.raises(config_lib.ConfigError, match="model.weights_dir"):
    config_lib.validate(cfg)
  config_lib.validate(_cfg(assets, recipe))


def test_cfg_without_a_negative_split_is_a_clear_error(assets):
  with pytest.raises(config_lib.ConfigError, match="negative"):
    tasks.make_task(_cfg(assets, "flux1_dev_nft", "rollout.cfg_scale=4.0"))


def test_flux1_recipe_runs_end_to_end(assets, tmp_path):
  cfg = _cfg(assets, "flux1_dev_nft", "rollout.num_steps=4", "rollout.prompts_per_iter=2", "rollout.group_size=4",
             "rollout.chunk=0", "rl.num_train_timesteps=2", "rl.num_microbatches=2", "rl.iterations=2",
             "eval.every=2", "eval.num_prompts=2", "eval.grid_images=2", "checkpoint.every=2", "rl.lora_rank=4",
             "rl.lora_alpha=8.0", "rl.lr=1e-3", "model.remat=false")
  report = loop.run(cfg, str(tmp_path / "w"))
  (run,) = report["runs"]
  assert run["status"] == "ok", run
  assert report["pretrain"]["family"] == "FluxTransformer2DModel" and report["pretrain"]["mu"] > 0
  assert abs(run["mean_rho_start"] - 1.0) < 1e-5 and run["mean_rho_end"] != run["mean_rho_start"]
  lines = [json.loads(l) for l in (tmp_path / "w" / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  assert len(train) == 2 and all(np.isfinite(l["train/loss"]) and l["train/skipped"] == 0 for l in train)
  assert all(l["train/ng_lambda"] == 1.0 for l in train)
  from normguard_jax.analysis import __main__ as cli  # the analysis on a FLUX workdir: mu grid, VAE, 2x2 packing
  assert cli.main(["rescale", "--workdir", str(tmp_path / "w"), "--per-prompt", "1", "--steps", "2"]) == 0
  rs = json.loads((tmp_path / "w" / "analysis" / "rescale" / "rescale.json").read_text())
  assert rs["settings"]["task"] == "flux" and rs["settings"]["mu"] == report["pretrain"]["mu"]
  np.testing.assert_allclose(rs["reference"]["rho_per_step"], 1.0, rtol=1e-5)
  assert rs["runs"]["nft_ng"]["rescaled"]["max_abs_drive_rho_minus_1"] < 1e-4
  assert np.isfinite(rs["runs"]["nft_ng"]["policy"]["reward"]) and "saturation" in rs["reference"]
