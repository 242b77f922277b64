#!/usr/bin/env bash
# Local CPU launcher: the embedded default (or any config) in this checkout's virtual environment.
#   launch/cpu_local.sh [CONFIG] [WORKDIR] [--config.a.b=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/tiny_digits.py}; workdir=${2:-runs/digits}; shift $(( $# > 2 ? 2 : $# ))
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; }
mkdir -p "$(dirname "$workdir")"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
exec .venv/bin/python -m normguard_jax.train --config "$config" --workdir "$workdir" "$@"
