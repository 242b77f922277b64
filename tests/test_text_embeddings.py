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
