"""Metric writers: JSONL (one object per step) and TensorBoard (tensorboardX), flushed as they go."""

import json
import math
import os

import numpy as np


def to_python(d):
  out = {}
  for k, v in d.items():
    v = np.asarray(v)
    out[k] = v.tolist() if v.ndim else float(v)
  return out


class MetricWriter:
  """``truncate_after``: on resume, drop JSONL lines of steps after the restored checkpoint, so the log reads as
  one uninterrupted run (TensorBoard shows the overlap; it keeps the last value per step)."""

  def __init__(self, logdir, tensorboard=True, truncate_after=None, enabled=True):
    self.enabled = enabled  # False on every host but process 0: one log per job
    self._jsonl = self._tb = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, "metrics.jsonl")
    if truncate_after is not None and os.path.exists(path):
      with open(path) as f:
        keep = [l for l in f if l.strip() and json.loads(l)["step"] <= truncate_after]
      with open(path + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a", buffering=1)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(logdir, "tb"))

  def write(self, step, scalars, prefix=""):
    if not self.enabled:
      return
    scalars = to_python(scalars)
    self._jsonl.write(json.dumps({"step": int(step), **{prefix + k: v for k, v in scalars.items()}}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        if isinstance(v, float) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, int(step))

  def hparams(self, record):
    """The run's settings (a nested dict, e.g. train.programs.recipe_record) to TensorBoard's HPARAMS and TEXT tabs."""
    if not (self.enabled and self._tb is not None):
      return
    flat = {}
    def walk(d, prefix=""):
      for k, v in d.items():
        if isinstance(v, dict):
          walk(v, f"{prefix}{k}.")
        else:
          flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    walk(record)
    self._tb.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in sorted(flat.items())), 0)
    self._tb.add_hparams(flat, {}, name=".")

  def image(self, step, tag, image):
    """One image (H, W, C) float in [0, 1] to TensorBoard (e.g. an eval sample grid)."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image, np.float32), int(step), dataformats="HWC")

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
