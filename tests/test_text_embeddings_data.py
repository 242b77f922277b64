"""The text-embedding dataset format (data/text_embeddings.py) and the prompt readers, without any encoder: these run
on every stack, torch or not (the encoders' parity against diffusers is tests/test_text_embeddings.py)."""

import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from normguard_jax.data import encode_prompts, prompts as prompt_sets, text_embeddings  # noqa: E402


def test_not_an_embedding_dataset_names_the_layout(tmp_path):
  layout = "Expected DIR/text_embeddings/1.0.0/ with dataset_info.json"
  (tmp_path / "empty").mkdir()
  with pytest.raises(text_embeddings.NotTextEmbeddingsError, match="it is empty") as e:
    text_embeddings.load_text_embeddings(tmp_path / "empty")
  assert layout in str(e.value) and "encode_prompts" in str(e.value)
  with pytest.raises(FileNotFoundError, match="no such directory"):  # NotTextEmbeddingsError is one
    text_embeddings.splits(tmp_path / "missing")
  out = prompt_sets.write_prompt_set(tmp_path / "sets", prompt_sets.TINY_PROMPTS, "plain")
  for d in (tmp_path / "sets", out):  # a prompt-set OUT dir, or its version dir
    with pytest.raises(text_embeddings.NotTextEmbeddingsError, match="a prompt set") as e:
      text_embeddings.load_text_embeddings(d)
    assert layout in str(e.value) and f"encode_prompts SNAPSHOT {d} DIR" in str(e.value)


def _examples(n, offset, shape=(3, 4), pooled=2):
  return [{"prompt": f"p{offset + i}", "prompt_embeds": np.full(shape, offset + i, np.float32),
           "pooled": np.full((pooled,), -i, np.float32)} for i in range(n)]


def test_add_split_is_all_or_nothing(tmp_path):
  shapes, meta = dict(seq_len=3, embed_dim=4, pooled_dim=2), {"family": "sd3", "max_sequence_length": 1}
  ds_dir = text_embeddings.write_text_embeddings(tmp_path, _examples(3, 0), metadata=meta, **shapes)
  contents = sorted(os.listdir(ds_dir))

  def dies():
    yield from _examples(2, 10)
    raise RuntimeError("encoder died")

  with pytest.raises(RuntimeError, match="encoder died"):
    text_embeddings.add_split(tmp_path, dies(), split="test", metadata=meta, **shapes)
  with pytest.raises(ValueError, match="example 1"):
    text_embeddings.add_split(tmp_path, _examples(1, 0) + _examples(1, 5, shape=(3, 5)), split="test",
                              metadata=meta, **shapes)
  assert text_embeddings.splits(tmp_path) == {"train": 3} and sorted(os.listdir(ds_dir)) == contents
  assert os.listdir(os.path.dirname(ds_dir)) == ["1.0.0"]
  with pytest.raises(text_embeddings.IncompatibleSplitError, match=r"pooled shape: existing \(2,\), new \(5,\)"):
    text_embeddings.add_split(tmp_path, _examples(1, 0, pooled=5), split="test", metadata=meta,
                              **dict(shapes, pooled_dim=5))
  text_embeddings.add_split(tmp_path, _examples(2, 10), split="test", metadata=meta, split_metadata={"n": 2},
                            **shapes)
  text_embeddings.add_split(ds_dir, _examples(1, 20), split="negative", **shapes)  # the version dir; no metadata
  assert text_embeddings.splits(tmp_path) == {"negative": 1, "test": 2, "train": 3}
  test = text_embeddings.load_text_embeddings(tmp_path, "test")
  assert test.split_metadata == {"n": 2} and test.family == "sd3" and len(test) == 2
  np.testing.assert_array_equal(test[1]["prompt_embeds"], np.full((3, 4), 11, np.float32))
  assert [text_embeddings.load_text_embeddings(tmp_path)[i]["prompt"] for i in range(3)] == ["p0", "p1", "p2"]
  with pytest.raises(FileExistsError, match="--split NAME"):
    text_embeddings.write_text_embeddings(tmp_path, _examples(1, 0), **shapes)


def test_read_prompts(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("a cat\n\n  a dog  \n", encoding="utf-8")
  assert encode_prompts.read_prompts(str(txt)) == ["a cat", "  a dog  "]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x"}\n{"text": "y"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    encode_prompts.read_prompts(str(bad))
