"""Offline SD3 text encoding (data/encode_prompts.py) and its tfds cache (data/text_embeddings.py).

Tiny random CLIP-L / CLIP-G / T5 encoders and locally built tokenizers (a small BPE CLIP vocabulary, a
unigram T5 vocabulary; nothing downloaded) are saved in a diffusers SD3 pipeline layout. Our embeddings are
compared with diffusers' own ``StableDiffusion3Pipeline.encode_prompt`` on the same components (the
pipeline is built with transformer=None, vae=None), within 1e-5; then written through the CLI and read back.
"""

import json
import string

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("tensorflow_datasets")

from normguard_jax.data import encode_prompts, text_embeddings  # noqa: E402

TOL = 1e-5
CLIP_LEN, T5_LEN = 12, 10
PROMPTS = ["the cat", "a dog", "the dog sits on a cat and then a very long tail of words gets truncated here",
           "", "Zebra ünïcode 123"]


def _clip_tokenizer():
  letters = list(string.ascii_lowercase)
  vocab = {}
  for tok in (["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
              + ["th", "the</w>", "ca", "cat</w>", "do", "dog</w>"]):
    vocab.setdefault(tok, len(vocab))
  merges = [tuple(m.split()) for m in ("t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>")]
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LEN)


def _t5_tokenizer():
  letters = list(string.ascii_lowercase)
  pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in letters]
            + [("\u2581" + w, -1.0) for w in ("the", "cat", "dog", "a")])
  return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("sd3_text")
  clip_tok = _clip_tokenizer()
  for i, (hidden, proj) in enumerate(((16, 8), (24, 12))):
    cfg = transformers.CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=CLIP_LEN,
                                      projection_dim=proj, hidden_act="gelu", eos_token_id=clip_tok.eos_token_id,
                                      bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id)
    transformers.CLIPTextModelWithProjection(cfg).eval().save_pretrained(root / f"text_encoder{'_2' if i else ''}")
    clip_tok.save_pretrained(root / f"tokenizer{'_2' if i else ''}")
  t5_tok = _t5_tokenizer()
  t5_cfg = transformers.T5Config(vocab_size=len(t5_tok), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
  transformers.T5EncoderModel(t5_cfg).eval().save_pretrained(root / "text_encoder_3")
  t5_tok.save_pretrained(root / "tokenizer_3")
  return root


def _diffusers_reference(root, prompts):
  """diffusers' own encode_prompt on the same local components."""
  load = dict(local_files_only=True)
  pipe = diffusers.StableDiffusion3Pipeline(
      transformer=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
      text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", **load),
      text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", **load),
      text_encoder_3=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_3", **load),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer", **load),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer_2", **load),
      tokenizer_3=transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_3", **load))
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
    np.testing.assert_allclose(ex["prompt_embeds"], embeds[i], atol=1e-6)  # batch of 2 vs 5: same within fp32
    np.testing.assert_allclose(ex["pooled"], pooled[i], atol=1e-6)
  assert [ex["prompt"] for ex in src.__getitems__([3, 1])] == [PROMPTS[3], PROMPTS[1]]
  assert text_embeddings.load_text_embeddings(out)[1]["prompt"] == PROMPTS[1]  # the version dir works too
  with pytest.raises(FileExistsError):
    encode_prompts.main([str(pipeline_dir), str(prompts_file), str(tmp_path / "ds")])
  with pytest.raises(KeyError, match="split 'test'"):
    text_embeddings.load_text_embeddings(tmp_path / "ds", split="test")


def test_read_prompts(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
  assert encode_prompts.read_prompts(str(txt)) == ["a cat", "  a dog  "]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x"}\n{"text": "y"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    encode_prompts.read_prompts(str(bad))


# ---- FLUX.1 (CLIP-L pooled + T5) and FLUX.2-klein (Qwen3 hidden states), same dataset format ----

FLUX_T5_LEN, QWEN_LEN = 10, 32


@pytest.fixture
def one_thread():
  """Tiny models are op-overhead bound; on a loaded shared CPU torch's intra-op threads only cost time."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def flux1_dir(tmp_path_factory):
  """A tiny FLUX.1 pipeline layout: text_encoder (CLIPTextModel), tokenizer, text_encoder_2 (T5), tokenizer_2."""
  torch.manual_seed(1)
  root = tmp_path_factory.mktemp("flux1_text")
  clip_tok = _clip_tokenizer()
  cfg = transformers.CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LEN,
                                    projection_dim=8, hidden_act="quick_gelu", eos_token_id=clip_tok.eos_token_id,
                                    bos_token_id=clip_tok.bos_token_id, pad_token_id=clip_tok.pad_token_id)
  transformers.CLIPTextModel(cfg).eval().save_pretrained(root / "text_encoder")
  clip_tok.save_pretrained(root / "tokenizer")
  t5_tok = _t5_tokenizer()
  t5_cfg = transformers.T5Config(vocab_size=len(t5_tok), d_model=24, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
  transformers.T5EncoderModel(t5_cfg).eval().save_pretrained(root / "text_encoder_2")
  t5_tok.save_pretrained(root / "tokenizer_2")
  (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
  return root


# Qwen3's chat template, reduced to what Flux2KleinPipeline uses (user turns, generation prompt, thinking off)
_QWEN3_TEMPLATE = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{%- if enable_thinking is defined and enable_thinking is false %}"
                   "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def _qwen_tokenizer():
  """A byte-level BPE tokenizer (all 256 byte symbols, a few merges) with Qwen's special tokens."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  vocab = {}
  for tok in list(bytes_to_unicode().values()) + ["th", "the", "\u0120c", "\u0120ca", "\u0120cat", "\u010a\u010a"]:
    vocab.setdefault(tok, len(vocab))
  merges = [tuple(m.split()) for m in ("t h", "th e", "\u0120 c", "\u0120c a", "\u0120ca t", "\u010a \u010a")]
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
  tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
  tok.add_special_tokens({"additional_special_tokens": specials[1:]})
  tok.chat_template = _QWEN3_TEMPLATE
  return tok


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
  """A tiny FLUX.2-klein layout: text_encoder (Qwen3ForCausalLM, 28 layers so the default 9/18/27 exist)."""
  torch.manual_seed(2)
  root = tmp_path_factory.mktemp("flux2_text")
  tok = _qwen_tokenizer()
  cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=28,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                 max_position_embeddings=64, tie_word_embeddings=True,
                                 pad_token_id=tok.pad_token_id, initializer_range=0.2)
  transformers.Qwen3ForCausalLM(cfg).eval().save_pretrained(root / "text_encoder")
  tok.save_pretrained(root / "tokenizer")
  (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}), encoding="utf-8")
  return root


def _flux1_reference(root, prompts):
  load = dict(local_files_only=True)
  pipe = diffusers.FluxPipeline(
      transformer=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
      text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder", **load),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer", **load),
      text_encoder_2=transformers.T5EncoderModel.from_pretrained(root / "text_encoder_2", **load),
      tokenizer_2=transformers.T5TokenizerFast.from_pretrained(root / "tokenizer_2", **load))
  with torch.no_grad():
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu",
                                           max_sequence_length=FLUX_T5_LEN)
  return embeds.numpy(), pooled.numpy()


def _flux2_reference(root, prompts):
  load = dict(local_files_only=True)
  pipe = diffusers.Flux2KleinPipeline(
      transformer=None, vae=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
      text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder", **load),
      tokenizer=transformers.Qwen2TokenizerFast.from_pretrained(root / "tokenizer", **load))
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
  assert encode_prompts.detect_family(pipeline_dir) == "sd3"  # no model_index.json: from the encoders' configs
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
    np.testing.assert_allclose(ex["pooled"], pooled[i], atol=1e-6)
  assert np.stack([src[i]["pooled"] for i in range(2)]).shape == (2, pooled.shape[1])  # batches stack
