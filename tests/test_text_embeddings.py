"""Offline prompt encoding (data/encode_prompts.py) and its tfds cache (data/text_embeddings.py).

The pipelines are the tiny random snapshots of ``python -m normguard_jax.tools.tiny_snapshot`` (the user's dry-run
path): CLIP-L / CLIP-G / T5, CLIP-L / T5 and Qwen3 with locally built tokenizers; nothing is downloaded. Our
embeddings are compared with diffusers' own ``encode_prompt`` on the same components, written through the CLI and
read back; a second CLI run adds a ``test`` split to the same dataset, and every misuse (same split, other family
or settings, a dir that is not an embedding dataset) is refused with a message naming both sides.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tensorflow_datasets")

from normguard_jax.data import encode_prompts, prompts as prompt_sets, text_embeddings  # noqa: E402
from normguard_jax.tools import tiny_snapshot  # noqa: E402

TOL = 1e-5
CLIP_LEN, T5_LEN = tiny_snapshot.CLIP_MAX_LENGTH, 10
PROMPTS = ["the cat", "a dog", "the dog sits on a cat and then a very long tail of words gets truncated here",
           "", "Zebra \u00fcn\u00efcode 123"]


@pytest.fixture
def one_thread():
  """Tiny models are op-overhead bound; on a loaded shared CPU torch's intra-op threads only cost time."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """The tiny SD3.5 snapshot (CLIP-L 16 / proj 8, CLIP-G 24 / proj 12, T5 48)."""
  return tiny_snapshot.build(tmp_path_factory.mktemp("snap") / "sd35", "sd35")


def _diffusers_reference(root, prompts):
  """diffusers' own encode_prompt, the pipeline loaded from the snapshot dir by diffusers."""
  pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(root, transformer=None, vae=None, local_files_only=True)
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
  return embeds.numpy(), pooled.numpy()


def test_encoder_matches_diffusers_encode_prompt(pipeline_dir):
  enc = encode_prompts.SD3TextEncoder(pipeline_dir, max_sequence_length=T5_LEN)
  embeds, pooled = enc.encode(PROMPTS)
  ref_embeds, ref_pooled = _diffusers_reference(pipeline_dir, PROMPTS)
  assert embeds.shape == ref_embeds.shape == (len(PROMPTS), CLIP_LEN + T5_LEN, 48)
  assert pooled.shape == ref_pooled.shape == (len(PROMPTS), 8 + 12)
  e_err, p_err = float(np.abs(embeds - ref_embeds).max()), float(np.abs(pooled - ref_pooled).max())
  print(f"[text] vs diffusers encode_prompt: prompt_embeds max abs err {e_err:.3g}, pooled {p_err:.3g}")
  assert e_err <= TOL and p_err <= TOL
  # the layout the transformer expects: CLIP (16 + 24 wide, zero-padded to 48) then T5, and not degenerate
  assert np.all(embeds[:, :CLIP_LEN, 40:] == 0) and np.abs(embeds[:, CLIP_LEN:]).max() > 0.1
  assert np.abs(embeds[0] - embeds[1]).max() > 1e-3


def test_cli_writes_tfds_array_record_and_reads_back(pipeline_dir, tmp_path):
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)),
                          encoding="utf-8")
  out = encode_prompts.main([str(pipeline_dir), str(prompts_file), str(tmp_path / "ds"), "--batch-size", "2",
                             "--max-sequence-length", str(T5_LEN)])
  assert any(f.name.startswith("text_embeddings-train.array_record") for f in (tmp_path / "ds").glob("**/*"))
  src = text_embeddings.load_text_embeddings(tmp_path / "ds")
  assert len(src) == len(PROMPTS) and src.prompt_embeds_shape == (CLIP_LEN + T5_LEN, 48)
  assert src.metadata["max_sequence_length"] == T5_LEN and src.metadata["num_prompts"] == len(PROMPTS)
  enc = encode_prompts.SD3TextEncoder(pipeline_dir, max_sequence_length=T5_LEN)
  embeds, pooled = enc.encode(PROMPTS)
  for i in (4, 0, 2):  # random access, order kept
    ex = src[i]
    assert ex["prompt"] == PROMPTS[i]
    assert ex["prompt_embeds"].dtype == np.float32 and ex["pooled"].shape == (20,)
    np.testing.assert_allclose(ex["prompt_embeds"], embeds[i], rtol=1e-5, atol=1e-6)  # batch of 2 vs 5: fp32 noise
    np.testing.assert_allclose(ex["pooled"], pooled[i], rtol=1e-5, atol=1e-6)
  assert [ex["prompt"] for ex in src.__getitems__([3, 1])] == [PROMPTS[3], PROMPTS[1]]
  assert text_embeddings.load_text_embeddings(out)[1]["prompt"] == PROMPTS[1]  # the version dir works too
  assert src.split == "train" and src.split_metadata["num_prompts"] == len(PROMPTS)
  assert src.split_metadata["prompts_source"] == str(prompts_file)
  with pytest.raises(KeyError, match="split 'test'"):
    text_embeddings.load_text_embeddings(tmp_path / "ds", split="test")


def _refused(argv, capsys, *needles):
  """encode_prompts.main exits 2 with every needle in its one-line error, before encoding anything."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    encode_prompts.main(argv)
  err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading progress bars
  assert e.value.code == 2 and err.startswith("error: "), err
  for needle in needles:
    assert needle in err, (needle, err)


def test_cli_adds_a_test_split_and_refuses_misuse(pipeline_dir, flux1_dir, tmp_path, capsys, one_thread):
  train_prompts, test_prompts = ["a cat", "the dog", "a red cube"], ["a blue dog", "the cat of the house"]
  (tmp_path / "train.txt").write_text("\n".join(train_prompts) + "\n", encoding="utf-8")
  (tmp_path / "test.txt").write_text("\n".join(test_prompts) + "\n", encoding="utf-8")
  ds = tmp_path / "ds"

  def argv(prompts_file, *extra, snapshot=pipeline_dir, length=T5_LEN):
    return [str(snapshot), str(tmp_path / prompts_file), str(ds), "--max-sequence-length", str(length), *extra]

  encode_prompts.main(argv("train.txt"))
  ds_dir = text_embeddings.find_dataset_dir(ds)
  train_files = {f: (ds_dir + "/" + f) for f in os.listdir(ds_dir) if "-train." in f}
  train_bytes = {f: open(p, "rb").read() for f, p in train_files.items()}
  capsys.readouterr()
  assert encode_prompts.main(argv("test.txt", "--split", "test")) == ds_dir
  assert "adding split 'test' (2 prompts)" in capsys.readouterr().err
  assert text_embeddings.splits(ds) == {"test": 2, "train": 3}
  assert {f: open(p, "rb").read() for f, p in train_files.items()} == train_bytes  # the train split untouched
  train, test = (text_embeddings.load_text_embeddings(ds, s) for s in ("train", "test"))
  assert [ex["prompt"] for ex in train.__getitems__(range(3))] == train_prompts
  assert [ex["prompt"] for ex in test.__getitems__(range(2))] == test_prompts
  assert test.split_metadata["num_prompts"] == 2 and train.split_metadata["num_prompts"] == 3
  assert test.prompt_embeds_shape == train.prompt_embeds_shape == (CLIP_LEN + T5_LEN, 48)
  embeds, pooled = encode_prompts.SD3TextEncoder(pipeline_dir, max_sequence_length=T5_LEN).encode(test_prompts)
  np.testing.assert_allclose(test[1]["prompt_embeds"], embeds[1], atol=1e-6)
  np.testing.assert_allclose(test[1]["pooled"], pooled[1], atol=1e-6)

  _refused(argv("test.txt", "--split", "test"), capsys, "split 'test' already exists (2 prompts)",
           "never overwritten")
  _refused(argv("test.txt"), capsys, "split 'train' already exists (3 prompts)")
  _refused(argv("test.txt", "--split", "val", snapshot=flux1_dir), capsys, "does not fit the existing splits",
           "family: existing 'sd3', new 'flux1'")
  _refused(argv("test.txt", "--split", "val", length=12), capsys, "max_sequence_length: existing 10, new 12")
  _refused(argv("test.txt", "--split", "val", "--no-t5", "--joint-attention-dim", "40"), capsys,  # after loading
           f"prompt_embeds shape: existing ({CLIP_LEN + T5_LEN}, 48), new ({CLIP_LEN + T5_LEN}, 40)",
           "use_t5: existing True, new False")
  _refused(argv("test.txt", "--split", "held-out"), capsys, "split name 'held-out'")
  _refused(argv("missing.txt", "--split", "val"), capsys, "missing.txt")
  assert text_embeddings.splits(ds) == {"test": 2, "train": 3}
  assert os.listdir(os.path.dirname(ds_dir)) == ["1.0.0"]  # no temp dir left behind
  prompt_set = prompt_sets.write_prompt_set(tmp_path / "sets", str(tmp_path / "test.txt"), "plain")
  _refused([str(pipeline_dir), str(tmp_path / "test.txt"), prompt_set], capsys, "prompt set", "choose another OUT")
  _refused([str(tmp_path / "nowhere"), str(tmp_path / "test.txt"), str(ds)], capsys, "PIPELINE_DIR")


# ---- FLUX.1 (CLIP-L pooled + T5) and FLUX.2-klein (Qwen3 hidden states), same dataset format ----

FLUX_T5_LEN, QWEN_LEN = 10, 32


@pytest.fixture(scope="module")
def flux1_dir(tmp_path_factory):
  """The tiny FLUX.1-dev snapshot: CLIP-L (CLIPTextModel, 16 wide) + T5 (24 wide)."""
  return tiny_snapshot.build(tmp_path_factory.mktemp("snap") / "flux1", "flux1")


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
  """The tiny FLUX.2-klein snapshot: Qwen3ForCausalLM, 28 layers of 16 so the default 9/18/27 exist."""
  return tiny_snapshot.build(tmp_path_factory.mktemp("snap") / "flux2", "flux2-klein")


def _flux1_reference(root, prompts):
  pipe = diffusers.FluxPipeline.from_pretrained(root, transformer=None, vae=None, local_files_only=True)
  with torch.no_grad():
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu",
                                           max_sequence_length=FLUX_T5_LEN)
  return embeds.numpy(), pooled.numpy()


def _flux2_reference(root, prompts):
  pipe = diffusers.Flux2KleinPipeline.from_pretrained(root, transformer=None, vae=None, local_files_only=True)
  with torch.no_grad():
    embeds, _ = pipe.encode_prompt(prompt=prompts, device="cpu", max_sequence_length=QWEN_LEN)
  return embeds.numpy()


def test_flux1_encoder_matches_diffusers_encode_prompt(flux1_dir, one_thread):
  enc = encode_prompts.FluxTextEncoder(flux1_dir, max_sequence_length=FLUX_T5_LEN)
  embeds, pooled = enc.encode(PROMPTS)
  ref_embeds, ref_pooled = _flux1_reference(flux1_dir, PROMPTS)
  assert embeds.shape == ref_embeds.shape == (len(PROMPTS), FLUX_T5_LEN, 24)
  assert pooled.shape == ref_pooled.shape == (len(PROMPTS), 16)
  e_err, p_err = float(np.abs(embeds - ref_embeds).max()), float(np.abs(pooled - ref_pooled).max())
  print(f"[flux1] vs diffusers FluxPipeline.encode_prompt: prompt_embeds max abs err {e_err:.3g}, pooled {p_err:.3g}")
  assert e_err <= 1e-6 and p_err <= 1e-6
  assert np.abs(embeds[0] - embeds[1]).max() > 1e-3 and np.abs(pooled[0] - pooled[1]).max() > 1e-3


def test_flux2_klein_encoder_matches_diffusers_encode_prompt(flux2_dir, one_thread):
  enc = encode_prompts.Flux2TextEncoder(flux2_dir, max_sequence_length=QWEN_LEN)
  embeds, pooled = enc.encode(PROMPTS)
  ref = _flux2_reference(flux2_dir, PROMPTS)
  assert embeds.shape == ref.shape == (len(PROMPTS), QWEN_LEN, 3 * 16) and pooled.shape == (len(PROMPTS), 0)
  err = float(np.abs(embeds - ref).max())
  print(f"[flux2] vs diffusers Flux2KleinPipeline.encode_prompt: prompt_embeds max abs err {err:.3g} "
        f"(|embeds| max {np.abs(ref).max():.3g})")
  assert err <= 1e-6
  mask = enc._input_ids(PROMPTS)["attention_mask"].numpy()
  assert mask[2].all() and not mask[0].all()  # the long prompt is truncated, the short ones padded
  assert np.abs(embeds[0] - embeds[1]).max() > 1e-3


def test_flux_family_detection(flux1_dir, flux2_dir, pipeline_dir, tmp_path):
  assert encode_prompts.detect_family(flux1_dir) == "flux1"
  assert encode_prompts.detect_family(flux2_dir) == "flux2"
  (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}), encoding="utf-8")
  with pytest.raises(ValueError, match="FLUX.2-dev"):
    encode_prompts.detect_family(tmp_path)
  assert encode_prompts.detect_family(pipeline_dir) == "sd3"
  bare = tmp_path / "bare"  # no model_index.json: from the encoders' configs
  for sub in ("text_encoder", "text_encoder_2"):
    (bare / sub).mkdir(parents=True)
    shutil.copy(os.path.join(pipeline_dir, sub, "config.json"), bare / sub)
  assert encode_prompts.detect_family(bare) == "sd3"
  with pytest.raises(FileNotFoundError, match="--family"):
    encode_prompts.detect_family(tmp_path / "nothing")
  with pytest.raises(SystemExit):  # sd3-only flag for a FLUX family
    encode_prompts.main([str(flux1_dir), "p.txt", str(tmp_path / "x"), "--clip-skip", "1"])


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_flux_cli_writes_dataset_and_reads_back(family, flux1_dir, flux2_dir, tmp_path, one_thread):
  root, length = (flux1_dir, FLUX_T5_LEN) if family == "flux1" else (flux2_dir, QWEN_LEN)
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("\n".join(p for p in PROMPTS if p) + "\n", encoding="utf-8")
  prompts = [p for p in PROMPTS if p]
  encode_prompts.main([str(root), str(prompts_file), str(tmp_path / "ds"), "--batch-size", "3",
                       "--max-sequence-length", str(length)])  # family from model_index.json
  src = text_embeddings.load_text_embeddings(tmp_path / "ds")
  assert len(src) == len(prompts) and src.family == family
  assert src.metadata["family"] == family and src.metadata["max_sequence_length"] == length
  if family == "flux1":
    enc = encode_prompts.FluxTextEncoder(root, max_sequence_length=length)
    assert src.has_pooled and src.pooled_shape == (16,) and src.metadata["pooled"] == "clip_l pooler_output"
  else:
    enc = encode_prompts.Flux2TextEncoder(root, max_sequence_length=length)
    assert not src.has_pooled and src.pooled_shape == (0,) and src.metadata["pooled"] == "none"
    assert src.metadata["hidden_states_layers"] == [9, 18, 27]
  assert src.prompt_embeds_shape == (enc.seq_len, enc.embed_dim)
  embeds, pooled = enc.encode(prompts)
  for i, ex in zip((3, 0), src.__getitems__([3, 0])):
    assert ex["prompt"] == prompts[i] and ex["pooled"].shape == pooled[i].shape
    np.testing.assert_allclose(ex["prompt_embeds"], embeds[i], atol=1e-6)
    np.testing.assert_allclose(ex["pooled"], pooled[i], rtol=1e-5, atol=1e-6)
  assert np.stack([src[i]["pooled"] for i in range(2)]).shape == (2, pooled.shape[1])  # batches stack
