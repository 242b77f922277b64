"""Convert SD3/SD3.5 and FLUX.1 / FLUX.2 transformers between diffusers and our orbax param trees, and export
trained runs back to diffusers.

  python -m normguard_jax.convert export-lora WORKDIR/runs/RUN OUT [--step N] [--config DIR]
      Writes OUT/pytorch_lora_weights.safetensors (PEFT keys, adapter 0, alpha folded into B unless --no-fold-alpha)
      for pipe.load_lora_weights / transformer.load_lora_adapter.
  python -m normguard_jax.convert export-full WORKDIR/runs/RUN OUT [--step N] [--config DIR] [--dtype ...]
      Writes a diffusers transformer dir (config.json + safetensors) for from_pretrained: the base snapshot with the
      trained LoRA merged in (W + alpha / r A B), or the trained weights of a full fine-tuning run (rl.lora_rank 0).
  For a run, the checkpoint is the latest complete one in RUN/checkpoints (the final one sits at iterations + 1;
  interrupted *.orbax-checkpoint-tmp* and set-aside *.corrupt-* folders are never used), or --step N. Rank, alpha,
  targets and the base snapshot (model.weights_dir) come from WORKDIR/config.json; --config DIR repoints the
  snapshot when it has moved. Only the checkpoint's ``step`` and ``trainable`` are read (an orbax partial restore).

  python -m normguard_jax.convert to-jax SRC OUT [--no-scan-layers] [--variant fp16] [--no-hash]
      SRC: a local diffusers pipeline dir (or its transformer/ dir); the model family (SD3Transformer2DModel,
      FluxTransformer2DModel, Flux2Transformer2DModel) comes from config.json's _class_name. Writes OUT/params (an orbax
      StandardCheckpointer tree: our params) and OUT/manifest.json (source, file sizes and sha256, the
      diffusers config, our config, param count).
  python -m normguard_jax.convert export-full TREE OUT [--config DIR|manifest.json] [--key a/b]
  python -m normguard_jax.convert export-lora TREE OUT --config DIR|manifest.json --lora-alpha A [--key a/b]
      TREE: an orbax tree (to-jax's OUT/params, or a tree saved by hand; --key picks a subtree). The architecture
      comes from --config (a diffusers dir, or a to-jax manifest); for a to-jax output dir it is found next to the
      tree. Scan layout, LoRA rank and LoRA targets are read off the tree.

Bad arguments (a checkpoint folder where a run dir is expected, a run without a complete checkpoint, a missing
--step, a base snapshot that is gone, a digits run) exit with status 2 and a message saying what to pass.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys

import numpy as np
from normguard_jax.tools import command

MANIFEST = "manifest.json"
CHECKPOINT_MARKER = "_CHECKPOINT_METADATA"  # orbax CheckpointManager: a finalised step folder


class UsageError(Exception):
  """Wrong arguments: the message names what is wrong and what to pass (the CLI exits with status 2)."""


def _sha256(path, chunk=1 << 24):
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        return h.hexdigest()
      h.update(b)


def _restore(path, key=None):
  import orbax.checkpoint as ocp
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, MANIFEST)) and os.path.isdir(os.path.join(path, "params")):
    path = os.path.join(path, "params")
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path)
  for k in (key.strip("/").split("/") if key else ()):
    if not isinstance(tree, dict) or k not in tree:
      have = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
      raise UsageError(f"--key: {k!r} not found in the checkpoint tree (have {have})")
    tree = tree[k]
  return tree


def _base_config(ckpt, config):
  """-> the diffusers config.json dict, from --config (dir or manifest) or the manifest next to CKPT."""
  from normguard_jax.convert import export, safetensors_io
  cands = [config] if config else [os.path.join(ckpt, MANIFEST),
                                   os.path.join(os.path.dirname(os.path.abspath(ckpt)), MANIFEST)]
  for c in cands:
    if c and os.path.isfile(c) and c.endswith(".json"):
      with open(c) as f:
        return json.load(f)["diffusers_config"]
    if c and os.path.isdir(c):
      if os.path.isfile(os.path.join(c, MANIFEST)):
        with open(os.path.join(c, MANIFEST)) as f:
          return json.load(f)["diffusers_config"]
      return safetensors_io.read_config(safetensors_io.resolve_component_dir(c, "transformer", export.CLASS_NAMES))
  raise UsageError("no architecture: pass --config (a diffusers dir or a to-jax manifest.json)")


def _is_scanned(tree):
  return any(k.startswith("blocks_") or k in ("double_blocks", "single_blocks") for k in tree)


def _family(diffusers_config):
  """The export.Family of a diffusers config (no ``_class_name``: SD3, as before FLUX existed)."""
  from normguard_jax.convert import export
  return export.family_of_class(diffusers_config.get("_class_name") or "SD3Transformer2DModel")


def cmd_to_jax(args):
  import jax
  import orbax.checkpoint as ocp
  from normguard_jax.convert import export, safetensors_io
  src = os.path.abspath(args.src)
  tdir = safetensors_io.resolve_component_dir(src, "transformer", export.CLASS_NAMES)
  fam = _family(safetensors_io.read_config(tdir))
  model_name = fam.model.__name__.rsplit(".", 1)[-1]  # "mmdit" / "flux"
  dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[args.param_dtype]
  cfg, params = fam.converter.load_transformer(tdir, variant=args.variant, param_dtype=dtype,
                                               scan_layers=args.scan_layers)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out, "params"), params, force=args.force)
  ckpt = safetensors_io.open_checkpoint(tdir, variant=args.variant)
  files = []
  index = {os.path.join(tdir, os.path.basename(ckpt.description))} if ckpt.description.endswith(".json") else set()
  for f in sorted({f.path for f in ckpt.files} | {os.path.join(tdir, "config.json")} | index):
    entry = {"name": os.path.relpath(f, tdir), "bytes": os.path.getsize(f)}
    if not args.no_hash:
      entry["sha256"] = _sha256(f)
    files.append(entry)
  manifest = {
      "format": f"normguard_jax.{model_name}/orbax-standard/v1",
      "model_family": fam.name,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "source_dir": src, "transformer_dir": tdir, "files": files,
      "diffusers_config": safetensors_io.read_config(tdir),
      f"{model_name}_config": dataclasses.asdict(cfg),
      "param_count": int(fam.model.param_count(params)),
      "param_dtype": args.param_dtype,
      "params_path": "params",
  }
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  print(json.dumps({"out": out, "family": fam.name, "param_count": manifest["param_count"],
                    "scan_layers": cfg.scan_layers}))
  return manifest


# ----------------------------------------------------------------------------------------------- run dirs

@dataclasses.dataclass
class _Run:
  name: str
  workdir: str
  ckpt_dir: str
  cfg: object           # the run's ml_collections config (WORKDIR/config.json)
  step: int             # checkpoint step
  transformer_dir: str  # the base snapshot's transformer/ dir
  base: dict            # its config.json


def _kind(path):
  """What PATH is: 'run', 'checkpoints', 'step', 'item' (<step>/state or meta), 'workdir', or 'tree'."""
  parent = os.path.dirname(path)
  is_step = lambda d: os.path.isfile(os.path.join(d, CHECKPOINT_MARKER)) and os.path.isdir(os.path.join(d, "state"))
  in_runs = os.path.basename(parent) == "runs" and os.path.isfile(os.path.join(os.path.dirname(parent), "config.json"))
  if os.path.isdir(os.path.join(path, "checkpoints")) or (in_runs and os.path.isdir(path)):
    return "run"
  if is_step(path):
    return "step"
  if is_step(parent) and os.path.basename(path) in ("state", "meta"):
    return "item"
  if os.path.basename(path) == "checkpoints" and os.path.isdir(os.path.join(parent, "checkpoints")):
    return "checkpoints"
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "runs")):
    return "workdir"
  return "tree"


def _not_a_run(path, kind):
  """The UsageError for a checkpoint folder / workdir passed where a run dir is expected."""
  if kind == "workdir":
    from normguard_jax.analysis import workdir as workdir_lib
    names = workdir_lib.run_names(path)
    done = [n for n in names if workdir_lib._steps(os.path.join(path, "runs", n, "checkpoints"))]
    eg = os.path.join(path, "runs", (done or names or ["<name>"])[0])
    return UsageError(f"{path} is a workdir, not a run: pass one of its runs, e.g. {eg} (runs: {names})")
  if kind == "checkpoints":
    return UsageError(f"{path} is a run's checkpoints folder: pass the run dir {os.path.dirname(path)} "
                      "(the latest complete checkpoint is used; --step N picks another)")
  step_dir = path if kind == "step" else os.path.dirname(path)
  run_dir = os.path.dirname(os.path.dirname(step_dir))
  step = os.path.basename(step_dir)
  what = f"checkpoint {step}" if kind == "step" else f"the {os.path.basename(path)!r} item of checkpoint {step}"
  return UsageError(f"{path} is {what} of run {os.path.basename(run_dir)!r}, not a run dir: pass the run dir "
                    f"{run_dir} with --step {step} (without --step the latest complete checkpoint is used); rank, "
                    "alpha, targets and the base snapshot then come from the run's config.json")


def _open_run(run_dir, step, config_dir):
  """Everything an export of ``run_dir`` needs, checked before any restore; UsageError says what to pass."""
  from normguard_jax.analysis import workdir as workdir_lib
  from normguard_jax.convert import export, safetensors_io
  name, workdir = os.path.basename(run_dir), os.path.dirname(os.path.dirname(run_dir))
  cfg_path = os.path.join(workdir, "config.json")
  if os.path.basename(os.path.dirname(run_dir)) != "runs" or not os.path.isfile(cfg_path):
    raise UsageError(f"{run_dir} is not inside a workdir (no {cfg_path}): pass WORKDIR/runs/<name> as the trainer "
                     "writes it")
  try:
    cfg = workdir_lib.load_config(workdir)
  except workdir_lib.WorkdirError as e:
    raise UsageError(str(e)) from e
  task = cfg.get("task", "digits")
  if task == "digits":
    raise UsageError(f"run {name!r} is a digits run (task = 'digits' in {cfg_path}): its DiT has no diffusers "
                     "counterpart, so there is nothing to export; export-lora / export-full take SD3 and FLUX runs")
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  steps = workdir_lib._steps(ckpt_dir) if os.path.isdir(ckpt_dir) else []
  if not steps:
    partial = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    raise UsageError(f"run {name!r} has no complete checkpoint in {ckpt_dir}"
                     + (f" (only {partial}: interrupted or set-aside saves are never used)" if partial else "")
                     + ": train it until it saves one, or pass another run")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UsageError(f"--step {step}: run {name!r} has no complete checkpoint {step}; its checkpoints are steps "
                     f"{steps} (without --step: {steps[-1]}, the latest)")
  weights_dir = config_dir or cfg.model.get("weights_dir", "")
  source = "--config" if config_dir else f"model.weights_dir in {cfg_path}"
  if not weights_dir:
    raise UsageError(f"{cfg_path} has no model.weights_dir: pass --config DIR, the diffusers snapshot (or its "
                     "transformer/ dir) the run was trained from")
  weights_dir = os.path.abspath(os.path.expanduser(weights_dir))
  if not os.path.isdir(weights_dir):
    raise UsageError(f"{source}: the base snapshot {weights_dir} does not exist here"
                     + ("" if config_dir else ": pass --config DIR to point at the snapshot the run was trained from"))
  try:
    tdir = safetensors_io.resolve_component_dir(weights_dir, "transformer", export.CLASS_NAMES)
    base = safetensors_io.read_config(tdir)
  except safetensors_io.ConversionError as e:
    raise UsageError(f"{source}: {weights_dir} is not the run's diffusers snapshot ({e}); pass --config DIR, the "
                     "snapshot (or its transformer/ dir) the run was trained from") from e
  return _Run(name, workdir, ckpt_dir, cfg, step, tdir, base)


def _restore_trainable(run):
  """(TrainState.step, the ``trainable`` tree) of the run's checkpoint, partially restored onto one device."""
  from normguard_jax.analysis import workdir as workdir_lib
  try:
    _, state, meta = workdir_lib.restore_checkpoint(run.ckpt_dir, run.step, keys=("step", "trainable"))
  except workdir_lib.WorkdirError as e:
    raise UsageError(str(e)) from e
  if not meta.get("done"):
    print(f"note: run {run.name!r} is unfinished; exporting its checkpoint {run.step}", file=sys.stderr)
  return int(np.asarray(state["step"])), state["trainable"]


def _model_config(run, fam, lora_rank):
  """Our model config of the run: the snapshot's architecture, the run's scan layout and LoRA settings."""
  from normguard_jax import config as config_lib
  rl = run.cfg.rl
  try:
    return fam.converter.config_from_diffusers(
        run.base, scan_layers=bool(run.cfg.model.get("scan_layers", True)), lora_rank=lora_rank,
        lora_alpha=float(rl.lora_alpha), lora_targets=tuple(config_lib.csv(rl.lora_targets)))
  except ValueError as e:
    raise UsageError(f"{run.workdir}/config.json: {e}") from e


def _check_run_flags(args, run):
  """Flags of the tree form that a run already answers: refuse a --key, or a --lora-* that contradicts it."""
  if args.key:
    raise UsageError("--key is for an orbax tree; a run dir needs none (the checkpoint's 'trainable' is exported)")
  rl = run.cfg.rl
  for flag, value, known in (("--lora-alpha", getattr(args, "lora_alpha", None), float(rl.lora_alpha)),
                             ("--lora-rank", getattr(args, "lora_rank", None), int(rl.lora_rank))):
    if value is not None and value != known:
      raise UsageError(f"{flag} {value} contradicts the run's config.json ({known}); drop the flag: a run dir "
                       "knows its own LoRA settings")


def _run_or_none(args):
  """A _Run when CKPT is a run dir; UsageError for a checkpoint folder / workdir; None for an orbax tree."""
  path = os.path.abspath(os.path.expanduser(args.ckpt))
  if not os.path.exists(path):
    raise UsageError(f"{args.ckpt} does not exist: pass a run dir WORKDIR/runs/<name> (or an orbax tree)")
  kind = _kind(path)
  if kind == "item" and args.key:
    return None  # the older form: <step>/state --key trainable
  if kind in ("step", "item", "checkpoints", "workdir"):
    raise _not_a_run(path, kind)
  if kind == "tree":
    return None
  run = _open_run(path, args.step, args.config)
  _check_run_flags(args, run)
  return run


def _dtype(name):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return {"float32": np.float32, "float16": np.float16}[name]


def cmd_export_full(args):
  from normguard_jax.convert import export
  shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
  run = _run_or_none(args)
  if run is None:
    if args.step is not None:
      raise UsageError("--step is for a run dir WORKDIR/runs/<name>")
    params = _restore(args.ckpt, args.key)
    base = _base_config(args.ckpt, args.config)
    cfg = _family(base).converter.config_from_diffusers(base, scan_layers=_is_scanned(params))
    out = export.save_transformer(args.out, cfg, params, base_config=base, dtype=_dtype(args.dtype),
                                  max_shard_bytes=shard)
    print(json.dumps({"out": os.path.abspath(out)}))
    return out
  fam = _family(run.base)
  rank = int(run.cfg.rl.lora_rank)
  cfg = _model_config(run, fam, rank)
  iteration, trainable = _restore_trainable(run)
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  if rank > 0:  # merge into the base snapshot's weights, read at float32
    _, params = fam.converter.load_transformer(run.transformer_dir, scan_layers=cfg.scan_layers)
    params = export.merge_lora(cfg, params, trainable, adapter=args.adapter)
  else:
    params = trainable
  out = export.save_transformer(args.out, base_cfg, params, base_config=run.base, dtype=_dtype(args.dtype),
                                max_shard_bytes=shard)
  print(json.dumps({"out": os.path.abspath(out), "run": run.name, "step": run.step, "iteration": iteration,
                    "merged_lora": rank > 0, "rank": rank, "alpha": float(run.cfg.rl.lora_alpha)}))
  return out


def cmd_export_lora(args):
  from normguard_jax.convert import export
  run = _run_or_none(args)
  if run is None:
    if args.step is not None:
      raise UsageError("--step is for a run dir WORKDIR/runs/<name>")
    if args.lora_alpha is None:
      raise UsageError("--lora-alpha is required for an orbax tree (a run dir WORKDIR/runs/<name> needs none: its "
                       "config.json has it)")
    lora = _restore(args.ckpt, args.key)
    base = _base_config(args.ckpt, args.config)
    fam = _family(base)
    ranks = {np.shape(a)[-2] for p, a in export._leaf_paths(lora).items() if p[-1] == "lora_a"}
    if len(ranks) != 1:
      raise UsageError(f"expected one LoRA rank in the tree, found {sorted(ranks)} (is --key right?)")
    rank = args.lora_rank or ranks.pop()
    probe = fam.converter.config_from_diffusers(base, scan_layers=_is_scanned(lora), lora_rank=rank)
    targets = export.lora_targets_from_tree(probe, lora)
    cfg = dataclasses.replace(probe, lora_alpha=args.lora_alpha, lora_targets=targets)
    path = export.save_lora(args.out, cfg, lora, adapter=args.adapter, fold_alpha=not args.no_fold_alpha)
    print(json.dumps({"out": os.path.abspath(path), "rank": rank, "alpha": args.lora_alpha, "targets": targets}))
    return path
  rank = int(run.cfg.rl.lora_rank)
  if rank <= 0:
    raise UsageError(f"run {run.name!r} fine-tunes all weights (rl.lora_rank = 0): it has no LoRA to export; "
                     "use export-full")
  fam = _family(run.base)
  cfg = _model_config(run, fam, rank)
  iteration, trainable = _restore_trainable(run)
  path = export.save_lora(args.out, cfg, trainable, adapter=args.adapter, fold_alpha=not args.no_fold_alpha)
  print(json.dumps({"out": os.path.abspath(path), "run": run.name, "step": run.step, "iteration": iteration,
                    "rank": rank, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets),
                    "modules": len(export._lora_modules(cfg))}))
  return path


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  a = sub.add_parser("to-jax", help="diffusers dir -> orbax params + manifest")
  a.add_argument("src")
  a.add_argument("out")
  a.add_argument("--no-scan-layers", dest="scan_layers", action="store_false")
  a.add_argument("--variant", default=None)
  a.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"))
  a.add_argument("--no-hash", action="store_true", help="record file sizes only (no sha256)")
  a.add_argument("--force", action="store_true", help="overwrite OUT/params")
  a.set_defaults(fn=cmd_to_jax)
  for name, fn, helptext in (("export-full", cmd_export_full, "run or orbax params -> diffusers transformer dir"),
                             ("export-lora", cmd_export_lora, "run or orbax lora tree -> PEFT LoRA safetensors")):
    e = sub.add_parser(name, help=helptext)
    e.add_argument("ckpt", metavar="RUN", help="WORKDIR/runs/<name> (or an orbax tree, see above)")
    e.add_argument("out")
    e.add_argument("--step", type=int, default=None, help="checkpoint step of the run (default: the latest complete)")
    e.add_argument("--config", default=None,
                   help="run: the base diffusers snapshot, if model.weights_dir has moved; tree: diffusers dir or "
                        "to-jax manifest.json (architecture)")
    e.add_argument("--key", default=None, help="tree only: slash path into the restored tree, e.g. trainable")
    e.add_argument("--adapter", type=int, default=0, help="index on the stacked-adapter (last) axis")
    e.set_defaults(fn=fn)
    if name == "export-full":
      e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
      e.add_argument("--max-shard-gb", type=float, default=None)
    else:
      e.add_argument("--lora-alpha", type=float, default=None, help="tree only (a run's config.json has it)")
      e.add_argument("--lora-rank", type=int, default=None, help="tree only; default: read off the tree")
      e.add_argument("--no-fold-alpha", action="store_true", help="keep B as trained; alpha in the metadata")
  args = p.parse_args(argv)
  from normguard_jax.convert.safetensors_io import ConversionError
  try:
    return args.fn(args)
  except (UsageError, ConversionError) as e:
    print(f"{p.prog} {args.cmd}: error: {e}", file=sys.stderr)
    raise SystemExit(2) from e


cli = command.installed(main)


if __name__ == "__main__":
  sys.exit(cli(sys.argv[1:]))
