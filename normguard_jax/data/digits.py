"""scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [-1, 1], NHWC.

Two disjoint halves, fixed once and stratified by class, keep the learned reward and the quality proxies
independent (issue 16): part ``"A"`` trains the reward's classifier (rewards/digit_classifier.py), part ``"B"``
trains the proxies' classifier and is their real-data reference set (analysis/quality.py). The split is a
permutation drawn by ``np.random.RandomState(0)``, whose stream NumPy keeps frozen (NEP 19), so it is the same
on every machine and version; within each class the permuted images alternate A, B, A, ... (A gets the odd one).
The generator's pretraining uses all digits (``part=None``). The data has no writer ids, so a writer may appear
in both parts.
"""

import functools

import numpy as np

PARTS = ("A", "B")
_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_all():
  from sklearn import datasets  # bundled with scikit-learn; nothing is fetched
  d = datasets.load_digits()
  images = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
  images, labels = images[..., None], d.target.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


@functools.lru_cache(maxsize=1)
def split_indices():
  """{"A": idx, "B": idx}: disjoint sorted int64 indices into the full set, covering it, stratified by class."""
  _, labels = _load_all()
  order = np.random.RandomState(_SPLIT_SEED).permutation(len(labels))
  parts = {"A": [], "B": []}
  for c in np.unique(labels):
    members = order[labels[order] == c]
    parts["A"].append(members[0::2])
    parts["B"].append(members[1::2])
  out = {p: np.sort(np.concatenate(v)) for p, v in parts.items()}
  for v in out.values():
    v.setflags(write=False)
  return out


def load_digits(part=None):
  """Returns (images float32 (N, 8, 8, 1) in [-1, 1], labels int32 (N,)): all 1797 digits (``part=None``) or
  one half of the fixed split (``part="A"`` or ``"B"``). Fresh arrays: the caller may modify them."""
  images, labels = _load_all()
  if part is None:
    return images.copy(), labels.copy()
  if part not in PARTS:
    raise ValueError(f"digits part must be None, 'A' or 'B', got {part!r}")
  idx = split_indices()[part]
  return images[idx], labels[idx]
