"""Tier 5 for FLUX: the FLUX recipes run the same loop and train step as SD3 on tiny random diffusers snapshots
(normguard_jax/tools/tiny_snapshot.py, the README's dry-run path). configs/flux2_klein_awm.py:smoke exercises what
only FLUX.2-klein's Flow-Factory recipes use: CFG 4 in the rollouts and in the training forward (the negative
prompt's split), two optimizer updates per rollout batch, the power EMA and FLUX.2's empirical-mu grid; then the
analysis on the FLUX workdir (its mu grid, the FLUX.2 VAE, the 2x2 packing)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from normguard_jax import config as config_lib  # noqa: E402
from normguard_jax import tasks  # noqa: E402
from normguard_jax.data import encode_prompts  # noqa: E402
from normguard_jax.flow import schedules  # noqa: E402
from normguard_jax.tools import tiny_snapshot  # noqa: E402
from tests.test_real_path import PROMPTS, run  # noqa: E402


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
  root = tmp_path_factory.mktemp("klein")
  assert run(tiny_snapshot.main, [str(root / "snap"), "--family", "flux2-klein", "--pickscore", str(root / "ps")])[0] == 0
  (root / "negative.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
  for source, split in ((f"{PROMPTS}/tiny_prompts.txt", "train"), (str(root / "negative.jsonl"), "negative")):
    rc, _, err = run(encode_prompts.main, [str(root / "snap"), source, str(root / "emb"), "--split", split,
                                           "--max-sequence-length", "8"])
    assert rc == 0, err
  return root


def _args(root, recipe, *extra):
  return [f"model.weights_dir={root / 'snap'}", f"data.embeddings_dir={root / 'emb'}",
          f"reward.options.pickscore.model_dir={root / 'ps'}", *extra]


def test_cfg_without_a_negative_split_is_a_clear_error(klein, tmp_path):
  cfg = config_lib.apply_overrides(config_lib.load("configs/flux2_klein_nft.py:smoke"),
                                   _args(klein, "flux2_klein_nft", f"data.negative_dir={tmp_path}"))
  with pytest.raises(config_lib.ConfigError, match="negative"):
    tasks.make_task(cfg)


def test_klein_grid_is_flux2_empirical_mu(klein):
  cfg = config_lib.apply_overrides(config_lib.load("configs/flux2_klein_nft.py:smoke"),
                                   _args(klein, "flux2_klein_nft"))
  task = tasks.make_task(cfg)
  h, w = task.latent_shape[:2]
  mu = schedules.flux2_empirical_mu((h // 2) * (w // 2), cfg.rollout.num_steps)
  np.testing.assert_allclose(task.sampling_grid(cfg.rollout.num_steps),
                             schedules.sampling_grid(cfg.rollout.num_steps, mu=mu), rtol=1e-6)


def test_flux2_klein_awm_smoke_runs_end_to_end(klein, tmp_path):
  from normguard_jax.analysis import __main__ as analysis_cli
  from normguard_jax.train import __main__ as train_cli
  work = tmp_path / "w"
  rc, out, err = run(train_cli.main, ["--config", "configs/flux2_klein_awm.py:smoke", "--workdir", str(work),
                                      *[f"--config.{a}" for a in _args(klein, "flux2_klein_awm")]])
  assert rc == 0, err[-4000:]
  report = json.loads((work / "report.json").read_text())
  (r,) = report["runs"]
  assert r["status"] == "ok" and report["reference_model"]["family"] == "Flux2Transformer2DModel"
  cfg = report["config"]
  assert cfg["rl"]["train_cfg"] and cfg["rl"]["updates_per_iter"] == 2 and cfg["rollout"]["cfg_scale"] == 4.0
  assert abs(r["mean_rho_start"] - 1.0) < 1e-5 and r["mean_rho_end"] != r["mean_rho_start"]
  train = [json.loads(l) for l in (work / "runs" / "awm_ng" / "metrics.jsonl").read_text().splitlines()
           if "train/loss" in l]
  assert len(train) == 2 and all(np.isfinite(l["train/loss"]) and l["train/skipped"] == 0 for l in train)
  assert run(analysis_cli.main, ["rescale", "--workdir", str(work), "--per-prompt", "1", "--steps", "2"])[0] == 0
  rs = json.loads((work / "analysis" / "rescale" / "rescale.json").read_text())
  task = tasks.make_task(config_lib.apply_overrides(config_lib.load("configs/flux2_klein_awm.py:smoke"),
                                                    _args(klein, "flux2_klein_awm")))
  assert rs["settings"]["task"] == "flux" and rs["settings"]["mu"] == pytest.approx(task.grid_mu(2))
  np.testing.assert_allclose(rs["reference"]["rho_per_step"], 1.0, rtol=1e-5)
  assert rs["runs"]["awm_ng"]["rescaled"]["max_abs_drive_rho_minus_1"] < 1e-4
