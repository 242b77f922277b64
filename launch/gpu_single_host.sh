#!/usr/bin/env bash
# Single host, all local GPUs: one process drives every device; the mesh takes them all (fsdp=-1 by default).
#   launch/gpu_single_host.sh CONFIG WORKDIR [--config.a.b=v ...]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?CONFIG}; workdir=${2:?WORKDIR}; shift 2
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q 'jax[cuda12]' -r requirements.txt; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax_compile}"
mkdir -p "$(dirname "$workdir")"
exec .venv/bin/python -m normguard_jax.train --config "$config" --workdir "$workdir" "$@"
