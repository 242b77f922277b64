"""The tiny random snapshots of ``python -m normguard_jax.tools.tiny_snapshot`` (the dry-run path of the README):
each family is built through the CLI, loads in diffusers with its own pipeline class and generates, converts with
our strict converters, and its text encoders produce embeddings of exactly the widths its transformer takes; the
tiny PickScore loads in the pickscore reward and scores images."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax.convert import flux as convert_flux  # noqa: E402
from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.convert import vae as convert_vae  # noqa: E402
from normguard_jax.data import encode_prompts  # noqa: E402
from normguard_jax.tools import tiny_snapshot  # noqa: E402

FAMILIES = tiny_snapshot.FAMILIES
SUBDIRS = {"sd35": {"scheduler", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                    "tokenizer_2", "tokenizer_3"},
           "flux1": {"scheduler", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"},
           "flux2-klein": {"scheduler", "transformer", "vae", "text_encoder", "tokenizer"}}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
  """{family: dir} built by the CLI, plus "pickscore"; prints each family's build time."""
  root = tmp_path_factory.mktemp("tiny")
  out = {}
  for family in FAMILIES:
    extra = ["--pickscore", str(root / "pickscore")] if family == "sd35" else []
    res = tiny_snapshot.main([str(root / family), "--family", family, "--seed", "3", *extra])
    print(f"[tiny_snapshot] {family}: built in {res['seconds']} s")
    out[family] = res["out"]
  out["pickscore"] = str(root / "pickscore")
  return out


@pytest.fixture
def one_thread():
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.mark.parametrize("family", FAMILIES)
def test_layout(snapshots, family):
  d = snapshots[family]
  with open(os.path.join(d, "model_index.json"), encoding="utf-8") as f:
    index = json.load(f)
  assert index["_class_name"] == tiny_snapshot.PIPELINE_CLASS[family]
  assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == SUBDIRS[family]
  assert {e for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))} == SUBDIRS[family]
  assert os.path.isfile(os.path.join(d, "transformer", "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(d, "tiny_snapshot.json"), encoding="utf-8") as f:
    info = json.load(f)
  assert info["family"] == family and info["seed"] == 3 and info["random_weights"]


_CALL = {"sd35": dict(guidance_scale=1.0), "flux1": dict(guidance_scale=3.5), "flux2-klein": dict(guidance_scale=4.0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_loads_and_generates(snapshots, family, one_thread):
  cls = getattr(diffusers, tiny_snapshot.PIPELINE_CLASS[family])
  pipe = cls.from_pretrained(snapshots[family], local_files_only=True)
  images = pipe(prompt=["a cat", "Zebra \u00fcn\u00efcode 123, \"quoted\"!"], height=16, width=16,
                num_inference_steps=2, max_sequence_length=8, output_type="np",
                generator=torch.Generator().manual_seed(0), **_CALL[family]).images
  assert images.shape == (2, 16, 16, 3) and np.all(np.isfinite(images))
  assert images.std() > 0.05 and np.abs(images[0] - images[1]).max() > 0.05  # random weights, not zeros
  ids = pipe.tokenizer(["Zebra \u00fcn\u00efcode 123!"]).input_ids[0]  # byte-level BPE: no unknown token
  assert pipe.tokenizer.unk_token_id not in (ids[1:-1] if family != "flux2-klein" else ids)  # CLIP: unk = EOS


@pytest.mark.parametrize("family", FAMILIES)
def test_converters_load_and_encoders_fit(snapshots, family, one_thread):
  d = snapshots[family]
  if family == "sd35":
    cfg, params = convert_sd3.load_transformer(d, as_jax=False)
    assert cfg.qk_norm == "rms_norm" and tuple(cfg.dual_attention_layers) == (0, 1)
    enc = encode_prompts.SD3TextEncoder(d, max_sequence_length=8)
    assert (enc.embed_dim, enc.pooled_dim) == (cfg.joint_attention_dim, cfg.pooled_projection_dim)
  else:
    cfg, params = convert_flux.load_transformer(d, as_jax=False)
    if family == "flux1":
      assert cfg.guidance_embeds and cfg.class_name == "FluxTransformer2DModel"
      enc = encode_prompts.FluxTextEncoder(d, max_sequence_length=8)
      assert enc.pooled_dim == cfg.pooled_projection_dim
    else:
      assert not cfg.guidance_embeds and cfg.class_name == "Flux2Transformer2DModel"
      enc = encode_prompts.Flux2TextEncoder(d, max_sequence_length=8)  # default layers 9 / 18 / 27
    assert enc.embed_dim == cfg.joint_attention_dim
  vcfg, vparams = convert_vae.load_vae(d, as_jax=False)
  assert vcfg.latent_batch_norm == (family == "flux2-klein") and vcfg.downsample_factor == 2
  latent = cfg.in_channels if family == "sd35" else cfg.latent_channels
  assert vcfg.latent_channels == latent
  embeds, _ = enc.encode(["a cat", "a dog"])
  assert embeds.shape == (2, enc.seq_len, enc.embed_dim) and np.abs(embeds[0] - embeds[1]).max() > 1e-3


def test_pickscore_reward_loads_and_scores(snapshots):
  from normguard_jax.rewards import clip_rewards
  from normguard_jax.rewards.api import RewardBatch
  d = snapshots["pickscore"]
  assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(os.listdir(d))
  reward = clip_rewards.build_pickscore({"model_dir": d})
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  a = np.asarray(reward(RewardBatch(images=images, prompts=["a cat", "a dog"])))
  b = np.asarray(reward(RewardBatch(images=images, prompts=["a dog", "a dog"])))
  assert a.shape == (2,) and np.all(np.isfinite(a)) and a[0] != b[0] and a[1] == pytest.approx(b[1], abs=1e-6)


def test_cli_refuses_a_non_empty_out(snapshots, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    tiny_snapshot.main([snapshots["flux1"], "--family", "flux1"])
  assert e.value.code == 2 and "not an empty directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # --pickscore checked before anything is written
    tiny_snapshot.main([str(tmp_path / "new"), "--pickscore", snapshots["pickscore"]])
  assert not (tmp_path / "new").exists()
