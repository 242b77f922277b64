#!/usr/bin/env bash
# The prepared accelerator benchmark: normguard_jax/bench_suite.py at the real SD3.5-Medium preset (random weights,
# bf16), JAX against diffusers PyTorch on the same device, in one process (<= 8 min on one H100-class GPU).
#   launch/bench_accelerator.sh [--out FILE.json] [more bench_suite flags, e.g. --attention cudnn --remat]
# Needs this checkout's venv with jax[cuda12] (or jax[tpu]), torch (a CUDA build on GPU) and diffusers. On a TPU
# host PyTorch has no device: the suite then times JAX only (torch still builds the weights on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # PyTorch shares the device
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "$PY" -m normguard_jax.bench_suite --preset sd35-medium --out "${BENCH_OUT:-bench_accelerator.json}" "$@"
