"""Train-state checkpoints with orbax (DESIGN.md §6).

An orbax ``CheckpointManager`` per run: async saves every ``every`` iterations, the last ``keep`` kept, each
holding the full ``TrainState`` (params or adapters, the frozen reference, optimizer state with NormGuard's
lambda, old/EMA params, RNG, step) and a JSON ``meta`` item (iteration = data position, eval history, config).

* Resume: :meth:`RunCheckpointer.restore_latest` returns the newest checkpoint that restores. A checkpoint that
  fails to restore is moved aside to ``<step>.corrupt-<time>`` with a warning (never silently overwritten or
  deleted) and the previous one is tried. Orbax finalises a save by an atomic rename, so a save killed half-way
  leaves only a ``*.orbax-checkpoint-tmp*`` folder that is never listed as a step.
* Restore onto another mesh: pass an abstract state whose leaves carry the new shardings.
* Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag the loop polls after each iteration, agreed across
  hosts; every host then saves synchronously at that iteration and exits cleanly (status 3).
* Multi-host: every process restores the same step; a damaged step is moved aside by process 0 behind a barrier.
"""

import json
import logging
import os
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp

from normguard_jax.parallel import distributed

log = logging.getLogger(__name__)


class RunCheckpointer:
  def __init__(self, directory, *, every=25, keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    self.every = every
    os.makedirs(self.directory, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def all_steps(self):
    return sorted(self._mngr.all_steps())

  def save(self, iteration, state, meta, *, force=False):
    """Async save (returns at once) when ``iteration`` is on the interval, or always with ``force``."""
    if not force and iteration % self.every:
      return False
    if iteration in self._mngr.all_steps():
      return False  # already saved at this iteration (e.g. the periodic save, then the final one)
    self._mngr.save(iteration, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
    return True

  def delete(self, step):
    """Remove a saved step (orbax; process 0 deletes, every process must call it)."""
    self.wait()
    self._mngr.delete(step)

  def wait(self):
    self._mngr.wait_until_finished()

  def restore_latest(self, abstract_state):
    """-> (iteration, state, meta), or None when there is no restorable checkpoint.

    Multi-host: every process tries the same step and they agree (a collective) on whether it restored; a damaged
    step is moved aside by process 0 only, behind a barrier, and then every process tries the previous one. So all
    processes restore the same step, or all start fresh (DESIGN.md §5)."""
    self.wait()
    for step in sorted(self._mngr.all_steps(), reverse=True):
      out, error = None, None
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               meta=ocp.args.JsonRestore()))
        jax.block_until_ready(out.state)
      except Exception as e:  # damaged or incompatible: set aside below, keep it for inspection
        error = e
      if not distributed.any_process(error is not None):
        if not distributed.all_equal(step):
          raise RuntimeError(f"{self.directory}: processes restored different checkpoint steps (this one: {step}); "
                             "is the checkpoint directory the same shared path on every host?")
        return step, out.state, out.meta
      if distributed.is_main_process():
        aside = os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}")
        log.warning("checkpoint %s/%s does not restore (%s); moved to %s, trying the previous one", self.directory,
                    step, f"{type(error).__name__}: {str(error)[:200]}" if error else "failed on another process",
                    aside)
        os.rename(os.path.join(self.directory, str(step)), aside)
      distributed.barrier(f"normguard_ckpt_aside_{step}")
      self._mngr.reload()
    return None

  def close(self):
    self.wait()
    self._mngr.close()


def latest_meta(directory):
  """The JSON ``meta`` item of the newest complete checkpoint in ``directory`` (no arrays are read), or None."""
  if not os.path.isdir(directory):
    return None
  steps = sorted((int(p) for p in os.listdir(directory) if p.isdigit()), reverse=True)
  for step in steps:
    path = os.path.join(directory, str(step), "meta", "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError):
      continue
  return None


class PreemptionGuard:
  """Catch SIGTERM (the preemption notice on Cloud TPU / GKE / Slurm) and let the loop save before exiting.

  The signal reaches each host on its own schedule; :meth:`should_stop` agrees on it across processes (a
  collective that every process calls once per iteration), so all hosts save at the same iteration and exit
  together, instead of one host entering the save while the others enter the next rollout's collectives."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    log.warning("SIGTERM received: saving a checkpoint at the end of this iteration, then exiting")
    self.requested = True

  def should_stop(self):
    """True on every process when any process has seen SIGTERM (collective; call it at the same point on all)."""
    return distributed.any_process(self.requested)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
