"""scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [-1, 1], NHWC."""

import numpy as np


def load_digits():
  """Returns (images float32 (N, 8, 8, 1) in [-1, 1], labels int32 (N,))."""
  from sklearn import datasets  # bundled with scikit-learn; nothing is fetched
  d = datasets.load_digits()
  images = (d.images.astype(np.float32) / 16.0) * 2.0 - 1.0
  return images[..., None], d.target.astype(np.int32)
