"""Lazy safetensors reading without torch, and the strict key-map engine the converters share.

Reading: the safetensors header (8-byte little-endian length, JSON) is parsed and validated against the
file size up front; tensor bytes are read on demand through a read-only memmap, so only the keys a
converter asks for are touched. Single files and sharded checkpoints (``*.safetensors.index.json`` with a
``weight_map``) are both supported. bfloat16 / float8 map to ``ml_dtypes`` (shipped with jax).

Converting (:func:`apply_key_map`): a converter declares a list of :class:`Entry` (source key -> target
leaf path, layout transform, optional index on a stacked axis). The engine is strict: every source key is
used exactly once, every target leaf is fully set, shapes and dtypes are checked; all problems are gathered
and raised together in one :class:`ConversionError`. Nothing partial is ever returned.
"""

import dataclasses
import glob
import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "F16", "BF16")  # what a weight may be stored as, by default
MAX_HEADER_BYTES = 100_000_000


class ConversionError(ValueError):
  """A checkpoint cannot be converted. ``problems`` lists every problem found (keys named)."""

  def __init__(self, what, problems):
    self.what = what
    self.problems = list(problems)
    shown = self.problems[:60]
    more = f"\n  ... and {len(self.problems) - len(shown)} more" if len(self.problems) > len(shown) else ""
    super().__init__(f"{what}: {len(self.problems)} problem(s):\n  " + "\n  ".join(shown) + more)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  dtype: str                 # safetensors dtype string, e.g. "F32"
  shape: Tuple[int, ...]
  begin: int                 # byte offsets in the data section
  end: int


class SafetensorsFile:
  """One ``.safetensors`` file: header parsed and validated at open, tensors read lazily."""

  def __init__(self, path):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
          raise ConversionError("safetensors", [f"{self.path}: truncated file ({size} bytes; no header length)"])
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
          raise ConversionError("safetensors", [
              f"{self.path}: truncated or corrupt file (header length {n} but file has {size} bytes)"])
        raw = f.read(n)
    except OSError as e:
      raise ConversionError("safetensors", [f"{self.path}: cannot read ({e})"]) from e
    try:
      header = json.loads(raw.decode("utf-8"))
      if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
      raise ConversionError("safetensors", [f"{self.path}: corrupt header ({e})"]) from e

    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_size = size - self._data_start
    self.tensors: Dict[str, TensorInfo] = {}
    problems = []
    for key, spec in header.items():
      try:
        dtype, shape, (begin, end) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
      except (KeyError, TypeError, ValueError):
        problems.append(f"{key}: malformed header entry {spec!r}")
        continue
      if dtype not in _DTYPES:
        problems.append(f"{key}: unknown dtype {dtype!r}")
        continue
      nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
      if not 0 <= begin <= end or end - begin != nbytes or any(s < 0 for s in shape):
        problems.append(f"{key}: corrupt offsets {[begin, end]} for {dtype}{list(shape)} ({nbytes} bytes)")
      elif end > data_size:
        problems.append(f"{key}: truncated file (tensor needs data bytes up to {end}, file has {data_size})")
      else:
        self.tensors[key] = TensorInfo(dtype, shape, begin, end)
    if problems:
      raise ConversionError("safetensors", [f"{self.path}: {p}" for p in problems])
    self._mmap = None

  def keys(self):
    return self.tensors.keys()

  def info(self, key) -> TensorInfo:
    return self.tensors[key]

  def load(self, key) -> np.ndarray:
    """A fresh (writable) numpy copy of one tensor."""
    ti = self.tensors[key]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._mmap[self._data_start + ti.begin:self._data_start + ti.end]
    return np.frombuffer(buf.tobytes(), dtype=_DTYPES[ti.dtype].newbyteorder("<")).reshape(ti.shape).copy()


class Checkpoint:
  """The union of one or more safetensors files with unique keys (a single file or a sharded set)."""

  def __init__(self, files: Sequence[SafetensorsFile], description=""):
    self.files = list(files)
    self.description = description
    self._where: Dict[str, SafetensorsFile] = {}
    dups = []
    for f in self.files:
      for k in f.keys():
        if k in self._where:
          dups.append(f"duplicate key {k!r} in {self._where[k].path} and {f.path}")
        self._where[k] = f
    if dups:
      raise ConversionError(f"checkpoint {description}", dups)

  def keys(self):
    return self._where.keys()

  def info(self, key) -> TensorInfo:
    return self._where[key].info(key)

  def load(self, key) -> np.ndarray:
    return self._where[key].load(key)


def open_checkpoint(directory, *, variant: Optional[str] = None) -> Checkpoint:
  """The safetensors weights of one model directory: an ``*.safetensors.index.json`` shard set, else one file.

  With several candidates, diffusers' name ``diffusion_pytorch_model[.variant].safetensors`` wins.
  """
  directory = os.fspath(directory)
  stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
  if not os.path.isdir(directory):
    raise ConversionError("checkpoint", [f"{directory}: not a directory"])
  indices = sorted(glob.glob(os.path.join(directory, "*.safetensors.index.json")))
  if len(indices) > 1:
    preferred = os.path.join(directory, stem + ".safetensors.index.json")
    indices = [preferred] if preferred in indices else indices
  if len(indices) > 1:
    raise ConversionError("checkpoint", [f"{directory}: several shard indices {indices}; pass variant="])
  if indices:
    return _open_sharded(indices[0])
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  preferred = os.path.join(directory, stem + ".safetensors")
  if preferred in files:
    files = [preferred]
  if not files:
    raise ConversionError("checkpoint", [f"{directory}: no *.safetensors weights (nor a .safetensors.index.json)"])
  if len(files) > 1:
    raise ConversionError("checkpoint", [f"{directory}: several *.safetensors files and no index: "
                                         f"{[os.path.basename(f) for f in files]}; pass variant="])
  return Checkpoint([SafetensorsFile(files[0])], files[0])


def _open_sharded(index_path) -> Checkpoint:
  base = os.path.dirname(index_path)
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    if not isinstance(weight_map, dict):
      raise ValueError("weight_map is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConversionError("checkpoint", [f"{index_path}: corrupt shard index ({e})"]) from e
  problems, files = [], {}
  for name in sorted(set(weight_map.values())):
    path = os.path.join(base, name)
    if not os.path.isfile(path):
      problems.append(f"{index_path}: shard {name!r} is missing")
      continue
    try:
      files[name] = SafetensorsFile(path)
    except ConversionError as e:
      problems.extend(e.problems)
  for key, name in sorted(weight_map.items()):
    if name in files and key not in files[name].keys():
      problems.append(f"{key}: listed in the index under {name!r} but absent from that shard")
  for name, f in files.items():
    for key in sorted(set(f.keys()) - {k for k, n in weight_map.items() if n == name}):
      problems.append(f"{key}: present in shard {name!r} but not listed there by the index")
  if problems:
    raise ConversionError(f"checkpoint {index_path}", problems)
  return Checkpoint(list(files.values()), index_path)


def read_config(directory) -> dict:
  path = os.path.join(os.fspath(directory), "config.json")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except FileNotFoundError as e:
    raise ConversionError("config", [f"{directory}: no config.json"]) from e
  except (OSError, ValueError) as e:
    raise ConversionError("config", [f"{path}: unreadable config ({e})"]) from e
  if not isinstance(cfg, dict):
    raise ConversionError("config", [f"{path}: not a JSON object"])
  return cfg


def resolve_component_dir(path, component, class_names: Iterable[str]):
  """``<path>/<component>`` (a diffusers pipeline dir) or ``<path>`` itself; checks ``_class_name``."""
  path = os.fspath(path)
  class_names = tuple(class_names)
  for cand in (os.path.join(path, component), path):
    if os.path.isfile(os.path.join(cand, "config.json")):
      cls = read_config(cand).get("_class_name")
      if cls is not None and cls not in class_names:
        raise ConversionError("config", [f"{cand}/config.json describes {cls!r}, expected one of {class_names}"])
      return cand
  raise ConversionError("config", [
      f"{path}: wrong directory: no config.json in it nor in {os.path.join(path, component)}"])


def load_component(path, component, class_names, config_fn, convert_fn, *, variant=None, source_dtype=None,
                   param_dtype=np.float32, as_jax=True, **overrides):
  """(cfg, params) of one diffusers component (``transformer``, ``vae``) from a pipeline dir or the component dir:
  ``config_fn(config.json dict, **overrides)`` then ``convert_fn(checkpoint, cfg, ...)``, both strict."""
  directory = resolve_component_dir(path, component, class_names)
  cfg = config_fn(read_config(directory), **overrides)
  params = convert_fn(open_checkpoint(directory, variant=variant), cfg, source_dtype=source_dtype,
                      param_dtype=param_dtype)
  if as_jax:
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
  return cfg, params


# ----------------------------------------------------------------------------------------------- key maps

LAYOUTS = ("linear", "conv", "copy", "check", "ignore")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor -> one target leaf (or one slice ``index`` of a stacked leaf).

  layout: ``linear`` (torch (out, in) -> (in, out)), ``conv`` (OIHW -> HWIO), ``copy``, or ``check``: the
  source is a constant (e.g. a persistent buffer) that must equal ``expected``; it has no target leaf; or
  ``ignore``: a buffer we do not use (e.g. BatchNorm's ``num_batches_tracked``): it must be present with shape
  ``shape``, is consumed, and its value is not read.
  ``dtypes``, when given, are the dtypes this source may have (overriding ``source_dtype`` / the float default).
  """
  src: str
  dst: Tuple[str, ...] = ()
  layout: str = "copy"
  index: Optional[int] = None
  expected: Optional[np.ndarray] = dataclasses.field(default=None, compare=False, repr=False)
  shape: Optional[Tuple[int, ...]] = None
  dtypes: Optional[Tuple[str, ...]] = None


def _to_target(layout, a):
  if layout == "linear":
    return a.T
  if layout == "conv":
    return a.transpose(2, 3, 1, 0)
  return a


def _source_shape(layout, shape):
  if layout == "linear":
    return tuple(shape[::-1])
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _leaf_paths(tree) -> Dict[Tuple[str, ...], jax.ShapeDtypeStruct]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _set_path(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def apply_key_map(what, entries: Sequence[Entry], checkpoint, targets, *, source_dtype: Optional[str] = None,
                  allowed_dtypes: Sequence[str] = FLOAT_DTYPES, param_dtype=np.float32):
  """Builds the param tree ``targets`` (a pytree of ShapeDtypeStruct) from ``checkpoint``, strictly.

  ``source_dtype`` (e.g. "F32") requires every source tensor to have exactly that dtype; otherwise any of
  ``allowed_dtypes``. Values are cast to ``param_dtype``. Raises ConversionError listing every problem.
  """
  problems: List[str] = []
  want = _leaf_paths(targets)
  by_src: Dict[str, Entry] = {}
  for e in entries:
    if e.layout not in LAYOUTS:
      raise ValueError(f"bad layout {e.layout!r} for {e.src}")
    if e.src in by_src:
      problems.append(f"{e.src}: mapped twice (key map bug)")
    by_src[e.src] = e

  src_keys = set(checkpoint.keys())
  missing = [e.src for e in entries if e.src not in src_keys]
  extra = sorted(src_keys - set(by_src))
  problems += [f"missing key {k!r} (expected by the key map)" for k in missing]
  problems += [f"extra key {k!r} (unused: no target in our param tree)" for k in extra]

  # Target coverage: each leaf set once, or each slice of a stacked leaf set once.
  slots: Dict[Tuple[str, ...], List[Entry]] = {}
  for e in entries:
    if e.layout in ("check", "ignore"):
      continue
    if e.dst not in want:
      problems.append(f"{e.src}: target {'/'.join(e.dst)} is not a leaf of the param tree (key map bug)")
      continue
    slots.setdefault(e.dst, []).append(e)
  for path, leaf in want.items():
    got = slots.get(path, [])
    if not got:
      problems.append(f"target leaf {'/'.join(path)} {tuple(leaf.shape)} is set by no source key")
      continue
    idx = sorted(e.index for e in got if e.index is not None)
    whole = [e for e in got if e.index is None]
    if (whole and (len(got) > 1)) or (not whole and idx != list(range(leaf.shape[0]))):
      problems.append(f"target leaf {'/'.join(path)}: set by {[e.src for e in got]}, expected exactly one source "
                      f"or one per stacked layer (0..{leaf.shape[0] - 1})")

  # Shapes and dtypes, from the headers only.
  for e in entries:
    if e.src not in src_keys:
      continue
    ti = checkpoint.info(e.src)
    if e.layout == "check":
      expect_shape = tuple(np.shape(e.expected))
    elif e.layout == "ignore":
      expect_shape = tuple(e.shape or ())
    elif e.dst in want:
      shape = tuple(want[e.dst].shape)
      expect_shape = _source_shape(e.layout, shape[1:] if e.index is not None else shape)
    else:
      continue
    if tuple(ti.shape) != expect_shape:
      problems.append(f"wrong shape for {e.src!r}: {list(ti.shape)}, expected {list(expect_shape)}")
    if e.dtypes is not None:
      if ti.dtype not in e.dtypes:
        problems.append(f"wrong dtype for {e.src!r}: {ti.dtype}, expected one of {tuple(e.dtypes)}")
    elif source_dtype is not None and ti.dtype != source_dtype:
      problems.append(f"wrong dtype for {e.src!r}: {ti.dtype}, expected {source_dtype}")
    elif source_dtype is None and ti.dtype not in allowed_dtypes:
      problems.append(f"wrong dtype for {e.src!r}: {ti.dtype}, expected one of {tuple(allowed_dtypes)}")
  if problems:
    raise ConversionError(what, problems)

  # Read, transform, check constants, assemble. Still all-or-nothing.
  stacked: Dict[Tuple[str, ...], np.ndarray] = {}
  out: dict = {}
  for e in entries:
    if e.layout == "ignore":
      continue  # present, shape and dtype checked above; the value is not used
    try:
      a = checkpoint.load(e.src)
    except (OSError, ValueError) as err:
      problems.append(f"{e.src}: cannot read tensor data ({err})")
      continue
    if not np.all(np.isfinite(a.astype(np.float32))):
      problems.append(f"{e.src}: non-finite values")
      continue
    if e.layout == "check":
      tol = 2 * float(np.finfo(a.dtype).eps) + 1e-5
      err = float(np.max(np.abs(a.astype(np.float64) - np.asarray(e.expected, np.float64)), initial=0.0))
      if err > tol:
        problems.append(f"{e.src}: constant differs from the recomputed one by {err:.3g} (> {tol:.3g}); "
                        f"config mismatch?")
      continue
    a = np.ascontiguousarray(_to_target(e.layout, a)).astype(param_dtype)
    if e.index is None:
      _set_path(out, e.dst, a)
    else:
      buf = stacked.get(e.dst)
      if buf is None:
        buf = stacked[e.dst] = np.empty(want[e.dst].shape, param_dtype)
      buf[e.index] = a
  if problems:
    raise ConversionError(what, problems)
  for path, buf in stacked.items():
    _set_path(out, path, buf)
  return out
