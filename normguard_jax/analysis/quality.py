"""Quality proxies the reward does not see.

Digits (:class:`DigitQuality`, the CPU default):

* ``class_conf``: a logistic-regression digit classifier's probability of the prompted class.
* ``nn_dist``: mean L2 distance of each sample to its nearest real digit of the prompted class.
* ``frechet``: Fréchet distance between the sample set and the real digits (pixel space, 64-d).
* ``out_of_range``: fraction of pixel values outside the data range [-1, 1] (over-saturation).
Samples are clipped to [-1, 1] first, as a display would, except for ``out_of_range``.

Text-to-image (:class:`ImageStats`, decoded RGB pixels): the symptoms of velocity-norm inflation that paper.md §2.2
describes (over-saturation, blown-out contrast, high-frequency artefacts), as pixel statistics; semantic quality is
the rewards' and the MLLM judge's (analysis/judge.py) job.
* ``out_of_range``: fraction of decoded values outside [-1, 1] before clipping (over-saturation).
* ``clipped_frac``: fraction of displayed channel values at 0 or 255 (blown highlights, crushed shadows).
* ``saturation``: mean HSV saturation of the displayed image.
* ``contrast``: mean per-image standard deviation of luma (Rec. 601) in [0, 1].
* ``hf_energy``: mean |discrete Laplacian| of luma (sharpness, and high-frequency artefacts).
"""

import functools

import numpy as np
from scipy import linalg

from normguard_jax.data import digits


def _frechet(a, b):
  mu_a, mu_b = a.mean(0), b.mean(0)
  ridge = 1e-6 * np.eye(a.shape[1])  # small sets give singular covariances
  ca, cb = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
  covmean = linalg.sqrtm(ca @ cb)
  covmean = np.real(covmean)
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2.0 * covmean))


class DigitQuality:
  def __init__(self, seed=0):
    from sklearn.linear_model import LogisticRegression
    images, labels = digits.load_digits()
    self.real = images.reshape(len(images), -1).astype(np.float64)
    self.labels = labels
    self.clf = LogisticRegression(max_iter=3000, C=1.0, random_state=seed).fit(self.real, labels)

  def __call__(self, samples, cond):
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    cond = np.asarray(cond)
    xc = np.clip(x, -1.0, 1.0)
    probs = self.clf.predict_proba(xc)
    conf = probs[np.arange(len(xc)), cond]
    dists = np.empty(len(xc))
    for c in np.unique(cond):
      real_c = self.real[self.labels == c]
      sel = cond == c
      d2 = ((xc[sel, None, :] - real_c[None]) ** 2).sum(-1)
      dists[sel] = np.sqrt(d2.min(1))
    return {"class_conf": float(conf.mean()), "class_acc": float((probs.argmax(1) == cond).mean()),
            "nn_dist": float(dists.mean()), "frechet": _frechet(xc, self.real),
            "out_of_range": float((np.abs(x) > 1.0).mean())}


class ImageStats:
  labels = {"out_of_range": "fraction of decoded values outside [-1, 1] (lower = better)",
            "clipped_frac": "fraction of displayed values at 0 or 255 (lower = better)",
            "saturation": "mean HSV saturation (compare with the reference)",
            "contrast": "mean luma std (compare with the reference)",
            "hf_energy": "mean |Laplacian| of luma (compare with the reference)"}

  def __call__(self, samples, cond=None):
    del cond
    x = np.asarray(samples, np.float64)
    shown = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    quantised = np.round(shown * 255.0)
    rgb = shown if shown.shape[-1] == 3 else np.repeat(shown[..., :1], 3, axis=-1)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    lap = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
           - luma[:, 1:-1, 2:])
    return {"out_of_range": float((np.abs(x) > 1.0).mean()),
            "clipped_frac": float(((quantised == 0) | (quantised == 255)).mean()),
            "saturation": float(sat.mean()), "contrast": float(luma.reshape(len(x), -1).std(1).mean()),
            "hf_energy": float(np.abs(lap).mean())}


@functools.lru_cache(maxsize=2)
def digit_quality(seed):
  """The digits proxies (a classifier fit, seconds), built once per process."""
  return DigitQuality(seed=seed)


def for_task(task, seed=0):
  """The proxies for a task: the digits classifier and distances, else the pixel statistics of ImageStats."""
  return digit_quality(int(seed)) if task.name == "digits" else ImageStats()


def labels_for(task):
  return dict(task.quality_labels) if task.name == "digits" else dict(ImageStats.labels)
