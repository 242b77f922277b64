"""Tier 5 for the SD3 task: the SD3.5-Medium recipes (configs/sd35_medium_*.py) run the same RL loop on a tiny
random diffusers SD3.5-style snapshot (transformer/ + vae/, saved with save_pretrained) and a tiny
text-embedding dataset, through the strict converters, the VAE decode and a pixel reward."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax import config as config_lib  # noqa: E402
from normguard_jax.data import text_embeddings  # noqa: E402
from normguard_jax.train import loop  # noqa: E402
from tests.test_mmdit_parity import SD35_TINY  # noqa: E402
from tests.test_vae_parity import TINY as VAE_TINY  # noqa: E402
from tests.torch_helpers import randomize_torch  # noqa: E402

RECIPES = ("nft", "awm", "dpo")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sd35_tiny")
  randomize_torch(diffusers.SD3Transformer2DModel(**SD35_TINY), seed=0).save_pretrained(root / "snap" / "transformer")
  randomize_torch(diffusers.AutoencoderKL(**VAE_TINY), seed=1).save_pretrained(root / "snap" / "vae")
  rng = np.random.RandomState(0)
  d, p = SD35_TINY["joint_attention_dim"], SD35_TINY["pooled_projection_dim"]
  examples = [{"prompt": f"prompt {i}", "prompt_embeds": rng.randn(7, d).astype(np.float32),
               "pooled": rng.randn(p).astype(np.float32)} for i in range(6)]
  text_embeddings.write_text_embeddings(root / "emb", examples, seq_len=7, embed_dim=d, pooled_dim=p)
  negative = [{"prompt": "", "prompt_embeds": rng.randn(7, d).astype(np.float32), "pooled": rng.randn(p).astype(
      np.float32)}]
  text_embeddings.write_text_embeddings(root / "neg", negative, seq_len=7, embed_dim=d, pooled_dim=p,
                                        split="negative")
  return root


def _cfg(assets, method, *extra):
  cfg = config_lib.load(f"configs/sd35_medium_{method}.py")
  return config_lib.apply_overrides(cfg, [
      f"model.weights_dir={assets / 'snap'}", f"data.embeddings_dir={assets / 'emb'}", "model.resolution=16",
      f"data.negative_dir={assets / 'neg'}",
      "model.dtype=float32", "model.param_dtype=float32", "reward.terms={'contrast': 1.0}", "reward.options={}",
      *extra])


@pytest.mark.parametrize("method", RECIPES)
def test_recipe_validates_and_names_missing_paths(assets, method):
  cfg = config_lib.load(f"configs/sd35_medium_{method}.py")
  assert cfg.rl.lora_rank == 32 and cfg.rl.lora_alpha == 64.0 and cfg.rollout.num_steps == 10
  assert cfg.rl.methods == method and cfg.rl.normguard == "on"
  with pytest.raises(config_lib.ConfigError, match="model.weights_dir"):
    config_lib.validate(cfg)
  config_lib.validate(_cfg(assets, method))
  with pytest.raises(config_lib.ConfigError, match="rollout.cfg_scale"):
    config_lib.validate(_cfg(assets, method, "rollout.cfg_scale=0.5"))


def test_sd35_recipe_runs_end_to_end(assets, tmp_path):
  cfg = _cfg(assets, "nft", "rollout.num_steps=4", "rollout.prompts_per_iter=2", "rollout.group_size=4",
             "rollout.chunk=4", "rl.num_train_timesteps=2", "rl.num_microbatches=2", "rl.iterations=2",
             "eval.every=2", "eval.num_prompts=2", "eval.grid_images=2", "checkpoint.every=2", "rl.lora_rank=4",
             "rl.lora_alpha=8.0", "rl.lr=1e-3", "model.remat=false")
  report = loop.run(cfg, str(tmp_path / "w"))
  (run,) = report["runs"]
  assert run["status"] == "ok", run
  assert run["iterations"] == 2 and np.isfinite(run["reward_end"])
  assert len(run["rho_per_step_end"]) == 4 and abs(run["mean_rho_start"] - 1.0) < 1e-5  # LoRA B = 0 at start
  assert run["mean_rho_end"] != run["mean_rho_start"]  # the adapter moved
  assert report["pretrain"]["params"] > 0
  lines = [json.loads(l) for l in (tmp_path / "w" / "runs" / "nft_ng" / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if "train/loss" in l]
  assert len(train) == 2 and all(np.isfinite(l["train/loss"]) and l["train/skipped"] == 0 for l in train)
  assert all("train/ng_active_frac" in l for l in train)
  assert (tmp_path / "w" / "samples_nft_ng.png").exists() and (tmp_path / "w" / "samples_reference.png").exists()
  assert (tmp_path / "w" / "runs" / "nft_ng" / "checkpoints").is_dir()
  _analysis_commands_run_on_the_workdir(tmp_path / "w", assets)


def _analysis_commands_run_on_the_workdir(work, assets):
  """The analysis commands on this SD3 workdir: VAE-decoded samples, prompts, CFG from the negative prompt, the
  pixel-statistics proxies, and the adjoint through the MMDiT, the VAE decoder and the reward against central
  finite differences (fp32)."""
  from normguard_jax.analysis import __main__ as cli
  ok = lambda *a: cli.main([a[0], "--workdir", str(work), "--per-prompt", "1", *a[1:]]) == 0
  assert ok("evaluate", "--steps", "2", "--cfg-scale", "2")
  ev = json.loads((work / "analysis" / "evaluate" / "evaluate.json").read_text())
  assert ev["settings"]["task"] == "sd3" and ev["settings"]["samples"] == 2 and ev["settings"]["cfg_skipped"] is None
  assert ev["settings"]["held_out_prompts"] is False  # the recipe's eval split is the training split
  for name in ("reference", "nft_ng"):
    cells = {(e["num_steps"], e["cfg_scale"]): e for e in ev["models"][name]["settings"]}
    assert set(cells) == {(2, 1.0), (2, 2.0)}
    assert cells[(2, 1.0)]["reward"] != cells[(2, 2.0)]["reward"]  # CFG changed the samples
    assert all(np.isfinite(e["reward"]) and 0 <= e["saturation"] <= 1 and len(e["own_rho_per_step"]) == 2
               for e in cells.values())
  np.testing.assert_allclose(ev["models"]["reference"]["settings"][0]["own_rho_per_step"], 1.0, rtol=1e-5)
  with np.load(work / "analysis" / "evaluate" / "samples" / "nft_ng.npz") as z:  # paired sets for the judge
    assert z["images"].shape == (2, 16, 16, 3) and z["images"].dtype == np.uint8
    assert list(z["prompts"]) == ["prompt 0", "prompt 1"]
  assert ev["models"]["nft_ng"]["hinge"]["ng_active_frac"]["n"] == 2
  assert ok("rescale", "--steps", "2", "--cfg-scale", "2")  # evaluate's compiled sampler serves it
  rs = json.loads((work / "analysis" / "rescale" / "rescale.json").read_text())
  assert rs["runs"]["nft_ng"]["rescaled"]["max_abs_drive_rho_minus_1"] < 1e-4
  assert ok("adjoint", "--steps", "2", "--fd-steps", "2", "--fd-h", "0.01", "--no-reference")
  adj = json.loads((work / "analysis" / "adjoint" / "adjoint.json").read_text())
  e = adj["models"]["nft_ng"]
  assert adj["settings"]["decoder"] == "VAE" and np.asarray(e["g"]).shape == (2, 2)
  assert e["fd_check"]["rel_error"] < 1e-3, e["fd_check"]
  for name in ("evaluate/evaluate.png", "rescale/rescale.png", "adjoint/adjoint.png"):
    assert (work / "analysis" / name).stat().st_size > 0
