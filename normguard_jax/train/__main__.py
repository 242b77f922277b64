"""python -m normguard_jax.train --config RECIPE.py[:variant] --workdir DIR [--config.a.b=value ...]

Runs the main job of a recipe: the reference model, then one online RL run per method and NormGuard setting,
then the report. Rerunning the same command on the same workdir resumes; a larger --config.rl.iterations extends
finished runs. Exit status: 0 done, 1 a run did not finish cleanly, 2 bad config or input files, 3 preempted
(SIGTERM; rerun to resume)."""

import argparse
import ast
import logging
import os
import sys

from normguard_jax import config as config_lib

PATH_FIELDS = ("model.weights_dir", "data.embeddings_dir")


def recipes_dir():
  """The checkout's configs/ (beside the package), else ./configs."""
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
  return here if os.path.isdir(here) else os.path.join(os.getcwd(), "configs")


def required_paths(cfg):
  """The local paths a recipe needs and does not set (empty strings): the user must pass them."""
  out = [f for f in PATH_FIELDS if f.split(".")[0] in cfg and not cfg[f.split(".")[0]].get(f.split(".")[1], "x")]
  for name, opts in config_lib.reward_options(cfg).items():
    out += [f"reward.options.{name}.{k}" for k, v in opts.items() if v == "" and k.endswith(("_dir", "url"))]
  return out


def recipes_help():
  d = recipes_dir()
  if not os.path.isdir(d):
    return "recipes: none found (no configs/ directory in the checkout or the working directory)"
  lines = [f"recipes in {os.path.relpath(d)}/ (variants with :name):"]
  for f in sorted(os.listdir(d)):
    if not f.endswith(".py") or f.startswith("_"):
      continue
    path = os.path.join(d, f)
    try:
      cfg = config_lib.load(path)
      with open(path) as fh:
        doc = (ast.get_docstring(ast.parse(fh.read())) or "").strip().splitlines()
      doc = doc[0] if doc else ""
    except Exception as e:  # noqa: BLE001 - listing must not fail on one broken file
      lines.append(f"  {os.path.relpath(path)}  (does not load: {e})")
      continue
    need = required_paths(cfg)
    lines.append(f"  {os.path.relpath(path):34s} {doc}")
    if need:
      lines.append(f"  {'':34s} needs: " + " ".join(f"--config.{k}=..." for k in need))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m normguard_jax.train", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=recipes_help())
  parser.add_argument("--config", default=None, help="recipe file, optionally with a variant: path.py[:variant]")
  parser.add_argument("--workdir", default=None, help="output directory (its parent must exist)")
  args, rest = parser.parse_known_args(argv)
  if args.config is None:
    print("error: --config is required: pass a recipe, e.g. --config configs/tiny_digits.py (the CPU default)\n\n"
          + recipes_help(), file=sys.stderr)
    return 2
  if args.workdir is None:
    print("error: --workdir is required (the run's output directory; its parent must exist)", file=sys.stderr)
    return 2
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      print(f"error: unrecognised argument {item!r}; overrides look like --config.rl.iterations=50", file=sys.stderr)
      return 2
    overrides.append(item[len("--config."):])
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  from normguard_jax.parallel import distributed, tpu_flags
  tpu_flags.apply()  # the libtpu flags the AOT check compiled with (read by libtpu only; before JAX starts)
  distributed.maybe_initialize()  # multi-host (TPU pod, or NORMGUARD_COORDINATOR=...): before any computation
  import jax
  main_process = distributed.is_main_process()
  try:
    cfg = config_lib.apply_overrides(config_lib.load(args.config), overrides)
    config_lib.validate(cfg)
    config_lib.check_batch_layout(cfg, jax.device_count())
    from normguard_jax.train import loop  # heavy imports after the config is known to be good
    workdir = loop.prepare_workdir(args.workdir)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from normguard_jax.train.checkpoint import PreemptionGuard
  with PreemptionGuard() as guard:
    try:
      report = loop.run(cfg, workdir, guard)
    except config_lib.ConfigError as e:  # found while opening the model or data files, before any training
      print(f"error: {e}", file=sys.stderr)
      return 2
  if report.get("already_finished"):
    if main_process:
      print(f"already finished: every run has {cfg.rl.iterations} iterations; report: {workdir}/report.json "
            "(raise --config.rl.iterations to extend)")
    return 0
  if main_process:
    print(f"report: {workdir}/report.json")
  if report.get("reference_error"):
    print(f"error: the reference evaluation failed: {report['reference_error']} (report.json records it)",
          file=sys.stderr)
    return 1
  if any(r["status"] == "preempted" for r in report["runs"]):
    print("preempted (SIGTERM): checkpoint saved; rerun the same command to resume", file=sys.stderr)
    return 3
  failed = [r["name"] for r in report["runs"] if r["status"] != "ok"]
  if failed:
    print(f"error: runs did not finish cleanly: {failed} (see report.json)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
