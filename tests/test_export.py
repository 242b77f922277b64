"""Export back to diffusers (convert/export.py, convert/__main__.py), checked by diffusers itself.

A tiny random SD3.5-style diffusers transformer (qk RMSNorm, dual attention, scanned and unscanned runs) is
converted by our strict converter; the export must (a) as a full transformer dir, give back diffusers' state
dict bit for bit and identical outputs through ``from_pretrained``; (b) as a PEFT LoRA, loaded with
``load_lora_adapter``, reproduce our LoRA velocity (1e-4 abs; in practice ~1e-6) and leave the model
unchanged when the adapter is disabled.
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

from normguard_jax.convert import export  # noqa: E402
from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.convert.__main__ import main as cli  # noqa: E402
from normguard_jax.convert.safetensors_io import ConversionError  # noqa: E402
from normguard_jax.models import mmdit  # noqa: E402
from tests.torch_helpers import randomize_torch

LORA_TOL = 1e-4
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
  lora = mmdit.init_lora(cfg, jax.random.PRNGKey(seed))
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      0.3 * jax.random.normal(k, l.shape[:-1] + (n_adapters,)) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def lora_case(tiny):
  """Our side, computed once: LoRA velocities of adapter 0 and 1 (two stacked adapters) and the base."""
  model, root = tiny
  cfg, params = convert_sd3.load_transformer(root, scan_layers=True, lora_rank=2, lora_alpha=3.0)
  lora = _random_lora(cfg, n_adapters=2)  # the export must take index 0
  x, t, cond = _inputs(cfg)
  v = jax.jit(lambda g: mmdit.velocity({"params": params, "lora": lora}, x, t, cond, cfg=cfg, lora_gate=g))
  gates = {"policy": [[1., 0.]] * 2, "other": [[0., 1.]] * 2, "base": [[0., 0.]] * 2}
  outs = {k: np.asarray(v(jnp.array(g))) for k, g in gates.items()}
  return cfg, lora, (x, t, cond), outs


@pytest.mark.parametrize("fold_alpha,how", [(True, "pipeline"), (False, "pipeline"), (False, "file"), (True, "dict")])
def test_lora_export_matches_peft(tiny, lora_case, tmp_path, fold_alpha, how):
  """how: 'pipeline' = StableDiffusion3Pipeline.lora_state_dict + load_lora_into_transformer (what
  pipe.load_lora_weights does for the transformer); 'file' = transformer.load_lora_adapter(dir); 'dict' = a
  state dict without metadata (diffusers then assumes alpha = r, so only the folded form applies)."""
  pytest.importorskip("peft")
  model, _ = tiny
  cfg, lora, (x, t, cond), ours = lora_case
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
  # every adapted projection was created (8 joint + 4 attn2 on dual blocks, 8 plain, 7 context_pre_only)
  n_lora = sum(1 for n, _ in m.named_modules() if n.endswith("lora_A.ng"))
  assert n_lora == 2 * 12 + 8 + 7
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
  cfg, lora, _, _ = lora_case
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
