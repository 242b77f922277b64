"""Shared helpers for the PyTorch parity tests (torch is a test-only oracle)."""

import numpy as np

# Every parameter random (zero-initialised layers, as diffusers builds them, would hide mapping bugs): the tiny
# snapshot builder's own, so the tests and the user's dry runs randomise alike.
from normguard_jax.tools.tiny_snapshot import randomize as randomize_torch  # noqa: F401


def errors(ours, ref):
  """(max abs error, max abs error / max |ref|)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  abs_err = float(np.max(np.abs(ours - ref)))
  return abs_err, abs_err / float(np.max(np.abs(ref)))
