"""Device mesh with axes (data, fsdp, tensor) built from config (DESIGN.md §5).

Sizes come from ``cfg.mesh``: ``num_devices`` (0 = all global devices, else the first N), ``data``, ``fsdp``,
``tensor`` (within a slice, ICI) with exactly one of them -1
to absorb the remaining devices, and ``dcn_data``, ``dcn_fsdp``, ``dcn_tensor`` (across slices, DCN; default 1)
for multi-slice runs, where the hybrid mesh puts the slow links on the outer axis (MaxText style).
"""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def resolve_axis_sizes(sizes, num_devices):
  """Replace the single -1 in ``sizes`` so that the product equals ``num_devices``; errors name the axis."""
  sizes = list(sizes)
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  for axis, s in zip(AXES, sizes):
    if s != -1 and s < 1:
      raise ValueError(f"mesh: axis {axis!r} has size {s}; sizes are >= 1 or -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes {dict(zip(AXES, sizes))}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: axes {dict(zip(AXES, sizes))} need {math.prod(sizes)} devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg=None, devices=None):
  """A ``jax.sharding.Mesh`` over ``devices`` (default: all global devices)."""
  get = lambda k, d: (mesh_cfg.get(k, d) if mesh_cfg is not None else d)
  if devices is None:
    devices = jax.devices()
    n = int(get("num_devices", 0))  # 0: every device; N: the first N (a single-device run on a multi-device host)
    if n:
      if n > len(devices):
        raise ValueError(f"mesh: num_devices={n} but only {len(devices)} devices are available")
      devices = devices[:n]
  devices = list(devices)
  dcn = tuple(int(get(f"dcn_{a}", 1)) for a in AXES)
  num_slices = math.prod(dcn)
  if len(devices) % num_slices:
    raise ValueError(f"mesh: {len(devices)} devices do not split into {num_slices} slices (dcn sizes {dcn})")
  ici = resolve_axis_sizes([int(get(a, -1 if a == "fsdp" else 1)) for a in AXES], len(devices) // num_slices)
  if num_slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):  # CPU / odd topologies: plain row-major order
      grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, AXES)
