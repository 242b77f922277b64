"""python -m normguard_jax.train --config configs/tiny_digits.py[:smoke] --workdir DIR [--config.a.b=v ...]"""

import argparse
import logging
import sys

from normguard_jax import config as config_lib


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m normguard_jax.train", description=__doc__)
  parser.add_argument("--config", default="configs/tiny_digits.py",
                      help="config file, optionally with a variant: path.py[:arg]")
  parser.add_argument("--workdir", required=True, help="output directory (its parent must exist)")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unrecognised argument {item!r}; overrides look like --config.rl.iterations=50")
    overrides.append(item[len("--config."):])
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
  from normguard_jax.parallel import distributed
  distributed.maybe_initialize()  # multi-host (TPU pod, or NORMGUARD_COORDINATOR=...): before any computation
  try:
    cfg = config_lib.apply_overrides(config_lib.load(args.config), overrides)
    config_lib.validate(cfg)
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
  if report is None:  # not process 0: the report is written there
    return 0
  print(f"report: {workdir}/report.json")
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
