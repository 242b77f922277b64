"""Train-state checkpoints with orbax (DESIGN.md §6).

An orbax ``CheckpointManager`` per run: async saves every ``every`` iterations, the last ``keep`` kept, each
holding the full ``TrainState`` (params or adapters, the frozen reference, optimizer state with NormGuard's
lambda, old/EMA params, RNG, step) and a JSON ``meta`` item (iteration = data position, eval history, config).

* Resume: :meth:`RunCheckpointer.restore_latest` returns the newest checkpoint that restores. A checkpoint that
  fails to restore is moved aside to ``<step>.corrupt-<time>`` with a warning (never silently overwritten or
  deleted) and the previous one is tried. Orbax finalises a save by an atomic rename, so a save killed half-way
  leaves only a ``*.orbax-checkpoint-tmp*`` folder that is never listed as a step.
* Restore onto another mesh: pass an abstract state whose leaves carry the new shardings.
* Preemption: :class:`PreemptionGuard` turns SIGTERM into a flag the loop polls after each iteration; the loop
  then saves synchronously and exits cleanly.
"""

import logging
import os
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp

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

  def wait(self):
    self._mngr.wait_until_finished()

  def restore_latest(self, abstract_state):
    """-> (iteration, state, meta), or None when there is no restorable checkpoint."""
    self.wait()
    for step in sorted(self._mngr.all_steps(), reverse=True):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               meta=ocp.args.JsonRestore()))
        jax.block_until_ready(out.state)
        return step, out.state, out.meta
      except Exception as e:  # damaged or incompatible: set aside, keep it for inspection, try the previous one
        aside = os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}")
        log.warning("checkpoint %s/%s does not restore (%s: %s); moved to %s, trying the previous one",
                    self.directory, step, type(e).__name__, str(e)[:200], aside)
        os.rename(os.path.join(self.directory, str(step)), aside)
        self._mngr.reload()
    return None

  def close(self):
    self.wait()
    self._mngr.close()


class PreemptionGuard:
  """Catch SIGTERM (the preemption notice on Cloud TPU / GKE / Slurm) and let the loop save before exiting."""

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

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False
