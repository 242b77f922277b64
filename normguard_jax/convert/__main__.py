"""Convert SD3/SD3.5 and FLUX.1 / FLUX.2 transformers between diffusers and our orbax param trees.

  python -m normguard_jax.convert to-jax SRC OUT [--no-scan-layers] [--variant fp16] [--no-hash]
      SRC: a local diffusers pipeline dir (or its transformer/ dir); the model family (SD3Transformer2DModel,
      FluxTransformer2DModel, Flux2Transformer2DModel) comes from config.json's _class_name. Writes OUT/params (an orbax
      StandardCheckpointer tree: our params) and OUT/manifest.json (source, file sizes and sha256, the
      diffusers config, our config, param count).
  python -m normguard_jax.convert export-full CKPT OUT [--config DIR|manifest.json] [--key state/trainable]
      CKPT: an orbax tree (to-jax's OUT/params, or a train checkpoint's <step>/state with --key). Writes a
      diffusers transformer dir (config.json + safetensors) that the diffusers class's from_pretrained loads.
  python -m normguard_jax.convert export-lora CKPT OUT --config DIR|manifest.json --lora-alpha A [--key ...]
      Writes OUT/pytorch_lora_weights.safetensors (PEFT keys, adapter 0 by default, alpha folded into B unless
      --no-fold-alpha) for pipe.load_lora_weights / transformer.load_lora_adapter.

The architecture comes from --config (a diffusers dir, or a to-jax manifest); for a to-jax output dir it is
found next to the checkpoint. Scan layout, LoRA rank and LoRA targets are read off the checkpoint's tree.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import sys

import numpy as np

MANIFEST = "manifest.json"


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
      raise SystemExit(f"--key: {k!r} not found in the checkpoint tree (have {sorted(tree) if isinstance(tree, dict) else type(tree)})")
    tree = tree[k]
  return tree


def _base_config(ckpt, config):
  """-> the diffusers config.json dict, from --config (dir or manifest) or the manifest next to CKPT."""
  from normguard_jax.convert import export, safetensors_io
  cands = [config] if config else [os.path.join(ckpt, MANIFEST), os.path.join(os.path.dirname(os.path.abspath(ckpt)), MANIFEST)]
  for c in cands:
    if c and os.path.isfile(c) and c.endswith(".json"):
      with open(c) as f:
        return json.load(f)["diffusers_config"]
    if c and os.path.isdir(c):
      if os.path.isfile(os.path.join(c, MANIFEST)):
        with open(os.path.join(c, MANIFEST)) as f:
          return json.load(f)["diffusers_config"]
      return safetensors_io.read_config(safetensors_io.resolve_component_dir(c, "transformer", export.CLASS_NAMES))
  raise SystemExit("no architecture: pass --config (a diffusers dir or a to-jax manifest.json)")


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
  for f in sorted({f.path for f in ckpt.files} | {os.path.join(tdir, "config.json")}
                  | ({os.path.join(tdir, os.path.basename(ckpt.description))} if ckpt.description.endswith(".json") else set())):
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


def cmd_export_full(args):
  from normguard_jax.convert import export
  params = _restore(args.ckpt, args.key)
  base = _base_config(args.ckpt, args.config)
  cfg = _family(base).converter.config_from_diffusers(base, scan_layers=_is_scanned(params))
  dtype = {"float32": np.float32, "bfloat16": None, "float16": np.float16}[args.dtype]
  if dtype is None:
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
  shard = int(args.max_shard_gb * 2**30) if args.max_shard_gb else None
  out = export.save_transformer(args.out, cfg, params, base_config=base, dtype=dtype, max_shard_bytes=shard)
  print(json.dumps({"out": os.path.abspath(out)}))
  return out


def cmd_export_lora(args):
  from normguard_jax.convert import export
  lora = _restore(args.ckpt, args.key)
  base = _base_config(args.ckpt, args.config)
  fam = _family(base)
  flat = export._leaf_paths(lora)
  ranks = {np.shape(a)[-2] for p, a in flat.items() if p[-1] == "lora_a"}
  targets = tuple(t for t in fam.lora_targets if any(p[-2] == t for p in flat))
  if len(ranks) != 1:
    raise SystemExit(f"expected one LoRA rank in the tree, found {sorted(ranks)} (is --key right?)")
  rank = args.lora_rank or ranks.pop()
  cfg = fam.converter.config_from_diffusers(base, scan_layers=_is_scanned(lora), lora_rank=rank,
                                           lora_alpha=args.lora_alpha, lora_targets=targets)
  path = export.save_lora(args.out, cfg, lora, adapter=args.adapter, fold_alpha=not args.no_fold_alpha)
  print(json.dumps({"out": os.path.abspath(path), "rank": rank, "alpha": args.lora_alpha, "targets": targets}))
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
  for name, fn, helptext in (("export-full", cmd_export_full, "orbax params -> diffusers transformer dir"),
                             ("export-lora", cmd_export_lora, "orbax lora tree -> PEFT LoRA safetensors")):
    e = sub.add_parser(name, help=helptext)
    e.add_argument("ckpt")
    e.add_argument("out")
    e.add_argument("--config", default=None, help="diffusers dir or to-jax manifest.json (architecture)")
    e.add_argument("--key", default=None, help="slash path into the restored tree, e.g. trainable")
    e.set_defaults(fn=fn)
    if name == "export-full":
      e.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
      e.add_argument("--max-shard-gb", type=float, default=None)
    else:
      e.add_argument("--lora-alpha", type=float, required=True)
      e.add_argument("--lora-rank", type=int, default=None, help="default: read off the tree")
      e.add_argument("--adapter", type=int, default=0, help="index on the stacked-adapter (last) axis")
      e.add_argument("--no-fold-alpha", action="store_true", help="keep B as trained; alpha in the metadata")
  args = p.parse_args(argv)
  return args.fn(args)


if __name__ == "__main__":
  main(sys.argv[1:])
