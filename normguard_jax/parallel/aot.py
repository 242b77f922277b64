"""Ahead-of-time compile of a recipe's own programs for a TPU topology, without its hardware (MaxText's
train_compile): per-chip memory, FLOPs and a roofline estimate, before a pod is booked.

    python -m normguard_jax.parallel.aot --config configs/sd35_medium_nft.py --topology v5p-128 \\
        [--config.a.b=v ...] [--preset NAME] [--rows-per-chip N] [--fit] [--out FILE.json]
    python -m normguard_jax.parallel.aot --config configs/sd35_medium_nft.py --topology cpu:8 ...   # simulated CPUs

The recipe is loaded with its overrides, and the trainer's own builder (train/programs.py, as train/loop.py uses
it) makes, from abstract shapes only (no weights, no data), the programs of one RL iteration:
  * ``train_step``: one optimizer update, with the recipe's microbatches, remat policy, attention implementation,
    fusion, LoRA targets, param dtypes (frozen params in ``model.param_dtype``, trainable and optimizer in f32);
  * ``rollout``: the sampler at ``rollout.chunk`` rows (all the iteration's rows when 0);
  * ``vae_decode``: the VAE decode at ``model.decode_batch`` rows per chip, split over the mesh as ``task.decode``
    runs it.
``--rows-per-chip N`` puts every program at N rows per chip instead (train_step: N rows per chip per microbatch).
Without it the recipe's own sizes are used (train_step: its per-chip microbatch). ``--program`` picks some.

Model configs: ``model.weights_dir`` when given (only its ``transformer/config.json`` and ``vae/config.json`` are
read), else a shipped preset of public diffusers configs (normguard_jax/presets/): ``--preset NAME``, or inferred
from the recipe's file name (sd35_medium*, sd35_large*, flux1_dev*, flux2_klein*) and else from its task (sd3 ->
sd35_medium). Text length: ``--text-len``, default the recipe's encoder layout (SD3: 77 CLIP + T5
``data.max_sequence_length`` or 256 tokens; FLUX: ``data.max_sequence_length`` or 512).

Report (JSON with ``--out``, a table on stdout), per program and per chip: ``memory_analysis()``'s fields, peak =
arguments + outputs - aliases + temporaries (rollout: less the frozen params, which its sampling and reference
variables share at run time but the compile counts twice, ``shared_argument_bytes``), HBM headroom for the chip
kind; ``cost_analysis()``'s FLOPs and bytes as XLA gives them (a ``while`` body counted once) and corrected for the
loops' trip counts (:func:`compiled_costs`); model FLOPs (:func:`model_flops`); a roofline estimate of the time and
MFU from the chip's public peak bf16 FLOP/s and HBM bandwidth (:data:`CHIPS`; compute: the larger of the corrected
and the model FLOPs, as XLA does not count inside Pallas kernels; no communication, no overheads: an estimate, not
a measurement). ``--fit``: the largest rows per chip of each program that fits HBM (doubling, then a binary search
over compiles).

A TPU topology needs libtpu (``pip install "jax[tpu]"``; it works on a CPU-only host). Without it the tool says so
and exits 2. Exit status: 0 every program compiled and fits; 3 a program does not fit HBM (launch/tpu_pod.sh
refuses to start the run); 2 bad arguments, config or environment.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config as config_lib
from normguard_jax.parallel import mesh as mesh_lib, rules, sharding, tpu_flags

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")
PRESETS = ("sd35_medium", "sd35_large", "flux1_dev", "flux2_klein_4b")
PROGRAMS = ("train_step", "rollout", "vae_decode")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_bf16_flops: float  # FLOP/s per chip
  hbm_bytes_per_s: float
  hbm_bytes: float        # the HBM per chip that the headroom and --fit compare against
  source: str


# Public per-chip figures from the Cloud TPU system-architecture pages. HBM capacity is taken as printed there, in
# decimal GB (1e9 bytes): a conservative reading of the capacity (libtpu also reserves some HBM for itself).
CHIPS = {
    "v5e": Chip(197e12, 819e9, 16e9, "https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s"),
    "v5p": Chip(459e12, 2765e9, 95e9, "https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at "
                                      "2765 GB/s"),
    "v6e": Chip(918e12, 1638e9, 32e9, "https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at "
                                      "1638 GB/s"),
}


class NotFitting(Exception):
  """A program's compile ran out of HBM."""


# ------------------------------------------------------------------------------------------------ topologies

def tpu_topology_name(name):
  """'v5p-128' (cores, as gcloud names slices) -> libtpu's 'v5p:4x4x4' (chips). Passes libtpu names through."""
  if re.match(r"^[a-zA-Z0-9_ ]+[=_:][0-9x]+(_twisted|_untwisted)?$", name):
    return name
  m = re.match(r"^(v4|v5p|v5e|v5litepod|v6e)-(\d+)$", name)
  if not m:
    raise SystemExit(f"--topology {name!r}: expected e.g. v5p-128, v5e-256, v6e-64, v4-32, or a libtpu name "
                     "like v5p:4x4x4")
  gen, n = m.group(1), int(m.group(2))
  three_d = gen in ("v4", "v5p")
  chips = n // 2 if three_d else n  # v4 / v5p names count TensorCores (2 per chip)
  dims = [1, 1, 1] if three_d else [1, 1]
  while int(np.prod(dims)) < chips:
    dims[dims.index(min(dims))] *= 2
  if int(np.prod(dims)) != chips:
    raise SystemExit(f"--topology {name!r}: {chips} chips is not a power-of-two slice")
  dims = sorted(d for d in dims if d > 1) + [d for d in dims if d == 1]
  return f"{'v5e' if gen == 'v5litepod' else gen}:{'x'.join(map(str, dims))}"


def topology_devices(topology, num_slices=1):
  """The devices of ``topology`` (``num_slices`` slices of it): TPU devices described by libtpu (no hardware), or
  ``cpu:N`` local CPU devices."""
  if topology.startswith("cpu:"):
    n = int(topology.split(":", 1)[1]) * num_slices
    if len(jax.devices("cpu")) < n:
      raise SystemExit(f"--topology {topology}: only {len(jax.devices('cpu'))} CPU devices; set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    return jax.devices("cpu")[:n]
  try:
    from jax.experimental import topologies
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return topologies.get_topology_desc(topology_name=tpu_topology_name(topology), platform="tpu", **kwargs).devices
  except Exception as e:  # no libtpu, or a name this libtpu does not know
    print(f"error: cannot describe TPU topology {topology!r} with the installed JAX {jax.__version__} "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). AOT compilation for TPU needs libtpu: "
          f"pip install 'jax[tpu]' (works on a CPU-only host), then rerun.", file=sys.stderr)
    raise SystemExit(2)


def chip_kind(device):
  """'v5p', 'v5e', 'v6e' (CHIPS keys) from a device's kind ('TPU v5p', 'TPU v5 lite', 'TPU v6 lite'), else None."""
  kind = str(getattr(device, "device_kind", "")).lower()
  for pattern, name in ((r"v5 ?lite|v5e", "v5e"), (r"v6 ?lite|v6e", "v6e"), (r"v5p|v5$", "v5p")):
    if re.search(pattern, kind):
      return name
  return None


# ------------------------------------------------------------------------------------------------ HLO costs

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_ELEMENTWISE = frozenset("add subtract multiply divide maximum minimum negate abs compare select and or xor not clamp "
                         "remainder sign floor ceil round-nearest-afz round-nearest-even convert".split())
_NO_TRAFFIC = frozenset("parameter constant get-tuple-element tuple bitcast while call conditional after-all "
                        "partition-id replica-id opt-barrier".split())
_SLICES = ("dynamic-slice", "slice")


def _closing(s, i):
  depth = 0
  for j in range(i, len(s)):
    depth += {"(": 1, ")": -1}.get(s[j], 0)
    if depth == 0:
      return j
  return len(s) - 1


def _arrays(text):
  return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(text)]


def _nbytes(arrays):
  return sum(_DTYPE_BYTES.get(d, 1 if d.startswith("f8") else 4) * math.prod(dims) for d, dims in arrays)


def _elems(arrays):
  return sum(math.prod(dims) for _, dims in arrays)


def parse_hlo(text):
  """HLO module text -> ({computation: [instruction]}, entry computation). An instruction is a dict with its
  name, opcode, output arrays [(dtype, dims)], operand names, raw operand text and attributes."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace():
      cur = None
      if line.rstrip().endswith("{") and "(" in line:
        head = line.split("(", 1)[0].split()
        cur = comps.setdefault(head[-1].lstrip("%"), [])
        entry = head[-1].lstrip("%") if head[0] == "ENTRY" else entry
      continue
    if cur is None or " = " not in line:
      continue
    body = line.strip()
    root = body.startswith("ROOT ")
    name, rest = body[5 if root else 0:].split(" = ", 1)
    if rest.startswith("("):
      end = _closing(rest, 0)
      shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
      shape, _, rest = rest.partition(" ")
    op, _, rest = rest.partition("(")
    end = _closing("(" + rest, 0)
    args = rest[:end - 1]
    cur.append(dict(name=name.lstrip("%"), op=op, out=_arrays(shape), root=root, args=args,
                    operands=re.findall(r"%([\w.\-]+)", args), attrs=rest[end:]))
  return comps, entry


def _dims(attrs, key):
  m = re.search(key + r"=\{([0-9,]*)\}", attrs)
  return [int(x) for x in m.group(1).split(",") if x] if m else []


def _instr_flops(i, shapes):
  """XLA's HloCostAnalysis rules: dot 2 x output x contracted size; convolution 2 x output x window x input
  features (per group); elementwise one per element (transcendentals are not FLOPs there); reductions one per
  input element."""
  op, n_out = i["op"], _elems(i["out"])
  if op == "dot":
    lhs = shapes.get(i["operands"][0], [(None, ())])[0][1]
    return 2.0 * n_out * math.prod(lhs[d] for d in _dims(i["attrs"], "lhs_contracting_dims"))
  if op == "convolution":  # per output: input features x the kernel taps that hit input (not lhs-dilation holes)
    rhs = shapes.get(i["operands"][1], [(None, ())])[0][1]
    labels = re.search(r"dim_labels=[^_]*_([^-]*)->", i["attrs"])
    feats = rhs[labels.group(1).index("i")] if labels else rhs[-2]
    size = re.search(r"size=([0-9x]+)", i["attrs"])
    dilate = re.search(r"lhs_dilate=([0-9x]+)", i["attrs"])
    size = [int(v) for v in size.group(1).split("x")] if size else []
    dilate = [int(v) for v in dilate.group(1).split("x")] if dilate else [1] * len(size)
    return 2.0 * n_out * feats * math.prod(max(1.0, k / d) for k, d in zip(size, dilate))
  if op in _ELEMENTWISE:
    return float(n_out)
  if op in ("reduce", "reduce-window"):
    return float(sum(_elems(shapes.get(o, [])) for o in i["operands"][: max(1, len(i["operands"]) // 2)]))
  return 0.0


def _fusion_traffic(comp, shapes):
  """({operand index: bytes read}, bytes written) of a fused computation, as XLA counts them: a parameter that is
  only sliced is read slice by slice, and an in-place dynamic-update-slice root reads and writes only its update."""
  by_name = {i["name"]: i for i in comp}
  users = {}
  for i in comp:
    for o in i["operands"]:
      users.setdefault(o, []).append(i)

  def uses(name):  # (user, the operand it reads) through bitcasts
    out = []
    for u in users.get(name, []):
      out += uses(u["name"]) if u["op"] == "bitcast" else [(u, name)]
    return out
  root = next(i for i in comp if i["root"])
  roots = [by_name[o] for o in root["operands"] if o in by_name] if root["op"] == "tuple" else [root]
  roots = [by_name.get(r["operands"][0], r) if r["op"] == "bitcast" else r for r in roots]
  written = 0.0
  for r in roots:
    written += _nbytes(shapes.get(r["operands"][1], [])) if r["op"] == "dynamic-update-slice" else _nbytes(r["out"])
  reads = {}
  for i in comp:
    if i["op"] != "parameter":
      continue
    read = uses(i["name"])
    if read and all(u["op"] in _SLICES and u["operands"][0] == via for u, via in read):
      reads[int(i["args"])] = float(sum(_nbytes(u["out"]) for u, _ in read))
    elif any(u["op"] == "dynamic-update-slice" and u["operands"][0] == via and u in roots for u, via in read):
      reads[int(i["args"])] = 0.0  # updated in place
    else:
      reads[int(i["args"])] = float(_nbytes(i["out"]))
  return reads, written


def _trip_from_condition(comps, cond):
  """A loop's trip count from its condition when XLA did not annotate one (TPU): JAX's scans and fori_loops count
  an s32 index up from 0 to a constant, compared in the condition (maybe inside a fusion). None if not that."""
  consts, todo, seen = set(), [cond], set()
  while todo:
    c = todo.pop()
    seen.add(c)
    for i in comps.get(c, []):
      if i["op"] == "constant" and i["out"] and i["out"][0][1] == () and i["out"][0][0][0] in "su":
        consts.add(int(i["args"]))
      callee = re.search(r"\bcalls=%([\w.\-]+)", i["attrs"])
      if callee and callee.group(1) not in seen:
        todo.append(callee.group(1))
  positive = {v for v in consts if v > 0}
  return positive.pop() if len(positive) == 1 else None


def hlo_cost(text):
  """FLOPs and bytes accessed of an optimised HLO module (per device after SPMD partitioning), counted twice: each
  ``while`` body once, as ``compiled.cost_analysis()`` counts it, and each body times its ``known_trip_count``
  (nested loops multiply; a loop without a known count is counted once and listed). Per-instruction rules follow
  XLA's HloCostAnalysis (:func:`_instr_flops`, :func:`_fusion_traffic`; bytes: each top-level instruction's
  operands and outputs). Custom calls (Pallas kernels) are opaque: their FLOPs are not counted, and ``custom_calls``
  says how many there are. Returns {flops_once, flops, bytes_once, bytes, loops: [{body, trip_count}],
  custom_calls}."""
  comps, entry = parse_hlo(text)
  shapes = {i["name"]: i["out"] for c in comps.values() for i in c}
  traffic, own, kids, loops = {}, {}, {}, []
  for cname, instrs in comps.items():
    flops = nbytes = 0.0
    calls = []
    for i in instrs:
      op, attrs = i["op"], i["attrs"]
      flops += _instr_flops(i, shapes)
      callee = re.search(r"\bcalls=%([\w.\-]+)", attrs)
      if op == "fusion" and callee:
        if callee.group(1) not in traffic:
          traffic[callee.group(1)] = _fusion_traffic(comps[callee.group(1)], shapes)
        reads, written = traffic[callee.group(1)]
        nbytes += written + sum(reads.get(k, _nbytes(shapes.get(o, []))) for k, o in enumerate(i["operands"]))
        calls.append((callee.group(1), "fusion", 1))
        continue
      if op in _SLICES:
        nbytes += 2 * _nbytes(i["out"])
      elif op == "dynamic-update-slice":
        nbytes += 2 * _nbytes(shapes.get(i["operands"][1], []))
      elif op not in _NO_TRAFFIC:
        nbytes += _nbytes(i["out"]) + sum(_nbytes(shapes.get(o, [])) for o in i["operands"])
      if op == "while":
        body = re.search(r"\bbody=%([\w.\-]+)", attrs).group(1)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        trip = int(trip.group(1)) if trip else _trip_from_condition(
            comps, re.search(r"\bcondition=%([\w.\-]+)", attrs).group(1))
        loops.append({"body": body, "trip_count": trip})
        calls.append((body, "loop", trip or 1))
      elif callee:  # call, async wrappers
        calls.append((callee.group(1), "call", 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
      branches = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
      branches += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", attrs)
      if branches:
        calls.append((tuple(branches), "branch", 1))
    own[cname], kids[cname] = (flops, nbytes), calls

  def total(c, trips):
    f, b = own.get(c, (0.0, 0.0))
    for callee, kind, trip in kids.get(c, ()):
      if kind == "branch":  # the costliest branch
        parts = [total(k, trips) for k in callee]
        f, b = f + max(p[0] for p in parts), b + max(p[1] for p in parts)
        continue
      kf, kb = total(callee, trips)
      mult = trip if trips and kind == "loop" else 1
      f += mult * kf
      b += 0.0 if kind == "fusion" else mult * kb  # a fusion's traffic is counted at its call
    return f, b

  once, full = total(entry, False), total(entry, True)
  custom = sum(1 for c in comps.values() for i in c if i["op"] == "custom-call" and "AllocateBuffer" not in i["attrs"])
  return {"flops_once": once[0], "flops": full[0], "bytes_once": once[1], "bytes": full[1], "loops": loops,
          "custom_calls": custom}


def _cost_dict(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compiled_costs(compiled):
  """XLA's ``cost_analysis()`` FLOPs and bytes accessed (loop bodies once) and their trip-count corrections: XLA's
  figure times the loop amplification that :func:`hlo_cost` measures on the optimised HLO."""
  cost = _cost_dict(compiled)
  hlo = hlo_cost(compiled.as_text())
  flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  scale = lambda full, once: full / once if once else 1.0
  return {"flops": flops, "bytes accessed": nbytes,
          "flops_corrected": flops * scale(hlo["flops"], hlo["flops_once"]),
          "bytes_accessed_corrected": nbytes * scale(hlo["bytes"], hlo["bytes_once"]),
          "hlo_walk": {k: hlo[k] for k in ("flops_once", "flops", "bytes_once", "bytes")},
          "loops": hlo["loops"], "custom_calls": hlo["custom_calls"],
          "correction": "XLA's figure x (HLO walk with each while body x its trip count) / (HLO walk with each body "
                        "once, as XLA counts)"}


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def memory_of(compiled):
  """``memory_analysis()``'s fields (bytes per chip) plus peak = arguments + outputs - aliases + temporaries."""
  mem = compiled.memory_analysis()
  out = {f: int(getattr(mem, f, 0) or 0) for f in MEMORY_FIELDS} if mem is not None else {}
  if out:
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                         + out["temp_size_in_bytes"])
  return out


# ------------------------------------------------------------------------------------------------ the recipe

def infer_preset(config_path, cfg):
  """The preset for a recipe without ``model.weights_dir``: from its file name, else its task."""
  base = os.path.basename(config_path.partition(":")[0])
  for prefix, name in (("sd35_large", "sd35_large"), ("sd35_medium", "sd35_medium"), ("flux1", "flux1_dev"),
                       ("flux2_klein", "flux2_klein_4b")):
    if base.startswith(prefix):
      return name
  if cfg.get("task", "digits") == "sd3":
    return "sd35_medium"
  raise config_lib.ConfigError(f"{config_path}: cannot tell which model it trains; pass --preset "
                               f"({', '.join(PRESETS)}) or --config.model.weights_dir=DIR")


def default_text_len(cfg):
  msl = int(cfg.data.get("max_sequence_length", 0) or 0)
  return 77 + (msl or 256) if cfg.task == "sd3" else (msl or 512)


def load_recipe(config_path, overrides, preset=None):
  """(cfg, preset name or None): the recipe with its overrides; ``model.weights_dir`` pointed at a preset when
  the user gave none. Validates the config, except that no data directory is needed."""
  cfg = config_lib.load(config_path)
  cfg = config_lib.apply_overrides(cfg, overrides)
  if cfg.get("task", "digits") not in ("sd3", "flux"):
    raise config_lib.ConfigError(f"config.task: {cfg.get('task', 'digits')!r}; the AOT check is for the "
                                 "text-to-image recipes (sd3, flux)")
  if preset or not cfg.model.weights_dir:
    preset = preset or infer_preset(config_path, cfg)
    if preset not in PRESETS:
      raise config_lib.ConfigError(f"--preset {preset!r}: expected one of {PRESETS}")
    cfg.model.weights_dir = os.path.join(PRESETS_DIR, preset)
  checked = cfg.copy_and_resolve_references()
  with checked.unlocked():  # AOT opens no data: any directory satisfies the data path checks
    for field in ("embeddings_dir",):
      checked.data[field] = checked.data[field] or checked.model.weights_dir
  config_lib.validate(checked)
  return cfg, preset


@dataclasses.dataclass
class Recipe:
  """What the programs are built from: the recipe's task, run setup, mesh, abstract state and programs."""
  cfg: object
  method: str
  use_ng: bool
  task: object
  setup: object
  mesh: object
  state: object      # abstract TrainState with the rules table's shardings
  progs: object      # programs.RunPrograms
  batch: object      # one optimizer update's abstract batch (rows resized per compile)
  text_len: int

  @property
  def platform(self):
    return self.mesh.devices.flat[0].platform

  @property
  def batch_devices(self):
    return int(self.mesh.shape["data"] * self.mesh.shape["fsdp"])


def _rows(mesh, shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=rules.batch_sharding(mesh, len(shape)))


def _with_rows(tree, rows, mesh):
  return jax.tree_util.tree_map(lambda x: _rows(mesh, (rows,) + tuple(x.shape[1:]), x.dtype), tree)


def build_recipe(cfg, devices, text_len):
  """Abstract state and the trainer's programs for ``cfg`` on ``devices`` (train/loop.py's run_rl, without data)."""
  from normguard_jax import tasks
  from normguard_jax.train import programs
  method = config_lib.csv(cfg.rl.methods)[0]
  use_ng = "on" in config_lib.csv(cfg.rl.normguard)
  task = tasks.make_task(cfg, text_len=text_len)
  config_lib.check_task_layout(cfg, task)
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  setup = programs.run_setup(cfg, task, method, use_ng)
  dtype = jnp.dtype(cfg.model.param_dtype)
  ref = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype if jnp.issubdtype(
      x.dtype, jnp.floating) else x.dtype), task.model_module.param_shapes(task.model_config(0))["params"])
  abstract = jax.eval_shape(lambda p, k: programs.init_state(setup, task, p, k), ref, jax.random.PRNGKey(0))
  state = programs.abstract_like(abstract, rules.tree_shardings(abstract, mesh))
  progs = programs.build_run_programs(cfg, task, setup, mesh, state)
  recipe = Recipe(cfg, method, use_ng, task, setup, mesh, state, progs, None, text_len)
  # One update's batch, as the loop builds it: rollout -> make_batch -> split_updates (shapes only).
  r = cfg.rollout
  rows = r.group_size * max(1, _rollout_rows(cfg) // r.group_size)
  ro = jax.eval_shape(progs.rollout, *_rollout_args(recipe, rows))
  cond = _with_rows(task.cond_spec(rows), rows, mesh)
  uncond = cond if r.cfg_scale != 1.0 else None
  batch = jax.eval_shape(progs.make_batch, jax.random.PRNGKey(0), ro, cond, uncond,
                         jax.ShapeDtypeStruct((rows,), jnp.float32))
  recipe.batch = jax.eval_shape(progs.split_updates, batch)[0]
  lead = {x.shape[0] for x in jax.tree_util.tree_leaves(recipe.batch)}
  if len(lead) != 1:
    raise ValueError(f"the train batch's leaves do not share one row axis ({sorted(lead)})")
  return recipe


def _rollout_args(recipe, rows):
  st, mesh = recipe.state, recipe.mesh
  sample_vars = st.old_variables() if recipe.setup.with_old and recipe.method == "nft" else st.policy_variables()
  cond = _with_rows(recipe.task.cond_spec(rows), rows, mesh)
  uncond = cond if recipe.cfg.rollout.cfg_scale != 1.0 else None
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  return sample_vars, st.ref_variables(), cond, uncond, key


def _rollout_rows(cfg):
  """Rows of one rollout call: ``rollout.chunk`` (0: all the iteration's rows)."""
  total = cfg.rollout.prompts_per_iter * cfg.rollout.group_size
  return min(int(cfg.rollout.chunk) or total, total)


def lower_program(recipe, program, rows_per_chip=None):
  """(lowered program, layout dict) of ``program`` at ``rows_per_chip`` rows per chip (None: the recipe's)."""
  from normguard_jax.tasks import text_to_image
  cfg, mesh, n = recipe.cfg, recipe.mesh, recipe.batch_devices
  if program == "train_step":
    m = int(cfg.rl.get("num_microbatches", 1))
    rows = (int(rows_per_chip) * n * m if rows_per_chip is not None
            else config_lib.train_rows(cfg, recipe.method) // int(cfg.rl.get("updates_per_iter", 1)))
    if rows % (m * n) or (recipe.method == "dpo" and rows % (2 * m)):
      raise config_lib.ConfigError(f"train_step: {rows} rows do not split into {m} microbatches over {n} chips"
                                   + (" (DPO: in winner and loser halves)" if recipe.method == "dpo" else ""))
    lowered = recipe.progs.train_step.lower(recipe.state, _with_rows(recipe.batch, rows, mesh))
    return lowered, {"rows": rows, "microbatches": m, "rows_per_chip": rows // (m * n)}
  if program == "rollout":
    rows = int(rows_per_chip) * n if rows_per_chip is not None else _rollout_rows(cfg)
    if rows % n:
      raise config_lib.ConfigError(f"rollout: {rows} rows (rollout.chunk) do not split over {n} chips")
    # The sampling and reference variables share the frozen params: one buffer at run time, two arguments here.
    shared = _per_chip_bytes(recipe.state.frozen)
    return recipe.progs.rollout.lower(*_rollout_args(recipe, rows)), {"rows": rows, "rows_per_chip": rows // n,
                                                                     "shared_argument_bytes": shared}
  if program == "vae_decode":
    task = recipe.task
    dtype = jnp.dtype(cfg.model.param_dtype)
    params = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding.replicated(mesh)),
        _vae_shapes(task.vae_cfg))
    # task.decode on the mesh: model.decode_batch rows per chip per call (all the rollout's rows when 0)
    per_chip = int(rows_per_chip) if rows_per_chip is not None else (
        int(cfg.model.decode_batch) or max(_rollout_rows(cfg) // n, 1))
    rows = per_chip * n
    z = _rows(mesh, (rows,) + tuple(task.latent_shape), jnp.float32)
    lowered = text_to_image.sharded_decode_program(task.vae_decode, task.vae_cfg, mesh, per_chip).lower(params, z)
    return lowered, {"rows": rows, "rows_per_chip": per_chip, "rows_split": True}
  raise ValueError(f"unknown program {program!r}; expected one of {PROGRAMS}")


def _per_chip_bytes(tree):
  """Bytes per chip of an abstract pytree with shardings (the largest shard of each leaf)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _vae_shapes(vae_cfg):
  from normguard_jax.models import vae as vae_lib
  return vae_lib.param_shapes(vae_cfg)["params"]


# ------------------------------------------------------------------------------------------------ model FLOPs

def _lowered_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def forward_flops_per_row(recipe):
  """FLOPs of one forward of the base transformer on one row (image + text tokens): XLA's cost analysis of an
  unscanned, unsharded, un-rematerialised lowering (no loop to undercount), XLA attention. This is 2 N tokens
  with N x tokens counted per weight and its stream (image, text, both for single-stream blocks, once per row
  for the modulation MLPs), plus attention's score and value matmuls and the elementwise work."""
  task = recipe.task
  mc = dataclasses.replace(task.model_config(0), scan_layers=False, remat=False, attention_impl="xla")
  params = task.model_module.param_shapes(mc)
  x = jax.ShapeDtypeStruct((1,) + tuple(task.latent_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = task.cond_spec(1)
  velocity = task.model_module.velocity
  with jax.default_device(jax.devices("cpu")[0]):
    return _lowered_flops(lambda p, x_, t_, c: velocity(p, x_, t_, c, cfg=mc), params, x, t, cond)


def decode_flops_per_row(recipe):
  task = recipe.task
  z = jax.ShapeDtypeStruct((1,) + tuple(task.latent_shape), jnp.float32)
  with jax.default_device(jax.devices("cpu")[0]):
    return _lowered_flops(lambda p, z_: task.vae_decode(p, z_, task.vae_cfg), _vae_shapes(task.vae_cfg), z)


def model_flops(recipe, program, rows, fwd, dec):
  """(model FLOPs of one call of ``program`` over all chips, the formula). F = forward FLOPs per row
  (:func:`forward_flops_per_row`), i.e. 2 N tokens: train step 3 F per row for the policy (6 N tokens: forward and
  backward) plus F per frozen forward (reference, and the old policy when the method keeps one), twice with CFG in
  the training forward; rollout F per row per step for the sampling policy, plus F for the reference when rho is
  tracked, twice with CFG; VAE decode: the decoder's forward FLOPs per row. (With LoRA the policy's backward skips
  the base weights' gradients, about F instead of 2 F, which the remat recomputation, F, about makes up for.)"""
  cfg, setup = recipe.cfg, recipe.setup
  if program == "train_step":
    frozen = 1 + int(setup.with_old)
    cfg_mult = 2 if (bool(cfg.rl.get("train_cfg", False)) and cfg.rollout.cfg_scale != 1.0) else 1
    return rows * fwd * (3 + frozen) * cfg_mult, (f"rows x F x (3 policy + {frozen} frozen)"
                                                  + (" x 2 (CFG)" if cfg_mult == 2 else ""))
  if program == "rollout":
    r = cfg.rollout
    per_step = (1 + int(bool(r.track_rho))) * (2 if r.cfg_scale != 1.0 else 1)
    return rows * fwd * r.num_steps * per_step, (f"rows x F x {r.num_steps} steps x "
                                                 f"{per_step} forwards (policy{', reference' if r.track_rho else ''}"
                                                 f"{', x2 CFG' if r.cfg_scale != 1.0 else ''})")
  return rows * dec, "rows x the decoder's forward FLOPs"


# ------------------------------------------------------------------------------------------------ analysis

# CPU topologies: no LLVM optimisation (the program never runs; the buffer assignment and costs are unchanged).
_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def log(msg):
  print(f"[aot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _compile(lowered, platform):
  try:
    return lowered.compile(compiler_options=_CPU_COMPILER_OPTIONS if platform == "cpu" else None)
  except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
      raise NotFitting(text.splitlines()[0][:500]) from e
    raise


def analyse_program(recipe, program, rows_per_chip, chip, hbm, fwd, dec):
  """Compile ``program`` and report its per-chip memory, costs, model FLOPs and roofline estimate."""
  t0 = time.time()
  lowered, layout = lower_program(recipe, program, rows_per_chip)
  log(f"compiling {program} ({layout['rows']} rows over {recipe.batch_devices} chips)")
  entry = dict(layout)
  try:
    compiled = _compile(lowered, recipe.platform)
  except NotFitting as e:
    entry.update(compile_s=round(time.time() - t0, 1), fits=False, error=str(e))
    return entry
  entry["compile_s"] = round(time.time() - t0, 1)
  log(f"{program} compiled in {entry['compile_s']} s")
  mem = memory_of(compiled)
  if mem and entry.get("shared_argument_bytes"):  # counted twice among the arguments, held once at run time
    mem["peak_bytes"] -= entry["shared_argument_bytes"]
  entry["memory"] = mem
  entry["memory_gib"] = {k: round(v / GIB, 3) for k, v in mem.items()}
  if hbm:
    entry["hbm_headroom_bytes"] = int(hbm - mem.get("peak_bytes", 0))
    entry["hbm_headroom_gib"] = round(entry["hbm_headroom_bytes"] / GIB, 3)
  entry["fits"] = (mem.get("peak_bytes", 0) <= hbm) if hbm else None
  cost = compiled_costs(compiled)
  entry["cost"] = cost
  chips = len(recipe.mesh.devices.flat)
  mf, formula = model_flops(recipe, program, layout["rows"], fwd, dec)
  entry["model_flops"] = mf
  entry["model_flops_per_chip"] = mf / chips
  entry["model_flops_formula"] = formula
  if chip is not None:
    spec = CHIPS[chip]
    # XLA does not count inside custom calls (the Pallas splash attention kernels): the compute term takes the larger
    # of the compiled and the model FLOPs, so that the estimate never runs faster than the model's own work.
    compute_s = max(cost["flops_corrected"], mf / chips) / spec.peak_bf16_flops
    memory_s = cost["bytes_accessed_corrected"] / spec.hbm_bytes_per_s
    step_s = max(compute_s, memory_s)
    entry["roofline"] = {"estimate": True, "compute_s": compute_s, "memory_s": memory_s, "time_s": step_s,
                         "memory_s_hlo_walk": cost["hlo_walk"]["bytes"] / spec.hbm_bytes_per_s,
                         "bound": "compute" if compute_s >= memory_s else "memory",
                         "mfu": (mf / chips) / (step_s * spec.peak_bf16_flops) if step_s > 0 else None,
                         "note": "max(max(corrected, model) FLOPs / peak bf16 FLOP/s, corrected bytes / HBM "
                                 "bandwidth) per chip; no communication, no launch or host overheads: an estimate, "
                                 "not a measurement"}
  return entry


def fit_rows(recipe, program, hbm, limit=4096):
  """The largest rows per chip of ``program`` whose compile fits ``hbm`` bytes per chip: doubling from 1, then a
  binary search. Returns {max_rows_per_chip, peak_bytes at it, compiles}."""
  compiles = []

  def fits(n):
    try:
      log(f"--fit {program}: {n} rows per chip")
      lowered, layout = lower_program(recipe, program, n)
      peak = memory_of(_compile(lowered, recipe.platform))["peak_bytes"] - layout.get("shared_argument_bytes", 0)
      compiles.append({"rows_per_chip": n, "peak_bytes": peak, "fits": peak <= hbm})
      return peak <= hbm, peak
    except NotFitting:
      compiles.append({"rows_per_chip": n, "fits": False, "error": "compile ran out of HBM"})
      return False, None
  step = 2 if (program == "train_step" and recipe.method == "dpo" and recipe.batch_devices % 2) else 1
  good, peak, bad = 0, None, None
  n = step
  while n <= limit:
    ok, p = fits(n)
    if not ok:
      bad = n
      break
    good, peak, n = n, p, n * 2
  while bad is not None and bad - good > step:
    mid = (good + bad) // 2 // step * step
    ok, p = fits(mid)
    if ok:
      good, peak = mid, p
    else:
      bad = mid
  return {"max_rows_per_chip": good, "peak_bytes": peak, "compiles": compiles,
          "limit_reached": bad is None}


def report_table(out):
  """A compact text table of the report."""
  head = (f"{'program':11s} {'rows/chip':>9s} {'args':>7s} {'temps':>7s} {'peak':>7s} {'headroom':>8s} "
          f"{'TFLOP/chip':>10s} {'model TF/chip':>13s} {'est. time s':>11s} {'est. MFU':>8s}")
  lines = [f"{out['recipe']} on {out['topology']} ({out['devices']} chips, mesh {out['mesh']}), "
           f"{out['method']}, lora_rank {out['lora_rank']}; GiB per chip", head]
  for name, e in out["programs"].items():
    rows = e.get("rows_per_chip")
    rows = (f"{rows}x{e['microbatches']}" if "microbatches" in e else
            f"{rows}" + ("" if e.get("rows_split", True) else "(all)"))
    if "memory" not in e:
      lines.append(f"{name:11s} {rows:>9s}  does not fit: {e.get('error', '')[:80]}")
      continue
    g = e["memory_gib"]
    head_gib = f"{e['hbm_headroom_gib']:8.2f}" if "hbm_headroom_gib" in e else f"{'-':>8s}"
    roof = e.get("roofline")
    lines.append(f"{name:11s} {rows:>9s} {g['argument_size_in_bytes']:7.2f} {g['temp_size_in_bytes']:7.2f} "
                 f"{g['peak_bytes']:7.2f} {head_gib} {e['cost']['flops_corrected'] / 1e12:10.2f} "
                 f"{e['model_flops_per_chip'] / 1e12:13.2f} "
                 + (f"{roof['time_s']:11.3f} {roof['mfu']:8.1%}" if roof else f"{'-':>11s} {'-':>8s}"))
  for name, f in out.get("fit", {}).items():
    lines.append(f"fit {name}: at most {f['max_rows_per_chip']} rows per chip"
                 + (" (search limit reached)" if f["limit_reached"] else ""))
  lines.append("time and MFU: roofline estimates (max of FLOPs / peak and bytes / HBM bandwidth), not measurements")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def main(argv=None):
  """Returns the exit status (0 fits, 3 does not fit, 2 bad input)."""
  p = argparse.ArgumentParser(prog="python -m normguard_jax.parallel.aot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="recipe file, optionally with a variant: path.py[:variant]")
  p.add_argument("--topology", required=True, help="TPU slice (v5p-128, v5e-256, v6e-64, ...) or cpu:N")
  p.add_argument("--preset", choices=PRESETS, default=None,
                 help="model configs from normguard_jax/presets/ (default: model.weights_dir, else inferred)")
  p.add_argument("--rows-per-chip", type=int, default=None,
                 help="rows per chip of every program (train_step: per microbatch); default: the recipe's")
  p.add_argument("--program", default=",".join(PROGRAMS), help=f"comma-separated, of {','.join(PROGRAMS)}")
  p.add_argument("--text-len", type=int, default=None, help="text tokens per prompt (default: the recipe's)")
  p.add_argument("--fit", action="store_true", help="search the largest rows per chip that fit HBM, per program")
  p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip for the headroom and --fit (default: "
                 "the chip kind's; needed on cpu:N)")
  p.add_argument("--num-slices", type=int, default=None, help="slices of --topology (multi-slice; default: the "
                 "product of the recipe's mesh.dcn_* sizes)")
  p.add_argument("--out", default=None, help="write the JSON report here")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    print(f"error: unrecognised arguments {bad}; recipe overrides look like --config.rl.lora_rank=0", file=sys.stderr)
    return 2
  programs_wanted = config_lib.csv(args.program)
  if set(programs_wanted) - set(PROGRAMS):
    print(f"error: --program {args.program!r}: expected some of {','.join(PROGRAMS)}", file=sys.stderr)
    return 2
  if args.topology.startswith("cpu:"):
    flag = f"--xla_force_host_platform_device_count={args.topology.split(':', 1)[1]}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()  # before JAX starts
  else:
    tpu_flags.apply()  # the training runs' libtpu flags, before libtpu starts: the figures are the run's
  try:
    cfg, preset = load_recipe(args.config, [a[len("--config."):] for a in rest], args.preset)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    slices = args.num_slices or int(np.prod([int(cfg.mesh.get(f"dcn_{a}", 1)) for a in mesh_lib.AXES]))
    devices = topology_devices(args.topology, slices)
  except SystemExit as e:  # no libtpu, or a topology name it does not know: said on stderr
    return e.code
  chip = chip_kind(devices[0]) if not args.topology.startswith("cpu:") else None
  hbm = args.hbm_gib * GIB if args.hbm_gib else (CHIPS[chip].hbm_bytes if chip else None)
  if args.fit and not hbm:
    print("error: --fit needs the HBM per chip: a TPU topology of a known kind, or --hbm-gib", file=sys.stderr)
    return 2
  text_len = args.text_len or default_text_len(cfg)
  log(f"{args.config} on {args.topology}: {len(devices)} {devices[0].platform} devices; building the programs")
  try:
    if args.rows_per_chip is None:
      config_lib.check_batch_layout(cfg, len(devices))
    recipe = build_recipe(cfg, devices, text_len)
  except (config_lib.ConfigError, ValueError) as e:  # ValueError: also the converters' ConversionError
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  fwd = forward_flops_per_row(recipe)
  dec = decode_flops_per_row(recipe) if "vae_decode" in programs_wanted else 0.0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(recipe.state.frozen))
  lat = recipe.task.latent_shape
  out = {"tool": "normguard_jax.parallel.aot", "jax": jax.__version__, "recipe": args.config,
         "overrides": rest, "preset": preset, "weights_dir": cfg.model.weights_dir, "topology": args.topology,
         "devices": len(devices), "device_kind": str(getattr(devices[0], "device_kind", "")),
         "chip": dataclasses.asdict(CHIPS[chip]) | {"kind": chip} if chip else None,
         "hbm_bytes": hbm, "mesh": {k: int(v) for k, v in recipe.mesh.shape.items()},
         "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS") if chip else None,
         "batch_devices": recipe.batch_devices, "method": recipe.method, "normguard": recipe.use_ng,
         "lora_rank": int(cfg.rl.lora_rank), "lora_targets": cfg.rl.lora_targets,
         "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype, "remat": bool(cfg.model.remat),
         "remat_policy": cfg.model.get("remat_policy", "full"), "attention_impl": cfg.model.attention_impl,
         "fusion": cfg.rl.fusion, "num_microbatches": int(cfg.rl.get("num_microbatches", 1)),
         "resolution": int(cfg.model.resolution), "text_len": text_len,
         "params": {"model": n_params, "trainable": sum(int(np.prod(x.shape)) for x in
                                                        jax.tree_util.tree_leaves(recipe.state.trainable))},
         "tokens_per_row": {"image": int(lat[0] // 2 * (lat[1] // 2)), "text": text_len},
         "forward_flops_per_row": fwd, "decode_flops_per_row": dec,
         "programs": {}}
  out["two_n_tokens_per_row"] = 2.0 * n_params * sum(out["tokens_per_row"].values())
  for name in programs_wanted:
    try:
      out["programs"][name] = analyse_program(recipe, name, args.rows_per_chip, chip, hbm, fwd, dec)
    except config_lib.ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  if args.fit:
    out["fit"] = {name: fit_rows(recipe, name, hbm) for name in programs_wanted}
  out["fits"] = all(e.get("fits") is not False for e in out["programs"].values())
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  print(report_table(out))
  if not out["fits"]:
    names = ", ".join(k for k, e in out["programs"].items() if e.get("fits") is False)
    print(f"error: does not fit: {names} need(s) more HBM per chip than {out['topology']} has; lower the rows per "
          "chip (more rl.num_microbatches, a smaller rollout.chunk or model.decode_batch) or use more chips",
          file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
