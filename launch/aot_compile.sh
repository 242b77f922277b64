#!/usr/bin/env bash
# Ahead-of-time compile of a recipe's own programs (train step, rollout, VAE decode) for a TPU slice, on any host
# (a CPU is fine): per-chip memory, HBM headroom, FLOPs and a roofline estimate (normguard_jax/parallel/aot.py).
#
#   launch/aot_compile.sh CONFIG TOPOLOGY [--rows-per-chip N] [--fit] [--out FILE.json] [--config.a.b=v ...]
#   e.g. launch/aot_compile.sh configs/sd35_medium_nft.py v5p-128
#        launch/aot_compile.sh configs/sd35_medium_nft.py v6e-64 --config.rl.lora_rank=0 --fit
#
# Needs libtpu: on first use it creates .venv-tpu with "jax[tpu]". The compile uses the libtpu flags of the training
# runs (launch/libtpu_flags.env). Exit status: 0 fits, 3 does not fit HBM, 2 bad config or no libtpu.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/aot_compile.sh CONFIG TOPOLOGY [options]}; topology=${2:?TOPOLOGY, e.g. v5p-128}; shift 2
if [ ! -x .venv-tpu/bin/python ]; then
  python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -q 'jax[tpu]' -r requirements.txt
fi
source launch/libtpu_flags.env
# Compile only: JAX itself runs on the CPU; several compiles (or a training job's libtpu) may share the host.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} ALLOW_MULTIPLE_LIBTPU_LOAD=${ALLOW_MULTIPLE_LIBTPU_LOAD:-1}
exec .venv-tpu/bin/python -m normguard_jax.parallel.aot --config "$config" --topology "$topology" "$@"
