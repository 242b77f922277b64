"""Cached text embeddings (SD3, FLUX.1, FLUX.2-klein) as a tfds dataset in array_record format (DESIGN.md §6),
without TensorFlow.

One example per prompt: ``prompt`` (text), ``prompt_embeds`` (float32 (L, D)) and ``pooled`` (float32 (P,)).
SD3: L = 77 CLIP tokens + the T5 tokens, D the T5 width, P both CLIP projections. FLUX.1: L the T5 tokens,
D the T5 width, P the CLIP-L width. FLUX.2-klein has no pooled vector: ``pooled`` is stored with shape (0,)
(tfds writes and reads empty tensors; a batch stacks to (B, 0), which FLUX.2's ``cond`` ignores), and the
metadata says ``pooled: "none"``; :attr:`TextEmbeddingSource.has_pooled` is False. The metadata also records
``family`` (sd3 / flux1 / flux2; absent, i.e. ``family`` None, in datasets written without it) and
``max_sequence_length``. :func:`write_text_embeddings` builds
the dataset from any iterator of such examples (``data/encode_prompts.py`` feeds it from the real encoders);
:func:`load_text_embeddings` returns a random-access source (``tfds`` ``as_data_source``) of dicts with the
prompt decoded to ``str``, for grain or a plain index sampler. Nothing here imports torch or TensorFlow.
"""

import glob
import os
from typing import Dict, Iterable, Optional

import numpy as np

NAME = "text_embeddings"
VERSION = "1.0.0"
FEATURES = ("prompt", "prompt_embeds", "pooled")


def _tfds():
  import tensorflow_datasets as tfds  # heavy import, only when a dataset is written or read
  return tfds


def features(seq_len: int, embed_dim: int, pooled_dim: int):
  tfds = _tfds()
  return tfds.features.FeaturesDict({
      "prompt": tfds.features.Text(),
      "prompt_embeds": tfds.features.Tensor(shape=(seq_len, embed_dim), dtype=np.float32),
      "pooled": tfds.features.Tensor(shape=(pooled_dim,), dtype=np.float32),
  })


def _builder_cls():
  tfds = _tfds()

  class TextEmbeddingsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A generator builder over examples given at construction (one split); order kept (no shuffling)."""
    name = NAME
    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, feature_dict, examples, split, metadata, description, **kwargs):
      self._feature_dict, self._examples, self._split = feature_dict, examples, split
      self._metadata, self._description = metadata, description
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=self._description, features=self._feature_dict,
                                   disable_shuffling=True, metadata=tfds.core.MetadataDict(self._metadata))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {self._split: self._generate_examples()}

    def _generate_examples(self):
      for i, ex in enumerate(self._examples):
        yield i, ex

  return TextEmbeddingsBuilder


def write_text_embeddings(data_dir, examples: Iterable[Dict], *, seq_len: int, embed_dim: int, pooled_dim: int,
                          split: str = "train", metadata: Optional[dict] = None, description: str = "") -> str:
  """Writes ``examples`` (dicts with FEATURES; consumed lazily, in order) and returns the dataset dir
  ``<data_dir>/text_embeddings/1.0.0``. ``pooled_dim=0`` (FLUX.2: no pooled vector) stores (0,) arrays.
  Refuses to overwrite a prepared dataset."""
  data_dir = os.path.abspath(os.fspath(data_dir))
  target = os.path.join(data_dir, NAME, VERSION)
  if os.path.exists(os.path.join(target, "dataset_info.json")):
    raise FileExistsError(f"{target}: a text-embedding dataset is already prepared there; choose another --out")

  def checked():
    for i, ex in enumerate(examples):
      want = {"prompt_embeds": (seq_len, embed_dim), "pooled": (pooled_dim,)}
      for k, shape in want.items():
        a = np.asarray(ex[k])
        if a.shape != shape or not np.all(np.isfinite(a)):
          raise ValueError(f"example {i} ({ex['prompt']!r}): {k} has shape {a.shape} (expected {shape}) "
                           f"or non-finite values")
      yield {"prompt": ex["prompt"], "prompt_embeds": np.asarray(ex["prompt_embeds"], np.float32),
             "pooled": np.asarray(ex["pooled"], np.float32)}

  builder = _builder_cls()(feature_dict=features(seq_len, embed_dim, pooled_dim), examples=checked(), split=split,
                           metadata=dict(metadata or {}), description=description, data_dir=data_dir,
                           file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


def find_dataset_dir(path) -> str:
  """``path`` itself when it holds ``dataset_info.json``, else the one ``text_embeddings/<version>`` below it."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(path, NAME, "*", "dataset_info.json")))
  found += sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")))
  if not found:
    raise FileNotFoundError(f"{path}: no text-embedding dataset (no dataset_info.json here, nor in "
                            f"{NAME}/<version>/)")
  return os.path.dirname(found[-1])  # the newest version


class TextEmbeddingSource:
  """Random access over one split: ``src[i]`` -> dict(prompt=str, prompt_embeds=(L, D), pooled=(P,));
  P = 0 (``has_pooled`` False) for FLUX.2. ``family`` and ``metadata`` come from the dataset info."""

  def __init__(self, data_source, info):
    self._src = data_source
    self.info = info
    self.metadata = dict(info.metadata or {})
    self.prompt_embeds_shape = tuple(info.features["prompt_embeds"].shape)
    self.pooled_shape = tuple(info.features["pooled"].shape)
    self.family = self.metadata.get("family")  # sd3 / flux1 / flux2; None if the writer did not record it
    self.has_pooled = self.pooled_shape != (0,)  # FLUX.2: pooled is an empty (0,) vector

  def __len__(self):
    return len(self._src)

  @staticmethod
  def _decode(ex):
    p = ex["prompt"]
    return {"prompt": p.decode("utf-8") if isinstance(p, bytes) else str(p),
            "prompt_embeds": ex["prompt_embeds"], "pooled": ex["pooled"]}

  def __getitem__(self, i):
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {n} examples")
    return self._decode(self._src[i % n])

  def __getitems__(self, indices):
    return [self._decode(ex) for ex in self._src.__getitems__(list(indices))]

  def __repr__(self):
    return (f"TextEmbeddingSource({self.family}, {len(self)} examples, prompt_embeds {self.prompt_embeds_shape}, "
            f"pooled {self.pooled_shape})")


def load_text_embeddings(path, split: str = "train") -> TextEmbeddingSource:
  """Random-access source over a dataset written by :func:`write_text_embeddings` (or its parent dir)."""
  builder = _tfds().builder_from_directory(find_dataset_dir(path))
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in {sorted(builder.info.splits)} ({builder.data_dir})")
  missing = set(FEATURES) - set(builder.info.features.keys())
  if missing:
    raise ValueError(f"{builder.data_dir}: not a text-embedding dataset (missing features {sorted(missing)})")
  return TextEmbeddingSource(builder.as_data_source(split=split), builder.info)
