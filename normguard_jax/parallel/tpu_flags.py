"""The libtpu flags of the TPU programs: the training runs and the AOT memory check compile with the same ones, so
that the AOT tool's per-chip figures are those of the run.

Dependency-free on purpose: ``launch/libtpu_flags.env`` runs ``python3 normguard_jax/parallel/tpu_flags.py`` (any
Python, no venv) to export ``LIBTPU_INIT_ARGS``; ``python -m normguard_jax.train`` and ``parallel/aot.py`` call
:func:`apply` before JAX starts its TPU backend. A flag already in ``LIBTPU_INIT_ARGS`` keeps the user's value.
"""

import os
import sys

LIBTPU_FLAGS = (
    # Async collectives: FSDP all-gathers and reduce-scatters overlap with compute (MaxText / maxdiffusion defaults).
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_reduce_scatter_fusion=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    # Per-chip memory independent of the pod (issue 13): from 64 chips on (v5p-128), libtpu gathers the FSDP weight
    # shards of the sampler as all-reduces and its combiner merges a whole MMDiT block's weights (~170 MB bf16 for
    # SD3.5-M) into one all-reduce (seen in the compiled HLO). SD3.5-M rollout, 1 row per chip, measured AOT (libtpu
    # 0.0.42.1): temporaries 0.47 GiB per chip at v5p-128 without this cap (with or without the flags above), 0.28 GiB
    # with it; 0.28 GiB at v5p-8 with this whole list. Its effect on step time is not measured (no TPU was available).
    "--xla_jf_crs_combiner_threshold_in_bytes=16777216",
)


def _name(flag):
  return flag.split("=", 1)[0]


def init_args(existing=None):
  """``existing`` (default: $LIBTPU_INIT_ARGS) plus every flag of :data:`LIBTPU_FLAGS` it does not set."""
  existing = os.environ.get("LIBTPU_INIT_ARGS", "") if existing is None else existing
  have = {_name(f) for f in existing.split()}
  return " ".join([existing.strip()] * bool(existing.strip()) + [f for f in LIBTPU_FLAGS if _name(f) not in have])


def apply():
  """Set ``LIBTPU_INIT_ARGS`` for this process (call before JAX initialises a TPU backend; harmless elsewhere)."""
  os.environ["LIBTPU_INIT_ARGS"] = init_args()
  return os.environ["LIBTPU_INIT_ARGS"]


if __name__ == "__main__":
  sys.stdout.write(init_args() + "\n")
