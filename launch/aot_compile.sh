#!/usr/bin/env bash
# Ahead-of-time compile of the train step for a TPU topology on any host (CPU is fine) and print per-device memory.
#   launch/aot_compile.sh --topology v5p-128 --model sd35_medium [--mesh data=1,fsdp=-1,tensor=1] [--remat]
# Needs libtpu: it installs "jax[tpu]" into .venv-tpu on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-tpu/bin/python ] || { python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -q 'jax[tpu]' -r requirements.txt; }
exec .venv-tpu/bin/python -m normguard_jax.parallel.aot "$@"
