"""python -m normguard_jax.analysis <command> --workdir DIR [--out OUTDIR] [options]

Commands (each writes JSON + PNG into OUTDIR, default WORKDIR/analysis/<command>/):

  evaluate  held-out reward, quality proxies and rho_k (own and reference trajectories) of the reference and every
            run, at the training step count, 4, 8 and 50 steps, CFG off and on; NormGuard hinge stats over training
  rescale   inference-time rescaling baseline: plain policy vs policy rescaled to ||v_ref|| vs NormGuard policy
  adjoint   dR/d eps_k of per-step velocity scaling by a VJP through the rollout; batch coherence tests; FD check
  compare   a PyTorch run's scalar logs (TensorBoard / CSV / JSONL, Flow-Factory names mapped) next to ours

Every task's workdir works (digits, sd3, flux: config.json names the task). Text-to-image workdirs read the local
files their config names (the VAE in model.weights_dir, the eval prompts in data.embeddings_dir, the negative prompt
for CFG); --set key=value repoints them. The analysis runs on one device.
"""

import argparse
import logging
import os
import sys
import time


def _csv(text, cast=str):
  return [cast(x) for x in str(text).split(",") if x.strip()] if text else None


def _scalar_log_error():
  from normguard_jax.analysis.compare import ScalarLogError
  return ScalarLogError


def _parser():
  p = argparse.ArgumentParser(prog="python -m normguard_jax.analysis", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def common_args(sp):
    sp.add_argument("--workdir", required=True, help="a main-job workdir (holds config.json and runs/)")
    sp.add_argument("--out", default=None, help="output folder (default WORKDIR/analysis/<command>)")
    sp.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the workdir's config.json, e.g. model.weights_dir=DIR (repeatable)")

  def model_args(sp, per_class):
    common_args(sp)
    sp.add_argument("--per-class", "--per-prompt", dest="per_class", type=int, default=per_class,
                    help="held-out samples per condition: per class (digits) or per eval prompt (text tasks)")
    sp.add_argument("--allow-unfinished", action="store_true",
                    help="analyse the newest checkpoint of runs that have not finished")
    sp.add_argument("--shard", action="store_true",
                    help="place params by the rules table over all devices (config.mesh sizes; --set mesh.* to "
                         "change) for models that do not fit one device; on a pod run the same command on every "
                         "host (jax.distributed as in training)")

  sp = sub.add_parser("evaluate", help="held-out eval at several step counts, CFG off/on, norm diagnostics")
  model_args(sp, 10)
  sp.add_argument("--steps", default=None, help="Euler step counts (default: training count,4,8,50)")
  sp.add_argument("--cfg-scale", type=float, default=None,
                  help="the CFG-on scale (default: rollout.cfg_scale if > 1, else 3.0); CFG off is always run")
  sp.add_argument("--no-reference-trajectory", action="store_true", help="skip rho on the reference trajectory")

  sp = sub.add_parser("rescale", help="inference-time rescaling of v_theta to ||v_ref||")
  model_args(sp, 10)
  sp.add_argument("--steps", type=int, default=None, help="Euler steps (default: the training count)")
  sp.add_argument("--cfg-scale", type=float, default=None, help="default: rollout.cfg_scale")

  sp = sub.add_parser("adjoint", help="adjoint sensitivity dR/d eps_k and its batch coherence")
  model_args(sp, 4)
  sp.add_argument("--steps", type=int, default=None, help="Euler steps (default: the training count)")
  sp.add_argument("--cfg-scale", type=float, default=1.0)
  sp.add_argument("--fd-steps", type=int, default=2, help="steps checked by central finite differences (0: none)")
  sp.add_argument("--fd-h", default="0.1,0.03,0.01", help="finite-difference steps in eps (comma-separated)")
  sp.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate of the coherence tests")
  sp.add_argument("--no-reference", action="store_true", help="skip the reference model")

  sp = sub.add_parser("compare", help="PyTorch scalar logs next to ours")
  common_args(sp)
  sp.add_argument("--torch", action="append", required=True,
                  help="event file, CSV, JSONL or a folder of them (repeatable)")
  sp.add_argument("--map", action="append", default=[], help="extra name mapping foreign=ours (repeatable)")
  sp.add_argument("--x", choices=("step", "fraction"), default="step")
  sp.add_argument("--label", default=None)
  return p


def _say(*args, **kw):
  """print on process 0 only (every host runs the command under --shard on a pod)."""
  import jax
  if jax.process_index() == 0:
    print(*args, **kw)


def main(argv=None):
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax warns on every read-only manager
  from normguard_jax.analysis import workdir as workdir_lib
  if "://" in args.workdir:
    print(f"error: --workdir {args.workdir!r}: mount the bucket (gcsfuse) and pass its local path", file=sys.stderr)
    return 2
  workdir = os.path.abspath(os.path.expanduser(args.workdir))
  out = os.path.abspath(args.out or os.path.join(workdir, "analysis", args.command))
  runs = _csv(args.runs)
  t0 = time.time()
  try:
    if args.command == "compare":
      from normguard_jax.analysis import compare
      workdir_lib.load_config(workdir, args.set)  # a clear error for a wrong workdir
      user_map = {}
      for item in args.map:
        k, sep, v = item.partition("=")
        if not sep:
          raise SystemExit(f"error: --map {item!r} is not foreign=ours")
        user_map[k] = v
      result = compare.run(workdir, out, args.torch, runs=runs, user_map=user_map, x=args.x, label=args.label)
      _say(f"compare: {len(result['metrics'])} mapped metric(s); unmapped: "
            f"{ {p: len(s['unmapped']) for p, s in result['sources'].items()} }")
    else:
      from normguard_jax.analysis import quality as quality_lib
      if args.shard:
        from normguard_jax.parallel import distributed
        distributed.maybe_initialize()
      wd = workdir_lib.load_workdir(workdir, runs=runs, require_done=not args.allow_unfinished, overrides=args.set,
                                    shard=args.shard)
      quality = quality_lib.for_task(wd.task, 0)  # the trainer's fixed proxies
      if args.command == "evaluate":
        from normguard_jax.analysis import evaluate
        w = args.cfg_scale or (float(wd.cfg.rollout.cfg_scale) if float(wd.cfg.rollout.cfg_scale) > 1 else 3.0)
        result = evaluate.run(wd, out, per_class=args.per_class, steps=_csv(args.steps, int),
                              cfg_scales=sorted({1.0, w}), quality=quality,
                              reference_trajectory=not args.no_reference_trajectory,
                              require_cfg=args.cfg_scale is not None)
        head = result["table"].get(result["settings"]["headline"], {})
        for name, row in head.items():
          _say(f"{name:>12}: " + " ".join(f"{k} {v:.4g}" if v is not None else f"{k} -" for k, v in row.items()))
      elif args.command == "rescale":
        from normguard_jax.analysis import rescale
        result = rescale.run(wd, out, per_class=args.per_class, num_steps=args.steps, cfg_scale=args.cfg_scale,
                             quality=quality)
        for m, row in result["methods"].items():
          _say(m, {k: {v: round(x, 4) for v, x in d.items()} for k, d in row["summary"].items()
                    if k in ("reward", "class_conf", "out_of_range", "mean_rho")})
      else:
        from normguard_jax.analysis import adjoint
        result = adjoint.run(wd, out, per_class=args.per_class, num_steps=args.steps, cfg_scale=args.cfg_scale,
                             fd_steps=args.fd_steps, fd_h=_csv(args.fd_h, float), alpha=args.alpha,
                             include_reference=not args.no_reference)
        for name, e in result["models"].items():
          g = e["global_scale"]
          _say(f"{name:>12}: coherent steps {e['coherent_steps']}/{e['num_steps']}, global dR/d alpha mean "
                f"{g['mean']:.4g} (std {g['std']:.3g}, p_t {g['p_t']:.3g}), fd rel err "
                f"{e.get('fd_check', {}).get('rel_error', float('nan')):.2e}")
  except workdir_lib.WorkdirError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (FileNotFoundError, _scalar_log_error()) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _say(f"{args.command}: wrote {out} in {time.time() - t0:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
