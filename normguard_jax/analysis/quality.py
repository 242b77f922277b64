"""Quality proxies the reward does not see, for the digits default.

* ``class_conf``: a logistic-regression digit classifier's probability of the prompted class.
* ``nn_dist``: mean L2 distance of each sample to its nearest real digit of the prompted class.
* ``frechet``: Fréchet distance between the sample set and the real digits (pixel space, 64-d).
* ``out_of_range``: fraction of pixel values outside the data range [-1, 1] (over-saturation).
Samples are clipped to [-1, 1] first, as a display would, except for ``out_of_range``.
"""

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
