"""Quality proxies the reward does not see.

Digits (:class:`DigitQuality`, the CPU default), from models and data that the learned reward
(rewards/digit_classifier.py, a CNN on digits part A) never saw (issue 16). The reference set R is digits part B
(data/digits.py): a scikit-learn MLP (64 -> 32 ReLU units) is trained on R, and R is what the distances compare to.

* ``class_conf``: the MLP's probability of the prompted class.
* ``class_acc``: whether the MLP's most probable class is the prompted one.
* ``nn_dist``: L2 distance (64 pixels) of each sample to its nearest digit of the prompted class in R.
* ``fid``: Fréchet distance (Heusel et al. 2017, the FID formula) between the samples and R in the MLP's last hidden
  layer (32-d): an FID for digits. Like FID it is biased upwards for small sets: compare it at equal set size.
* ``out_of_range``: fraction of pixel values outside the data range [-1, 1] (over-saturation).
Samples are clipped to [-1, 1] first, as a display would, except for ``out_of_range``.

The real-data level (:meth:`DigitQuality.real_level`) is measured on digits of part A, which neither the MLP nor R
contain, drawn with the eval set's class composition and size, so that it is what a perfect generator would score
on the same protocol (a sample inside R would have ``nn_dist`` 0 and a biased-low ``fid``). The FID of n real
digits falls with n: 2.5 ± 0.5 (mean ± sd over 8 disjoint sets) at n = 100, 0.47 for all 901 of part A. Part B
does not train the reward, part A does not train the proxies; the generator's pretraining uses both.

The pixel-space Fréchet distance that this module reported before is gone. On 100 perturbed real digits (contrast
x1.5, blur, noise, dimming, a one-pixel shift, mode collapse, binarisation) both distances rose for every
perturbation, the feature-space one by a larger factor over its real-data level for all but binarisation (equal,
3.5x), so the pixel one added no separate signal.

Every proxy is a function of per-sample arrays (:meth:`DigitQuality.per_sample`), so that statistics can resample
eval samples (analysis/matched.py): means over samples, and set statistics (``set_stats``: the Fréchet distance)
recomputed on a resample by a vectorised :class:`FrechetToReference`.

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

from normguard_jax.data import digits

DIGIT_LABELS = {"class_conf": "held-out MLP's confidence in the prompted class (higher = better)",
                "class_acc": "held-out MLP's accuracy on the prompted class (higher = better)",
                "nn_dist": "distance to the nearest real digit of the class (lower = better)",
                "fid": "Fréchet distance to real digits in the MLP's features (lower = better)",
                "out_of_range": "fraction of pixels outside [-1, 1] (lower = better)"}


class FrechetToReference:
  """Fréchet distance of feature sets to a fixed reference set R (the FID formula):

      d^2 = |mu - mu_R|^2 + tr(C + C_R - 2 (C_R^1/2 C C_R^1/2)^1/2)

  using tr((C C_R)^1/2) = tr((C_R^1/2 C C_R^1/2)^1/2) for symmetric PSD matrices: one symmetric eigendecomposition
  per set, batched over leading axes (a bootstrap's resamples at once). C_R^1/2 is computed once. Covariances are
  unbiased (n - 1) with a 1e-6 ridge on both (small sets give singular covariances)."""

  def __init__(self, reference, ridge=1e-6):
    ref = np.asarray(reference, np.float64)
    if ref.ndim != 2 or len(ref) < 2:
      raise ValueError(f"FrechetToReference: reference must be (n >= 2, F) features, got shape {ref.shape}")
    self.ridge = float(ridge)
    self.mu = ref.mean(0)
    self.cov = np.cov(ref, rowvar=False) + self.ridge * np.eye(ref.shape[1])
    w, v = np.linalg.eigh(self.cov)
    self.sqrt_cov = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    self.tr_cov = float(np.trace(self.cov))

  def __call__(self, feats):
    """feats (..., n, F) -> (...,) distances (a float for one set)."""
    x = np.asarray(feats, np.float64)
    if x.ndim < 2 or x.shape[-1] != self.mu.shape[0] or x.shape[-2] < 2:
      raise ValueError(f"FrechetToReference: features must be (..., n >= 2, {self.mu.shape[0]}), got {x.shape}")
    n = x.shape[-2]
    mu = x.mean(-2)
    # (X^T X - n mu mu^T) / (n - 1): float64, and no centred copy of a resample batch (a large allocation)
    cov = (np.swapaxes(x, -1, -2) @ x - n * mu[..., :, None] * mu[..., None, :]) / (n - 1)
    cov = cov + self.ridge * np.eye(x.shape[-1])
    ev = np.linalg.eigvalsh(self.sqrt_cov @ cov @ self.sqrt_cov)
    d = (np.sum((mu - self.mu) ** 2, -1) + np.trace(cov, axis1=-2, axis2=-1) + self.tr_cov
         - 2.0 * np.sqrt(np.clip(ev, 0.0, None)).sum(-1))
    return float(d) if d.ndim == 0 else d


def _select(per_sample, idx):
  return per_sample if idx is None else {k: np.asarray(v)[np.asarray(idx)] for k, v in per_sample.items()}


class DigitQuality:
  """``per_sample(samples, cond)`` -> {proxy: (N,)} and {"features": (N, 32)}; ``aggregate(per_sample, idx)`` ->
  {proxy: float}; ``__call__(samples, cond)`` = both. ``set_stats``: {name: (per-sample key, vectorised fn)}."""

  labels = DIGIT_LABELS
  means = ("class_conf", "class_acc", "nn_dist", "out_of_range")
  hidden = (64, 32)

  def __init__(self, seed=0):
    from sklearn.neural_network import MLPClassifier
    images, labels = digits.load_digits("B")
    self.real = images.reshape(len(images), -1).astype(np.float64)
    self.real_labels = labels
    self.clf = MLPClassifier(hidden_layer_sizes=self.hidden, alpha=1e-3, max_iter=500,
                             random_state=seed).fit(self.real, labels)  # adam; stops on its tolerance (~160 epochs)
    self.set_stats = {"fid": ("features", FrechetToReference(self.features(self.real)))}
    self._real_a = digits.load_digits("A")
    self._real_order = np.random.RandomState(2).permutation(len(self._real_a[1]))

  def features(self, x):
    """(N, 64) clipped pixels -> (N, 32): the MLP's last hidden layer (ReLU)."""
    h = np.asarray(x, np.float64)
    for w, b in zip(self.clf.coefs_[:-1], self.clf.intercepts_[:-1]):
      h = np.maximum(h @ w + b, 0.0)
    return h

  def per_sample(self, samples, cond):
    """{"class_conf", "class_acc", "nn_dist", "out_of_range": (N,) float64, "features": (N, 32) float64}."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    cond = np.asarray(cond)
    if cond.shape != (len(x),):
      raise ValueError(f"DigitQuality: cond must be ({len(x)},) class labels, got shape {cond.shape}")
    if x.shape[1] != self.real.shape[1]:
      raise ValueError(f"DigitQuality: samples must be 8x8 digits, got shape {np.shape(samples)}")
    bad = sorted(set(np.unique(cond).tolist()) - set(np.unique(self.real_labels).tolist()))
    if bad:
      raise ValueError(f"DigitQuality: cond holds labels {bad} that are not digit classes")
    xc = np.clip(x, -1.0, 1.0)
    probs = self.clf.predict_proba(xc)
    dists = np.empty(len(xc))
    for c in np.unique(cond):
      real_c = self.real[self.real_labels == c]
      sel = cond == c
      d2 = ((xc[sel, None, :] - real_c[None]) ** 2).sum(-1)
      dists[sel] = np.sqrt(d2.min(1))
    return {"class_conf": probs[np.arange(len(xc)), cond], "class_acc": (probs.argmax(1) == cond).astype(np.float64),
            "nn_dist": dists, "out_of_range": (np.abs(x) > 1.0).mean(1), "features": self.features(xc)}

  def aggregate(self, per_sample, idx=None):
    """{proxy: float} of per-sample arrays, on rows ``idx`` (a resample, repeats allowed) or all of them."""
    ps = _select(per_sample, idx)
    out = {k: float(np.mean(ps[k])) for k in self.means}
    out.update({name: float(fn(ps[key])) for name, (key, fn) in self.set_stats.items()})
    return {k: out[k] for k in self.labels}

  def __call__(self, samples, cond):
    return self.aggregate(self.per_sample(samples, cond))

  def real_digits(self, cond, draw=0):
    """Real digits of part A with the class composition of ``cond`` (row i has class cond[i]): the ``draw``-th of
    the disjoint draws from a fixed shuffle of part A."""
    cond = np.asarray(cond)
    images, labels = self._real_a
    shuffled = labels[self._real_order]
    rows = np.empty(len(cond), np.int64)
    for c in np.unique(cond):
      sel = np.flatnonzero(cond == c)
      pool = self._real_order[shuffled == c]
      lo, hi = draw * len(sel), (draw + 1) * len(sel)
      if hi > len(pool):
        raise ValueError(f"DigitQuality.real_digits: draw {draw} of {len(sel)} rows of class {c} needs {hi} digits, "
                         f"part A holds {len(pool)}")
      rows[sel] = pool[lo:hi]
    return images[rows], labels[rows]

  def max_draws(self, cond):
    """How many disjoint draws of ``cond``'s class composition part A holds."""
    cond = np.asarray(cond)
    labels = self._real_a[1]
    return int(min((labels == c).sum() // (cond == c).sum() for c in np.unique(cond)))

  def real_per_sample(self, cond, draw=0):
    """Per-sample proxies of real digits (part A) laid out like ``cond``: the real-data level, resamplable."""
    images, labels = self.real_digits(cond, draw)
    return self.per_sample(images, labels)

  def real_level(self, cond, draws=1):
    """{proxy: float} on real digits of part A with ``cond``'s class composition and size, averaged over ``draws``
    disjoint draws (None: as many as part A holds, e.g. 8 at 10 per class), which steadies the set statistics."""
    draws = self.max_draws(cond) if draws is None else int(draws)
    levels = [self.aggregate(self.real_per_sample(cond, d)) for d in range(draws)]
    return {k: float(np.mean([lv[k] for lv in levels])) for k in self.labels}


class ImageStats:
  labels = {"out_of_range": "fraction of decoded values outside [-1, 1] (lower = better)",
            "clipped_frac": "fraction of displayed values at 0 or 255 (lower = better)",
            "saturation": "mean HSV saturation (compare with the reference)",
            "contrast": "mean luma std (compare with the reference)",
            "hf_energy": "mean |Laplacian| of luma (compare with the reference)"}

  means = tuple(labels)
  set_stats = {}

  def per_sample(self, samples, cond=None):
    """{stat: (N,)}: each image's own value (every image has the same pixel count, so their mean is the set's)."""
    del cond
    x = np.asarray(samples, np.float64)
    n = len(x)
    shown = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
    quantised = np.round(shown * 255.0)
    rgb = shown if shown.shape[-1] == 3 else np.repeat(shown[..., :1], 3, axis=-1)
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    lap = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
           - luma[:, 1:-1, 2:])
    return {"out_of_range": (np.abs(x) > 1.0).reshape(n, -1).mean(1),
            "clipped_frac": ((quantised == 0) | (quantised == 255)).reshape(n, -1).mean(1),
            "saturation": sat.reshape(n, -1).mean(1), "contrast": luma.reshape(n, -1).std(1),
            "hf_energy": np.abs(lap).reshape(n, -1).mean(1)}

  def aggregate(self, per_sample, idx=None):
    ps = _select(per_sample, idx)
    return {k: float(np.mean(ps[k])) for k in self.means}

  def __call__(self, samples, cond=None):
    return self.aggregate(self.per_sample(samples, cond))


@functools.lru_cache(maxsize=2)
def digit_quality(seed):
  """The digits proxies (a classifier fit, seconds), built once per process."""
  return DigitQuality(seed=seed)


def for_task(task, seed=0):
  """The proxies for a task: the digits classifier and distances, else the pixel statistics of ImageStats."""
  return digit_quality(int(seed)) if task.name == "digits" else ImageStats()


def labels_for(task):
  return dict(task.quality_labels) if task.name == "digits" else dict(ImageStats.labels)
