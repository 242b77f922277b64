"""Export back to diffusers (convert/export.py, convert/__main__.py), checked by diffusers itself.

A tiny random SD3.5-style diffusers transformer (qk RMSNorm, dual attention, scanned and unscanned runs) is
converted by our strict converter; the export must (a) as a full transformer dir, give back diffusers' state
dict bit for bit and identical outputs through ``from_pretrained``; (b) as a PEFT LoRA, loaded with
``load_lora_adapter``, reproduce our LoRA velocity (1e-4 abs; in practice ~1e-6) and leave the model
unchanged when the adapter is disabled.

From a training run (``export-lora`` / ``export-full WORKDIR/runs/RUN OUT``): fake run dirs as the trainer writes
them (WORKDIR/config.json from the real recipes, train/checkpoint.RunCheckpointer checkpoints of a TrainState with
random nonzero LoRA, an interrupted and a set-aside checkpoint beside them), for the tiny SD3.5-style and a tiny
FLUX.1 transformer. The exported LoRA (loaded with ``load_lora_adapter``) and the merged transformer dir (loaded with
``from_pretrained``) must reproduce our policy velocity, and each bad argument exits 2 with a message.
"""

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax import config as config_lib  # noqa: E402
from normguard_jax.convert import export  # noqa: E402
from normguard_jax.convert import flux as convert_flux  # noqa: E402
from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.convert.__main__ import main as cli  # noqa: E402
from normguard_jax.convert.safetensors_io import ConversionError  # noqa: E402
from normguard_jax.models import flux, mmdit  # noqa: E402
from tests.torch_helpers import randomize_torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_TOL = 1e-4
# the lora_case adapters, in every kind of entry: the references' list verbatim (joint attention), a qualified dual
# attention entry, our older plain "to_out" (to_out.0 of attn and attn2), one Linear of each MLP
LORA_CASE_TARGETS = mmdit.LORA_PRESETS["reference"] + ("attn2.to_q", "to_out", "ff.net.0.proj", "ff_context.net.2")
N_LORA_CASE = (4 * 8 - 1) + 2 * 2 + 4 + 3  # joint attention (no to_add_out in the last block), attn2 q/out on the
# two dual blocks, ff.net.0.proj in every block, ff_context.net.2 in the three that have ff_context
# SD3.5-style: dual attention on a scanned run of two, a plain block, then the context_pre_only block.
TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = randomize_torch(diffusers.SD3Transformer2DModel(**TINY))
  root = tmp_path_factory.mktemp("sd35_tiny")
  model.save_pretrained(root / "transformer")
  return model, root


def _inputs(cfg, batch=2, size=8, text_len=5):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
  cond = dict(prompt_embeds=rng.standard_normal((batch, text_len, cfg.joint_attention_dim)).astype(np.float32),
              pooled=rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32))
  return x, np.array([0.3, 0.8], np.float32)[:batch], cond


def _torch_v(model, x, t, cond):
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(cond["prompt_embeds"]),
                pooled_projections=torch.from_numpy(cond["pooled"]),
                timestep=torch.from_numpy(t * np.float32(1000.0)), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("scan_layers,shard", [(True, False), (False, True)])
def test_full_export_roundtrip(tiny, tmp_path, scan_layers, shard):
  model, root = tiny
  cfg, params = convert_sd3.load_transformer(root, scan_layers=scan_layers)
  out = export.save_transformer(tmp_path / "transformer", cfg, params, max_shard_bytes=20_000 if shard else None)
  assert os.path.isfile(os.path.join(out, export.INDEX_NAME)) == shard
  back = diffusers.SD3Transformer2DModel.from_pretrained(out).eval()
  ref_sd, got_sd = model.state_dict(), back.state_dict()
  assert sorted(ref_sd) == sorted(got_sd)
  for k in ref_sd:
    assert ref_sd[k].dtype == got_sd[k].dtype and torch.equal(ref_sd[k], got_sd[k]), k
  x, t, cond = _inputs(cfg)
  np.testing.assert_array_equal(_torch_v(back, x, t, cond), _torch_v(model, x, t, cond))
  # and our own converter reads the export back to the same tree (the maps are inverse)
  cfg2, params2 = convert_sd3.load_transformer(out, scan_layers=scan_layers)
  assert cfg2 == cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  print(f"[export] full scan={scan_layers} shard={shard}: state dict exact, outputs identical")


def _random_lora(cfg, n_adapters, seed=1):
  """Random nonzero adapters (B too) on every LoRA leaf of ``cfg``, from the abstract shapes (nothing compiled)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda l: (0.3 * rng.standard_normal(l.shape[:-1] + (n_adapters,))).astype(np.float32),
                                mmdit.param_shapes(cfg)["lora"])


@pytest.fixture(scope="module")
def lora_case(tiny):
  """Our side, computed once: LoRA velocities of adapter 0 and 1 (two stacked adapters) and the base."""
  model, root = tiny
  cfg, params = convert_sd3.load_transformer(root, scan_layers=True, lora_rank=2, lora_alpha=3.0,
                                             lora_targets=LORA_CASE_TARGETS)
  lora = _random_lora(cfg, n_adapters=2)  # the export must take index 0
  x, t, cond = _inputs(cfg)
  v = jax.jit(lambda variables, g: mmdit.velocity(variables, x, t, cond, cfg=cfg, lora_gate=g))
  gates = {"policy": [[1., 0.]] * 2, "other": [[0., 1.]] * 2, "base": [[0., 0.]] * 2}
  outs = {k: np.asarray(v({"params": params, "lora": lora}, jnp.array(g))) for k, g in gates.items()}
  return cfg, lora, (x, t, cond), outs, (params, v)


@pytest.mark.parametrize("fold_alpha,how", [(True, "pipeline"), (False, "pipeline"), (False, "file"), (True, "dict")])
def test_lora_export_matches_peft(tiny, lora_case, tmp_path, fold_alpha, how):
  """how: 'pipeline' = StableDiffusion3Pipeline.lora_state_dict + load_lora_into_transformer (what
  pipe.load_lora_weights does for the transformer); 'file' = transformer.load_lora_adapter(dir); 'dict' = a
  state dict without metadata (diffusers then assumes alpha = r, so only the folded form applies)."""
  pytest.importorskip("peft")
  model, _ = tiny
  cfg, lora, (x, t, cond), ours, _ = lora_case
  base_ref = _torch_v(model, x, t, cond)
  m = copy.deepcopy(model)
  if how == "dict":
    sd, _ = export.lora_state_dict(cfg, lora, fold_alpha=fold_alpha)
    m.load_lora_adapter({k: torch.from_numpy(v) for k, v in sd.items()}, adapter_name="ng", prefix="transformer")
  else:
    path = export.save_lora(tmp_path, cfg, lora, fold_alpha=fold_alpha)
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors"
    if how == "file":
      m.load_lora_adapter(str(tmp_path), weight_name=os.path.basename(path), adapter_name="ng", prefix="transformer")
    else:
      pipe_cls = diffusers.StableDiffusion3Pipeline
      sd, meta = pipe_cls.lora_state_dict(str(tmp_path), return_lora_metadata=True)
      assert meta["transformer.lora_alpha"] == (2.0 if fold_alpha else 3.0)
      pipe_cls.load_lora_into_transformer(sd, transformer=m, adapter_name="ng", metadata=meta)
  assert m.peft_config["ng"].lora_alpha == (2.0 if fold_alpha else 3.0) and m.peft_config["ng"].r == 2
  assert sum(1 for n, _ in m.named_modules() if n.endswith("lora_A.ng")) == N_LORA_CASE  # every adapted Linear
  theirs = _torch_v(m, x, t, cond)
  err = float(np.max(np.abs(theirs - ours["policy"])))
  err_other = float(np.max(np.abs(theirs - ours["other"])))
  print(f"[export] lora fold_alpha={fold_alpha} via {how}: max abs err {err:.3g} "
        f"(vs adapter 1: {err_other:.3g}; LoRA effect {float(np.max(np.abs(ours['policy'] - base_ref))):.3g})")
  assert err <= LORA_TOL and err_other > 100 * LORA_TOL
  m.disable_lora()
  off = _torch_v(m, x, t, cond)
  np.testing.assert_array_equal(off, base_ref)  # disabled adapter: the un-adapted model, bit for bit
  base_err = float(np.max(np.abs(ours["base"] - off)))
  print(f"[export] adapter disabled: torch == base exactly; ours (gate 0) vs torch base {base_err:.3g}")
  assert base_err <= LORA_TOL


def test_export_is_strict(tiny, lora_case):
  _, root = tiny
  cfg, lora, _, _, _ = lora_case
  _, params = convert_sd3.load_transformer(root, scan_layers=True)
  bad = dict(params, extra={"kernel": np.zeros((2, 2))})
  bad.pop("proj_out")
  with pytest.raises(ConversionError) as e:
    export.transformer_state_dict(cfg, bad)
  msg = str(e.value)
  assert "missing leaf proj_out/kernel" in msg and "extra leaf extra/kernel" in msg
  lora = jax.tree_util.tree_map(np.asarray, lora)
  lora["blocks_0"]["attn"]["to_q"]["lora_a"] = np.zeros((2, 16, 3, 1))
  with pytest.raises(ConversionError, match="wrong shape for blocks_0/attn/to_q/lora_a"):
    export.lora_state_dict(cfg, lora)
  with pytest.raises(ConversionError, match="adapter index 1 out of range"):
    export.lora_state_dict(cfg, jax.tree_util.tree_map(lambda a: a[..., :1], lora_case[1]), adapter=1)


def test_cli_to_jax_and_back(tiny, tmp_path):
  model, root = tiny
  out = tmp_path / "jax"
  manifest = cli(["to-jax", str(root), str(out)])
  with open(out / "manifest.json") as f:
    assert json.load(f) == json.loads(json.dumps(manifest))
  assert manifest["param_count"] == sum(p.numel() for p in model.parameters())
  assert manifest["files"][0]["name"] == "config.json" and len(manifest["files"][1]["sha256"]) == 64
  assert tuple(manifest["mmdit_config"]["dual_attention_layers"]) == (0, 1)
  cli(["export-full", str(out), str(tmp_path / "full")])
  back = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "full")
  for k, v in model.state_dict().items():
    assert torch.equal(v, back.state_dict()[k]), k
  # a LoRA tree saved with orbax (as a train state's `trainable`) -> PEFT file, architecture from the manifest
  import orbax.checkpoint as ocp
  cfg, _ = convert_sd3.load_transformer(root, lora_rank=2, lora_targets=("to_q", "to_v"))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "state", {"trainable": _random_lora(cfg, 1)})
  path = cli(["export-lora", str(tmp_path / "state"), str(tmp_path / "lora"), "--key", "trainable",
              "--config", str(out / "manifest.json"), "--lora-alpha", "4"])
  from safetensors import safe_open
  with safe_open(path, "np") as f:
    keys = sorted(f.keys())
    meta = json.loads(f.metadata()["lora_adapter_metadata"])
  assert len(keys) == 2 * 2 * (2 * 2 + 2)  # (A, B) x (to_q, to_v) x (attn + attn2 on 2 dual layers, attn on 2)
  assert meta["transformer.r"] == 2 and meta["transformer.lora_alpha"] == 2.0


def test_merge_lora_folds_each_adapter(lora_case):
  """merge_lora(adapter=j): the base model (gate 0) on the merged params computes adapter j's velocity."""
  cfg, lora, _, outs, (params, v) = lora_case
  off = jnp.zeros((2, 2))
  for adapter, key in ((0, "policy"), (1, "other")):
    merged = export.merge_lora(cfg, params, lora, adapter=adapter)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    err = float(np.max(np.abs(np.asarray(v({"params": merged, "lora": lora}, off)) - outs[key])))
    print(f"[export] merge adapter {adapter}: max abs err vs the LoRA velocity {err:.3g}")
    assert err <= 1e-5
  with pytest.raises(ConversionError, match="adapter index 2 out of range"):
    export.merge_lora(cfg, params, lora, adapter=2)


# ----------------------------------------------------------------------------------------------- from a run dir

# FLUX.1-dev-style: two double and two single blocks (both kinds scanned), guidance embedded
FLUX1_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
                  guidance_embeds=True)


def _write_workdir(workdir, recipe, overrides):
  """WORKDIR/config.json from a recipe + overrides, as the trainer writes it (train/loop.py _check_same_config)."""
  cfg = config_lib.apply_overrides(config_lib.load(os.path.join(REPO, "configs", recipe)), overrides)
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(json.loads(cfg.to_json_best_effort()), f, indent=2)
  return workdir


def _write_checkpoints(run_dir, frozen, trainables, done_step, *, lora):
  """TrainStates (train/state.create) saved by RunCheckpointer at each step of ``trainables``; ``done_step``'s meta
  is the final one. Beside them: an interrupted save and a set-aside damaged one, which must never be used."""
  import optax
  from normguard_jax.train import checkpoint as ckpt_lib, state as state_lib
  ckpt = ckpt_lib.RunCheckpointer(os.path.join(run_dir, "checkpoints"), async_save=False)
  adam = optax.adam(1e-3)
  adam = optax.GradientTransformation(jax.jit(adam.init), adam.update)  # one compile, not one per leaf shape
  for step, trainable in trainables.items():
    st = state_lib.create(trainable, frozen, adam, jax.random.PRNGKey(0), lora=lora, with_old=True)
    ckpt.save(step, st.replace(step=jnp.asarray(step, jnp.int32)),
              {"iteration": step, "name": os.path.basename(run_dir), "done": step == done_step}, force=True)
  ckpt.close()
  for junk in (f"{done_step + 1}.orbax-checkpoint-tmp-1", f"{done_step}.corrupt-1"):
    os.makedirs(os.path.join(run_dir, "checkpoints", junk, "state"))


@pytest.fixture(scope="module")
def sd3_run(tiny, lora_case, tmp_path_factory):
  """A LoRA run of configs/sd35_medium_nft.py on the tiny snapshot with lora_case's settings (LORA_CASE_TARGETS,
  rank 2, alpha 3: a wrong alpha would show), checkpoints at 1 and at 3 = iterations + 1 (the final one); and a full
  fine-tuning run (rl.lora_rank 0) in a second workdir."""
  _, root = tiny
  cfg, _, _, _, (params, _) = lora_case
  params = jax.tree_util.tree_map(np.asarray, params)
  loras = {1: _random_lora(cfg, 1, 5), 3: _random_lora(cfg, 1, 7)}
  base = tmp_path_factory.mktemp("runs")
  common = [f"model.weights_dir={root}", "rl.iterations=2"]
  wd = _write_workdir(str(base / "wd"), "sd35_medium_nft.py", common + [
      "rl.lora_rank=2", "rl.lora_alpha=3.0", f"rl.lora_targets={','.join(LORA_CASE_TARGETS)}"])
  _write_checkpoints(os.path.join(wd, "runs", "nft_ng"), params, loras, 3, lora=True)
  rng = np.random.default_rng(0)
  full = jax.tree_util.tree_map(lambda a: (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32), params)
  wd_full = _write_workdir(str(base / "wd_full"), "sd35_medium_nft.py", common + ["rl.lora_rank=0"])
  _write_checkpoints(os.path.join(wd_full, "runs", "nft_ng"), params, {3: full}, 3, lora=False)
  return dict(wd=wd, run=os.path.join(wd, "runs", "nft_ng"), cfg=cfg, params=params, loras=loras,
              run_full=os.path.join(wd_full, "runs", "nft_ng"), full=full)


def _load_lora(model, out):
  m = copy.deepcopy(model)
  m.load_lora_adapter(str(out), weight_name=export.LORA_WEIGHT_NAME, adapter_name="ng", prefix="transformer")
  return m


def test_export_from_sd3_run_dir(tiny, lora_case, sd3_run, tmp_path, capsys):
  """export-lora / export-full RUN OUT: the latest complete checkpoint, rank / alpha / targets / snapshot from the
  run's config.json; diffusers reproduces our policy velocity from both; --step picks another checkpoint."""
  model, _ = tiny
  r = sd3_run
  cfg, _, (x, t, cond), outs, (_, v) = lora_case
  # the policy velocity of the final checkpoint's adapter (lora_case's compiled forward: a zero second adapter, off)
  pad = jax.tree_util.tree_map(lambda a: np.concatenate([a, np.zeros_like(a)], -1), r["loras"][3])
  ours = np.asarray(v({"params": r["params"], "lora": pad}, jnp.array([[1., 0.]] * 2)))
  cli(["export-lora", r["run"], str(tmp_path / "lora")])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (printed["step"], printed["rank"], printed["alpha"], printed["modules"]) == (3, 2, 3.0, N_LORA_CASE)
  m = _load_lora(model, tmp_path / "lora")
  names = [n for n, _ in m.named_modules() if n.endswith("lora_A.ng")]
  assert len(names) == N_LORA_CASE and sum(".attn2." in n for n in names) == 4  # attn2: only to_q, to_out.0
  err_lora = float(np.max(np.abs(_torch_v(m, x, t, cond) - ours)))
  cli(["export-full", r["run"], str(tmp_path / "full")])
  merged = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "full").eval()
  err_full = float(np.max(np.abs(_torch_v(merged, x, t, cond) - ours)))
  effect = float(np.max(np.abs(ours - outs["base"])))
  print(f"[export] sd3 run: lora err {err_lora:.3g}, merged err {err_full:.3g} (LoRA effect {effect:.3g})")
  assert err_lora <= LORA_TOL and err_full <= LORA_TOL and effect > 100 * LORA_TOL
  # --step 1: that checkpoint's adapter, exactly
  path = cli(["export-lora", r["run"], str(tmp_path / "lora1"), "--step", "1"])
  from safetensors.numpy import load_file
  want, _ = export.lora_state_dict(cfg, r["loras"][1])
  got = load_file(path)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  # full fine-tuning (rl.lora_rank 0): export-full writes the trained weights
  cli(["export-full", r["run_full"], str(tmp_path / "ft")])
  ft = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "ft")
  want = export.transformer_state_dict(dataclasses.replace(cfg, lora_rank=0), r["full"])
  for k, v in ft.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), want[k])


def test_export_from_flux1_run_dir(tmp_path, capsys):
  """FLUX.1-dev run with Flow-Factory's targets (attention + double-block MLPs): both exports match diffusers."""
  from tests.test_flux_parity import make_inputs, torch_velocity
  model = randomize_torch(diffusers.FluxTransformer2DModel(**FLUX1_TINY), seed=3)
  model.save_pretrained(tmp_path / "snap" / "transformer")
  targets = flux.FLUX1_LORA_PRESETS["reference"]
  cfg, params = convert_flux.load_transformer(tmp_path / "snap", scan_layers=True, lora_rank=2, lora_alpha=7.0,
                                              lora_targets=targets)
  params = jax.tree_util.tree_map(np.asarray, params)
  rng = np.random.default_rng(11)
  lora = jax.tree_util.tree_map(lambda l: (0.3 * rng.standard_normal(l.shape)).astype(np.float32),
                                flux.param_shapes(cfg)["lora"])
  wd = _write_workdir(str(tmp_path / "wd"), "flux1_dev_nft.py", [
      f"model.weights_dir={tmp_path / 'snap'}", "rl.iterations=4", "rl.lora_rank=2", "rl.lora_alpha=7.0",
      f"rl.lora_targets={','.join(targets)}"])
  run = os.path.join(wd, "runs", "nft_ng")
  _write_checkpoints(run, params, {5: lora}, 5, lora=True)
  x, t, cond = make_inputs(cfg)
  ours = np.asarray(jax.jit(lambda v: flux.velocity(v, x, t, cond, cfg=cfg))({"params": params, "lora": lora}))
  cli(["export-lora", run, str(tmp_path / "lora")])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["modules"] == 2 * 12 + 2 * 3
  m = _load_lora(model, tmp_path / "lora")
  names = [n for n, _ in m.named_modules() if n.endswith("lora_A.ng")]
  assert len(names) == 2 * 12 + 2 * 3 and sum(".ff" in n for n in names) == 2 * 4
  err_lora = float(np.max(np.abs(torch_velocity(m, cfg, x, t, cond) - ours)))
  cli(["export-full", run, str(tmp_path / "full")])
  merged = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "full").eval()
  err_full = float(np.max(np.abs(torch_velocity(merged, cfg, x, t, cond) - ours)))
  effect = float(np.max(np.abs(ours - torch_velocity(model, cfg, x, t, cond))))
  print(f"[export] flux1 run: lora err {err_lora:.3g}, merged err {err_full:.3g} (LoRA effect {effect:.3g})")
  assert err_lora <= LORA_TOL and err_full <= LORA_TOL and effect > 100 * LORA_TOL


def _fails(capsys, argv, *needles):
  with pytest.raises(SystemExit) as e:
    cli(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  for needle in needles:
    assert needle in err, (needle, err)
  return err


def test_export_errors_say_what_to_pass(tiny, sd3_run, tmp_path, capsys):
  """Each bad argument exits 2, before anything is restored or written, with a message naming what to pass."""
  _, root = tiny
  r = sd3_run
  run, wd, out = r["run"], r["wd"], str(tmp_path / "out")
  step3 = os.path.join(run, "checkpoints", "3")
  for cmd in ("export-lora", "export-full"):
    _fails(capsys, [cmd, step3, out], "is checkpoint 3 of run 'nft_ng'", f"pass the run dir {run} with --step 3")
  _fails(capsys, ["export-lora", os.path.join(step3, "state"), out], "the 'state' item of checkpoint 3",
         f"pass the run dir {run}")
  _fails(capsys, ["export-lora", os.path.join(run, "checkpoints"), out], "checkpoints folder", run)
  _fails(capsys, ["export-lora", wd, out], "is a workdir", os.path.join(wd, "runs", "nft_ng"))
  _fails(capsys, ["export-full", run, out, "--step", "7"], "has no complete checkpoint 7", "[1, 3]")
  _fails(capsys, ["export-lora", run, out, "--lora-alpha", "64"], "--lora-alpha 64.0 contradicts", "(3.0)")
  _fails(capsys, ["export-lora", r["run_full"], out], "rl.lora_rank = 0", "use export-full")
  # a run whose only checkpoint is an interrupted save
  os.makedirs(os.path.join(wd, "runs", "cut", "checkpoints", "2.orbax-checkpoint-tmp-5"))
  _fails(capsys, ["export-lora", os.path.join(wd, "runs", "cut"), out], "no complete checkpoint",
         "2.orbax-checkpoint-tmp-5")
  os.makedirs(os.path.join(wd, "runs", "fresh"))  # a run that has not saved at all
  _fails(capsys, ["export-full", os.path.join(wd, "runs", "fresh"), out], "run 'fresh' has no complete checkpoint")

  def moved(name, weights_dir=None):  # the same run under a config.json that differs (None: a digits config)
    lora = ["rl.lora_rank=2", "rl.lora_alpha=3.0", "rl.lora_targets=" + ",".join(LORA_CASE_TARGETS)]
    w = _write_workdir(str(tmp_path / name), "tiny_digits.py", []) if weights_dir is None else _write_workdir(
        str(tmp_path / name), "sd35_medium_nft.py", [f"model.weights_dir={weights_dir}"] + lora)
    os.symlink(run, os.path.join(w, "runs", "nft_ng"))
    return os.path.join(w, "runs", "nft_ng")

  _fails(capsys, ["export-lora", moved("no_wd", ""), out], "has no model.weights_dir", "pass --config DIR")
  gone = moved("gone", str(tmp_path / "elsewhere"))
  _fails(capsys, ["export-full", gone, out], "does not exist here", "pass --config DIR")
  _fails(capsys, ["export-lora", moved("digits"), out], "digits run", "nothing to export")
  assert not os.path.exists(out)
  cli(["export-lora", gone, out, "--config", str(root)])  # --config repoints the moved snapshot
  assert os.path.isfile(os.path.join(out, export.LORA_WEIGHT_NAME))
  # the older form still works: a state tree, its key, the architecture and alpha by hand
  path = cli(["export-lora", os.path.join(step3, "state"), str(tmp_path / "old"), "--key", "trainable",
              "--config", str(root), "--lora-alpha", "3"])
  from safetensors.numpy import load_file
  want, _ = export.lora_state_dict(r["cfg"], r["loras"][3])
  got = load_file(path)
  assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
