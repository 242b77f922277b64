"""Cached text embeddings (SD3, FLUX.1, FLUX.2-klein) as a tfds dataset in array_record format (DESIGN.md §6),
without TensorFlow.

Layout (:data:`LAYOUT`): ``DIR/text_embeddings/1.0.0/`` holds ``dataset_info.json`` (the splits), ``features.json``,
``metadata.json`` and one ``text_embeddings-<split>.array_record-NNNNN-of-NNNNN`` file set per split (``train``,
``test``, ``negative``, ...). Every function here takes DIR or the version dir itself.

One example per prompt: ``prompt`` (text), ``prompt_embeds`` (float32 (L, D)) and ``pooled`` (float32 (P,)).
SD3: L = 77 CLIP tokens + the T5 tokens, D the T5 width, P both CLIP projections. FLUX.1: L the T5 tokens,
D the T5 width, P the CLIP-L width. FLUX.2-klein has no pooled vector: ``pooled`` is stored with shape (0,)
(tfds writes and reads empty tensors; a batch stacks to (B, 0), which FLUX.2's ``cond`` ignores), and the
metadata says ``pooled: "none"``; :attr:`TextEmbeddingSource.has_pooled` is False. The metadata also records
``family`` (sd3 / flux1 / flux2; absent, i.e. ``family`` None, in datasets written without it),
``max_sequence_length`` and the other encoder settings, which all splits share, and per split
``metadata["splits"][split]`` (e.g. ``num_prompts``, the prompts file).

:func:`write_text_embeddings` builds a new dataset from any iterator of such examples (``data/encode_prompts.py``
feeds it from the real encoders); :func:`add_split` adds a split to an existing one (same shapes and encoder
settings, :func:`check_compatible`; the existing splits are not touched, an existing split is never overwritten);
:func:`splits` lists the splits present; :func:`load_text_embeddings` returns a random-access source (``tfds``
``as_data_source``) of one split, of dicts with the prompt decoded to ``str``, for grain or a plain index sampler.
A directory that is not such a dataset (empty, or a prompt set from ``data/prompts.py``) raises
:class:`NotTextEmbeddingsError`, which names the expected layout. Nothing here imports torch or TensorFlow.
"""

import dataclasses
import glob
import json
import os
import re
import shutil
import tempfile
from typing import Dict, Iterable, Optional

import numpy as np

NAME = "text_embeddings"
VERSION = "1.0.0"
FEATURES = ("prompt", "prompt_embeds", "pooled")
LAYOUT = (f"DIR/{NAME}/{VERSION}/ with dataset_info.json, features.json, metadata.json and "
          f"{NAME}-<split>.array_record-NNNNN-of-NNNNN files (features {', '.join(FEATURES)}), as written by "
          f"`python -m normguard_jax.data.encode_prompts SNAPSHOT PROMPTS DIR`")
# Encoder settings that every split of one dataset must share (besides the feature shapes).
ENCODING_KEYS = ("family", "max_sequence_length", "tokenizer_max_length", "clip_skip", "use_t5",
                 "hidden_states_layers", "pooled")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class NotTextEmbeddingsError(FileNotFoundError):
  """The directory is not a text-embedding dataset; the message names the expected layout."""


class IncompatibleSplitError(ValueError):
  """A new split does not fit the dataset's existing splits; the message names both values."""


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


def check_split_name(split):
  if not isinstance(split, str) or not _SPLIT_RE.match(split):
    raise ValueError(f"split name {split!r} must be letters, digits or _ (e.g. train, test, negative)")


def _checked(examples, seq_len, embed_dim, pooled_dim):
  """Examples with shapes and finiteness checked, as float32 arrays (lazily, in order)."""
  want = {"prompt_embeds": (seq_len, embed_dim), "pooled": (pooled_dim,)}
  for i, ex in enumerate(examples):
    for k, shape in want.items():
      a = np.asarray(ex[k])
      if a.shape != shape or not np.all(np.isfinite(a)):
        raise ValueError(f"example {i} ({ex['prompt']!r}): {k} has shape {a.shape} (expected {shape}) "
                         f"or non-finite values")
    yield {"prompt": ex["prompt"], "prompt_embeds": np.asarray(ex["prompt_embeds"], np.float32),
           "pooled": np.asarray(ex["pooled"], np.float32)}


def _prepare(data_dir, examples, *, seq_len, embed_dim, pooled_dim, split, metadata, description):
  builder = _builder_cls()(feature_dict=features(seq_len, embed_dim, pooled_dim),
                           examples=_checked(examples, seq_len, embed_dim, pooled_dim), split=split,
                           metadata=dict(metadata or {}), description=description, data_dir=data_dir,
                           file_format="array_record")
  builder.download_and_prepare()
  return builder


def write_text_embeddings(data_dir, examples: Iterable[Dict], *, seq_len: int, embed_dim: int, pooled_dim: int,
                          split: str = "train", metadata: Optional[dict] = None, description: str = "",
                          split_metadata: Optional[dict] = None) -> str:
  """Writes a NEW dataset of one split from ``examples`` (dicts with FEATURES; consumed lazily, in order) and
  returns its dir ``<data_dir>/text_embeddings/1.0.0``. ``pooled_dim=0`` (FLUX.2: no pooled vector) stores (0,)
  arrays. ``metadata``: the encoder settings (shared by all splits); ``split_metadata``: this split's own
  (stored as ``metadata["splits"][split]``). Refuses a prepared dataset: use :func:`add_split` for a new split."""
  check_split_name(split)
  data_dir = os.path.abspath(os.fspath(data_dir))
  target = os.path.join(data_dir, NAME, VERSION)
  if os.path.exists(os.path.join(target, "dataset_info.json")):
    raise FileExistsError(f"{target}: a text-embedding dataset is already prepared there (splits "
                          f"{sorted(splits(target))}); add a split with another name (encode_prompts --split NAME) "
                          f"or choose another --out")
  meta = dict(metadata or {}, splits={split: dict(split_metadata or {})})
  return _prepare(data_dir, examples, seq_len=seq_len, embed_dim=embed_dim, pooled_dim=pooled_dim, split=split,
                  metadata=meta, description=description).data_dir


def _features_of(ds_dir) -> Optional[dict]:
  """The feature names -> spec of ``ds_dir/features.json``, or None when unreadable."""
  try:
    with open(os.path.join(ds_dir, "features.json"), encoding="utf-8") as f:
      return dict(json.load(f)["featuresDict"]["features"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _is_embeddings(ds_dir) -> bool:
  feats = _features_of(ds_dir)
  return feats is not None and set(FEATURES) <= set(feats)


def _not_embeddings(path, found) -> NotTextEmbeddingsError:
  from normguard_jax.data import prompts as prompt_sets  # plain stdlib + numpy at import
  if prompt_sets.is_prompt_set_dir(path):
    what = ("it holds a prompt set (written by `python -m normguard_jax.data.prompts`), not prompt embeddings; "
            f"encode it first: `python -m normguard_jax.data.encode_prompts SNAPSHOT {path} DIR`, then pass DIR")
  elif found:
    what = f"the dataset(s) {found} have other features than {list(FEATURES)}"
  elif os.path.isdir(path) and not os.listdir(path):
    what = "it is empty"
  else:
    what = "no dataset_info.json here, nor in text_embeddings/<version>/"
  return NotTextEmbeddingsError(f"{path}: not a text-embedding dataset: {what}. Expected {LAYOUT}.")


def find_dataset_dir(path) -> str:
  """``path`` itself when it is a text-embedding dataset dir, else the one ``text_embeddings/<version>`` (or
  ``<anything>/<version>``) below it; the newest version when several. Raises :class:`NotTextEmbeddingsError`."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise NotTextEmbeddingsError(f"{path}: no such directory. Expected {LAYOUT}.")
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    found = [path]
  else:
    found = sorted(glob.glob(os.path.join(path, NAME, "*", "dataset_info.json")))
    found += sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")))
    found = [os.path.dirname(f) for f in found]  # glob skips the hidden temp dirs of writes in progress
  good = [d for d in found if _is_embeddings(d)]
  if not good:
    raise _not_embeddings(path, found)
  return good[-1]


def _builder(path):
  return _tfds().builder_from_directory(find_dataset_dir(path))


def splits(path) -> Dict[str, int]:
  """``{split: number of examples}`` of the text-embedding dataset at ``path`` (e.g. ``"test" in splits(d)``)."""
  return {name: int(s.num_examples) for name, s in sorted(_builder(path).info.splits.items())}


def _metadata(info) -> dict:
  return dict(info.metadata.items()) if info.metadata is not None else {}


def describe(path) -> dict:
  """The dataset's dir, splits (``{name: examples}``), feature shapes and metadata, without reading examples."""
  info = _builder(path).info
  return {"dataset_dir": os.fspath(info.data_dir), "splits": {k: int(s.num_examples) for k, s in sorted(
      info.splits.items())}, "prompt_embeds_shape": tuple(info.features["prompt_embeds"].shape),
          "pooled_shape": tuple(info.features["pooled"].shape), "metadata": _metadata(info)}


def _norm(v):
  return json.loads(json.dumps(v))  # tuples -> lists, as metadata.json stores them


def check_compatible(path, *, seq_len: Optional[int] = None, embed_dim: Optional[int] = None,
                     pooled_dim: Optional[int] = None, metadata: Optional[dict] = None,
                     split: Optional[str] = None) -> dict:
  """Raises :class:`IncompatibleSplitError` (naming the existing and the new value of every difference) unless
  a split with these shapes and encoder ``metadata`` (:data:`ENCODING_KEYS`; a key missing on either side, or a
  shape given as None, is not compared) fits the dataset at ``path``; and FileExistsError when ``split`` is
  already there. Returns :func:`describe`'s dict."""
  d = describe(path)
  if split is not None and split in d["splits"]:
    raise FileExistsError(f"{d['dataset_dir']}: split {split!r} already exists ({d['splits'][split]} prompts); "
                          f"splits are never overwritten: choose another split name or another --out")
  diffs = []
  for what, have, new in (("prompt_embeds shape", d["prompt_embeds_shape"], (seq_len, embed_dim)),
                          ("pooled shape", d["pooled_shape"], (pooled_dim,))):
    if None not in new and tuple(have) != tuple(new):
      diffs.append(f"{what}: existing {tuple(have)}, new {tuple(new)}")
  old_meta, new_meta = d["metadata"], dict(metadata or {})
  for k in ENCODING_KEYS:
    if k in old_meta and k in new_meta and _norm(old_meta[k]) != _norm(new_meta[k]):
      diffs.append(f"{k}: existing {old_meta[k]!r}, new {new_meta[k]!r}")
  if diffs:
    raise IncompatibleSplitError(
        f"{d['dataset_dir']}: the new split{'' if split is None else f' {split!r}'} does not fit the existing "
        f"splits {sorted(d['splits'])}: {'; '.join(diffs)}. Encode it with the same snapshot and settings "
        f"(--max-sequence-length etc.), or into another --out")
  return d


def add_split(path, examples: Iterable[Dict], *, split: str, seq_len: int, embed_dim: int, pooled_dim: int,
              metadata: Optional[dict] = None, split_metadata: Optional[dict] = None) -> str:
  """Adds ``split`` to the existing dataset at ``path`` and returns its dir. Checked first
  (:func:`check_compatible`: same shapes and encoder settings, a new split name). The split is written into a
  hidden temp dir beside the dataset, then its files are moved in and ``dataset_info.json`` / ``metadata.json``
  replaced, so a failure (e.g. while encoding) leaves the dataset as it was."""
  check_split_name(split)
  ds_dir = check_compatible(path, seq_len=seq_len, embed_dim=embed_dim, pooled_dim=pooled_dim, metadata=metadata,
                            split=split)["dataset_dir"]
  tfds = _tfds()
  tmp = tempfile.mkdtemp(prefix=f".add-{split}-", dir=os.path.dirname(ds_dir))
  try:
    new = _prepare(tmp, examples, seq_len=seq_len, embed_dim=embed_dim, pooled_dim=pooled_dim, split=split,
                   metadata={}, description="")
    new_split = new.info.splits[split]
    info = tfds.builder_from_directory(ds_dir).info
    if split in info.splits:  # written meanwhile by another process
      raise FileExistsError(f"{ds_dir}: split {split!r} already exists")
    for f in new_split.filepaths:
      os.replace(os.fspath(f), os.path.join(ds_dir, os.path.basename(os.fspath(f))))
    moved = dataclasses.replace(new_split, filename_template=new_split.filename_template.replace(
        data_dir=type(new_split.filename_template.data_dir)(ds_dir)))
    info.set_splits(tfds.core.SplitDict(list(info.splits.values()) + [moved]))
    meta = _metadata(info)
    meta["splits"] = dict(meta.get("splits") or {}, **{split: dict(split_metadata or {})})
    stage = os.path.join(tmp, ".info")
    os.makedirs(stage)
    with open(os.path.join(stage, "metadata.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f)
    info.write_dataset_info_json(stage)
    os.replace(os.path.join(stage, "metadata.json"), os.path.join(ds_dir, "metadata.json"))
    os.replace(os.path.join(stage, "dataset_info.json"), os.path.join(ds_dir, "dataset_info.json"))  # the commit
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return ds_dir


class TextEmbeddingSource:
  """Random access over one split: ``src[i]`` -> dict(prompt=str, prompt_embeds=(L, D), pooled=(P,));
  P = 0 (``has_pooled`` False) for FLUX.2. ``family`` and ``metadata`` come from the dataset info,
  ``split_metadata`` is this split's entry of ``metadata["splits"]`` ({} for datasets written without it)."""

  def __init__(self, data_source, info, split="train"):
    self._src = data_source
    self.info = info
    self.split = split
    self.metadata = _metadata(info)
    self.split_metadata = dict((self.metadata.get("splits") or {}).get(split) or {})
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
    return (f"TextEmbeddingSource({self.family}, split {self.split!r}, {len(self)} examples, prompt_embeds "
            f"{self.prompt_embeds_shape}, pooled {self.pooled_shape})")


def load_text_embeddings(path, split: str = "train") -> TextEmbeddingSource:
  """Random-access source over one split of a dataset written by :func:`write_text_embeddings` /
  :func:`add_split` (its dir or the data_dir above it). KeyError (listing the splits) for a missing split."""
  builder = _builder(path)
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in {sorted(builder.info.splits)} ({builder.data_dir}); add it with "
                   f"`python -m normguard_jax.data.encode_prompts SNAPSHOT PROMPTS {builder.data_dir} --split {split}`")
  return TextEmbeddingSource(builder.as_data_source(split=split), builder.info, split)
