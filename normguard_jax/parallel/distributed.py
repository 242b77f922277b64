"""Multi-host initialisation and global statistics.

Every host runs the same command (TPU pod: ``gcloud ... ssh --worker=all``). :func:`maybe_initialize` calls
``jax.distributed.initialize()`` once, only when the environment says this is a multi-process job (a Cloud TPU
pod slice, or explicit coordinator settings), so single-host and CPU runs need no flag. Statistics that must be
global (group advantages, reward means) are computed on global arrays inside jit, where XLA inserts the
cross-host collectives; no host ever reduces alone.
"""

import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)
_INITIALIZED = False

# Environment variables that mark a multi-process job (the explicit ones take precedence).
_EXPLICIT = ("NORMGUARD_COORDINATOR", "NORMGUARD_NUM_PROCESSES", "NORMGUARD_PROCESS_ID")


def maybe_initialize(force=None):
  """Initialise ``jax.distributed`` when needed; idempotent. Returns True when it ran.

  * ``NORMGUARD_COORDINATOR=host:port NORMGUARD_NUM_PROCESSES=N NORMGUARD_PROCESS_ID=i``: explicit settings
    (multi-process CPU/GPU, or the two-process test on localhost; CPU jobs also get gloo collectives).
  * Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` lists more than one host) or Slurm / Open MPI: JAX's
    auto-detection, ``jax.distributed.initialize()`` with no arguments.
  * ``NORMGUARD_SKIP_DISTRIBUTED=1`` or ``force=False``: never.
  """
  global _INITIALIZED
  if _INITIALIZED or force is False or os.environ.get("NORMGUARD_SKIP_DISTRIBUTED") == "1":
    return False
  env = os.environ
  if all(k in env for k in _EXPLICIT):
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["NORMGUARD_COORDINATOR"],
                               num_processes=int(env["NORMGUARD_NUM_PROCESSES"]),
                               process_id=int(env["NORMGUARD_PROCESS_ID"]))
  elif force or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1 \
      or "SLURM_NTASKS" in env or "OMPI_COMM_WORLD_SIZE" in env:
    jax.distributed.initialize()
  else:
    return False
  _INITIALIZED = True
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_main_process():
  """Host 0 writes logs, reports and plots; every host takes part in checkpoints (orbax coordinates)."""
  return jax.process_index() == 0


def process_rows(global_batch_size):
  """The [start, stop) rows of the global batch that this host feeds."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {n} processes")
  per = global_batch_size // n
  return i * per, (i + 1) * per


def any_process(flag):
  """``flag`` OR-ed over all processes, the same bool on every process. A collective: every process must call it
  at the same point of the program (decisions that change control flow are agreed by all hosts, DESIGN.md §5)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag), np.int32))))


def all_equal(value):
  """Whether an int ``value`` is the same on every process (a collective, like :func:`any_process`)."""
  if jax.process_count() == 1:
    return True
  from jax.experimental import multihost_utils
  values = np.asarray(multihost_utils.process_allgather(np.asarray(int(value), np.int64)))
  return bool(np.all(values == values.reshape(-1)[0]))


def barrier(name):
  """Wait until every process reaches this point (file-system side effects of process 0, then the others)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def host_array(x):
  """A (possibly multi-host, sharded) global array as a host numpy array on every process."""
  if jax.process_count() == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)  # host data, or a process-local array (computed the same on every host)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
