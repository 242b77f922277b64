"""Shared helpers for the PyTorch parity tests (torch is a test-only oracle)."""

import math

import numpy as np
import torch


def randomize_torch(model, seed=0):
  """Every parameter random: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2), biases ~ N(0, 0.2).
  (Zero-initialised layers, as diffusers builds them, would hide mapping bugs.)"""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def errors(ours, ref):
  """(max abs error, max abs error / max |ref|)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  abs_err = float(np.max(np.abs(ours - ref)))
  return abs_err, abs_err / float(np.max(np.abs(ref)))
