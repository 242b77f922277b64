"""Tier 5, the user's path (issue 15): from a diffusers snapshot to a trained, exported model with the README's
commands only, on a tiny random SD3.5 snapshot. Each step calls the command's own ``main(argv)`` in this process (the
same argument parsing and code as ``python -m ...``, without an interpreter start per command):

  tiny_snapshot -> encode_prompts (train, test, negative splits) -> train configs/sd35_medium_nft.py:smoke (3
  iterations) -> convert export-lora RUN / export-full RUN (merged) -> diffusers loads both and generates;
  every bad input exits 2 with a message naming the field, and the corrected command then works in the same workdir;
  the analysis commands (evaluate with CFG, rescale, adjoint through the VAE) on the workdir;
  and configs/sd35_medium_nft.py:official,smoke (DiffusionNFT's dpm2 solver, the diffusers grid, 9 random sampler
  timesteps) runs on the same snapshot.
"""

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax.analysis import __main__ as analysis_cli  # noqa: E402
from normguard_jax.convert import __main__ as convert_cli  # noqa: E402
from normguard_jax.data import encode_prompts, prompts as prompts_lib  # noqa: E402
from normguard_jax.tools import tiny_snapshot  # noqa: E402
from normguard_jax.train import __main__ as train_cli  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(prompts_lib.__file__), "prompt_sets")


def run(main, argv):
  """(exit status, stdout, stderr) of a CLI's main(argv), as the shell would see them."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      rc = main(argv)
    except SystemExit as e:
      rc = e.code
  return (rc if isinstance(rc, int) else 0), out.getvalue(), err.getvalue()  # mains may return their result


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  """Snapshot, tiny PickScore and encoded prompts, as the README's first commands make them."""
  root = tmp_path_factory.mktemp("user")
  snap, ps, emb = root / "sd35", root / "pickscore", root / "emb"
  rc, out, err = run(tiny_snapshot.main, [str(snap), "--family", "sd35", "--pickscore", str(ps)])
  assert rc == 0, err
  (root / "negative.jsonl").write_text(json.dumps({"prompt": ""}) + "\n")
  for source, split in ((os.path.join(PROMPTS, "tiny_prompts.txt"), "train"),
                        (os.path.join(PROMPTS, "tiny_prompts_test.txt"), "test"),
                        (str(root / "negative.jsonl"), "negative")):
    rc, out, err = run(encode_prompts.main, [str(snap), source, str(emb), "--split", split,
                                             "--max-sequence-length", "8"])
    assert rc == 0, err
  return root


def _train(user, workdir, *extra):
  return run(train_cli.main, ["--config", "configs/sd35_medium_nft.py:smoke", "--workdir", str(workdir),
                              f"--config.model.weights_dir={user / 'sd35' / 'transformer'}",  # the transformer dir: ok
                              f"--config.data.embeddings_dir={user / 'emb'}",
                              f"--config.reward.options.pickscore.model_dir={user / 'pickscore'}", *extra])


@pytest.fixture(scope="module")
def trained(user, tmp_path_factory):
  """Each bad input exits 2 with a message naming the field, before anything is computed or locked; then the
  corrected command trains in the same workdir (3 iterations, held-out eval prompts), and exports."""
  work = user / "work"
  empty = tmp_path_factory.mktemp("empty")
  no_vae = tmp_path_factory.mktemp("no_vae")
  shutil.copytree(user / "sd35" / "transformer", no_vae / "transformer")
  prompt_set = tmp_path_factory.mktemp("prompt_set")
  assert run(prompts_lib.main, ["plain", os.path.join(PROMPTS, "tiny_prompts.txt"), str(prompt_set)])[0] == 0
  cases = [
      (("--config.reward.options.pickscore.model_dir=" + str(empty),), "reward.options.pickscore"),
      (("--config.model.weights_dir=" + str(no_vae),), "no vae/"),
      (("--config.data.embeddings_dir=" + str(prompt_set),), "data.embeddings_dir"),
      (("--config.reward.terms.remote=1.0",), "reward.options.remote"),
      (("--config.model.resolution=128",), "pos_embed_max_size"),
      (("--config.rl.iteratons=3",), "did you mean 'rl.iterations'"),
  ]
  for extra, needle in cases:
    rc, out, err = _train(user, work, "--config.rl.iterations=3", *extra)
    assert rc == 2 and needle in err, (extra, err[-2000:])
    assert not (work / "runs").exists()  # nothing was computed
  rc, out, err = _train(user, work, "--config.rl.iterations=3")
  assert rc == 0, err[-4000:]
  report = json.loads((work / "report.json").read_text())
  (r,) = report["runs"]
  assert r["status"] == "ok" and r["iterations"] == 3 and report["eval_prompts_held_out"] is True
  assert "reference_model" in report and "pretrain" not in report and "quality_end" not in r
  assert abs(r["mean_rho_start"] - 1.0) < 1e-5 and r["mean_rho_end"] != r["mean_rho_start"]
  evals = sorted(os.listdir(work / "runs" / "nft_ng" / "eval"))
  assert "samples_000000.png" in evals and "000002.npz" in evals  # a PNG and the per-sample values per eval
  rc, out, err = _train(user, work, "--config.rl.iterations=3")  # a rerun says it is done
  assert rc == 0 and "already finished" in out, err[-2000:]

  # export from what training wrote: the run dir alone (rank, alpha, targets, snapshot from its config.json)
  run_dir = work / "runs" / "nft_ng"
  assert run(convert_cli.main, ["export-lora", str(run_dir), str(user / "lora")])[0] == 0
  assert run(convert_cli.main, ["export-full", str(run_dir), str(user / "merged")])[0] == 0
  rc, out, err = run(convert_cli.main, ["export-lora", str(run_dir / "checkpoints" / "4"), str(user / "x")])
  assert rc == 2 and "not a run dir" in err
  return work


def test_bad_inputs_exit_2_then_the_corrected_command_works(trained):
  assert (trained / "report.json").exists() and (trained.parent / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_diffusers_loads_both_exports_and_generates(user, trained):
  torch.manual_seed(0)
  kw = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0, output_type="np", max_sequence_length=8)
  base = diffusers.StableDiffusion3Pipeline.from_pretrained(user / "sd35")
  ref = base("a red cube", generator=torch.Generator().manual_seed(1), **kw).images
  base.load_lora_weights(user / "lora")
  with_lora = base("a red cube", generator=torch.Generator().manual_seed(1), **kw).images
  merged = diffusers.StableDiffusion3Pipeline.from_pretrained(
      user / "sd35", transformer=diffusers.SD3Transformer2DModel.from_pretrained(user / "merged"))
  with_merged = merged("a red cube", generator=torch.Generator().manual_seed(1), **kw).images
  assert np.all(np.isfinite(with_lora)) and with_lora.shape == (1, 32, 32, 3)
  assert np.abs(with_lora - ref).max() > 1e-4  # the trained adapter changes the image
  np.testing.assert_allclose(with_merged, with_lora, atol=2e-3)  # merged weights = base + LoRA


def test_analysis_commands_run_on_the_workdir(trained):
  """evaluate (CFG with the negative prompt, held-out prompts, paired samples for the judge), rescale (the driven
  norm equals ||v_ref||) and the adjoint through the MMDiT, the VAE decoder and PickScore (central differences)."""
  work = trained
  ok = lambda *a: run(analysis_cli.main, [a[0], "--workdir", str(work), "--per-prompt", "1", *a[1:]])[0] == 0
  assert ok("evaluate", "--steps", "2", "--cfg-scale", "2")
  ev = json.loads((work / "analysis" / "evaluate" / "evaluate.json").read_text())
  assert ev["settings"]["task"] == "sd3" and ev["settings"]["cfg_skipped"] is None
  assert ev["settings"]["held_out_prompts"] is True
  for name in ("reference", "nft_ng"):
    cells = {(e["num_steps"], e["cfg_scale"]): e for e in ev["models"][name]["settings"]}
    assert set(cells) == {(2, 1.0), (2, 2.0)}
    assert cells[(2, 1.0)]["reward"] != cells[(2, 2.0)]["reward"]  # CFG changed the samples
  np.testing.assert_allclose(ev["models"]["reference"]["settings"][0]["own_rho_per_step"], 1.0, rtol=1e-5)
  with np.load(work / "analysis" / "evaluate" / "samples" / "nft_ng.npz") as z:  # paired sets for the judge
    assert z["images"].dtype == np.uint8 and len(z["prompts"]) == z["images"].shape[0]
  assert ok("rescale", "--steps", "2", "--cfg-scale", "2")
  rs = json.loads((work / "analysis" / "rescale" / "rescale.json").read_text())
  assert rs["runs"]["nft_ng"]["rescaled"]["max_abs_drive_rho_minus_1"] < 1e-4
  assert ok("adjoint", "--steps", "2", "--fd-steps", "2", "--fd-h", "0.01", "--no-reference")
  adj = json.loads((work / "analysis" / "adjoint" / "adjoint.json").read_text())
  assert adj["settings"]["decoder"] == "VAE" and adj["models"]["nft_ng"]["fd_check"]["rel_error"] < 1e-2


def test_official_nft_variant_runs_the_smoke(user, tmp_path):
  """configs/sd35_medium_nft.py:official (DiffusionNFT: dpm2 rollouts on the diffusers grid, 9 random sampler steps
  per sample, KL 1e-4, global std) on the same tiny snapshot."""
  rc, out, err = run(train_cli.main, [
      "--config", "configs/sd35_medium_nft.py:official,smoke", "--workdir", str(tmp_path / "w"),
      f"--config.model.weights_dir={user / 'sd35'}", f"--config.data.embeddings_dir={user / 'emb'}",
      f"--config.reward.options.pickscore.model_dir={user / 'pickscore'}"])
  assert rc == 0, err[-4000:]
  report = json.loads((tmp_path / "w" / "report.json").read_text())
  assert report["config"]["rollout"]["solver"] == "dpm2" and report["config"]["rollout"]["grid"] == "diffusers"
  assert report["runs"][0]["status"] == "ok"
