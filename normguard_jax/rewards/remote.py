"""Remote reward client: scores images with a model served over HTTP (HPSv3, GenEval, OCR, VLM judges...).

Protocol (one request per chunk of at most ``batch_size`` images)::

    POST {url}
    Content-Type: application/json
    {"prompts":  ["a cat", ...] | null,      # one string per image, null when the data has no prompts
     "images":   ["<base64 PNG>", ...],      # uint8 HWC (x + 1) * 127.5, clipped; L, RGB or RGBA; PNG or JPEG
     "metadata": {"reward": name, "image_format": "png", "offset": 0, "batch_size": n, ...user metadata}}

    200 OK
    {"scores": [0.73, ...],                  # exactly n finite numbers (JSON numbers, not strings or null)
     "info":   [{...}, ...]}                 # optional: n per-sample JSON objects (e.g. per-question GenEval)

Anything else is a failed attempt: connection error, timeout, HTTP 408/429/5xx, a body that is not JSON, a missing
or wrong-length ``scores`` list, a non-numeric or non-finite score. Failed attempts are retried with exponential
backoff and jitter (``normguard_jax.rewards.http``); after ``max_attempts`` the reward raises ``RemoteRewardError``.
A failed sample is never scored 0 or NaN. Other 4xx replies (bad URL, bad payload) fail at once.

Overlap: ``submit(batch)`` copies the images to host memory, returns a ``concurrent.futures.Future`` of the (B,)
float32 scores at once, and sends the chunks from a thread pool, so the trainer can sample rollout i+1 while
rollout i is being scored. ``reward(batch)`` is ``submit(batch).result()``. Not jittable: call it on the host.

Multi-host: when every process calls ``reward(batch)`` with the same global batch, each one sends only its share of
the rows and the scores are all-gathered, so the server scores every image once, all hosts train on identical
rewards, and a failure anywhere fails the step everywhere.
"""

import concurrent.futures as cf
import math
import threading

import numpy as np

from normguard_jax.rewards import http


class RemoteRewardError(http.RemoteCallError):
  """The reward server could not score a batch after all retries (message names URL, status, cause, attempts)."""


def _check_scores(n):
  def validate(obj):
    if not isinstance(obj, dict):
      raise http.BadReply(f"reply must be a JSON object with 'scores', got {type(obj).__name__}")
    scores = obj.get("scores")
    if not isinstance(scores, list):
      raise http.BadReply(f"reply has no 'scores' list (keys: {sorted(obj)})")
    if len(scores) != n:
      raise http.BadReply(f"wrong number of scores: sent {n} images, got {len(scores)} scores")
    for i, s in enumerate(scores):
      if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise http.BadReply(f"score {i} is not a number: {s!r}")
      if not math.isfinite(s):
        raise http.BadReply(f"score {i} is not finite: {s!r}")
    info = obj.get("info")
    if info is not None and (not isinstance(info, list) or len(info) != n):
      raise http.BadReply(f"'info' must be a list of {n} entries when present")
    return np.asarray(scores, np.float64).astype(np.float32), info
  return validate


class RemoteReward:
  """Reward scored by an HTTP server speaking the protocol above. ``stats`` counts requests and retries."""

  def __init__(self, url, *, batch_size=16, timeout_s=60.0, max_attempts=4, backoff_s=0.5, max_backoff_s=8.0,
               image_format="png", name="remote", metadata=None, max_workers=4, headers=None):
    if not url:
      raise ValueError("remote reward needs a 'url'")
    if int(batch_size) < 1 or int(max_attempts) < 1 or float(timeout_s) <= 0 or int(max_workers) < 1:
      raise ValueError("batch_size, max_attempts, max_workers must be >= 1 and timeout_s > 0")
    http.encode_image(np.zeros((1, 1, 1), np.uint8), image_format)  # fail early on a bad format
    self.url, self.name, self.image_format = url, name, image_format
    self.batch_size, self.timeout_s, self.max_attempts = int(batch_size), float(timeout_s), int(max_attempts)
    self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
    self.metadata, self.headers = dict(metadata or {}), dict(headers or {})
    self._stats = http.CallStats()
    self._pool = cf.ThreadPoolExecutor(int(max_workers), thread_name_prefix=f"reward-{name}")

  @property
  def stats(self):
    """Snapshot: requests, attempts, retries, failures, retry_reasons {kind: count}."""
    return self._stats.snapshot()

  def _post_chunk(self, images, prompts, offset):
    payload = {
        "prompts": prompts,
        "images": [http.b64_image(im, self.image_format) for im in images],
        "metadata": {**self.metadata, "reward": self.name, "image_format": self.image_format, "offset": offset,
                     "batch_size": len(images)},
    }
    return http.post_json(self.url, payload, timeout_s=self.timeout_s, max_attempts=self.max_attempts,
                          backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s,
                          validate=_check_scores(len(images)), headers=self.headers, stats=self._stats,
                          error_cls=RemoteRewardError, what=f"remote reward {self.name!r} (images {offset}-"
                          f"{offset + len(images) - 1} of the batch)")

  def submit(self, batch, *, with_info=False):
    """Future of the (B,) float32 scores (or ``(scores, infos)``). Images are copied to the host before returning,
    so the caller may donate or overwrite its buffers."""
    try:
      images = http.to_uint8(np.array(batch.images))  # a host copy
    except Exception as e:  # noqa: BLE001 - a tracer gives a clearer error here
      if type(e).__name__.startswith("Tracer"):
        raise TypeError(f"remote reward {self.name!r} is a host reward: call it outside jax.jit") from e
      raise
    n = images.shape[0]
    prompts = None if batch.prompts is None else [str(p) for p in batch.prompts]
    if prompts is not None and len(prompts) != n:
      raise ValueError(f"remote reward {self.name!r}: {len(prompts)} prompts for {n} images")
    starts = list(range(0, n, self.batch_size))
    chunks = [self._pool.submit(self._post_chunk, images[s:s + self.batch_size],
                                None if prompts is None else prompts[s:s + self.batch_size], s) for s in starts]
    out = cf.Future()
    out.set_running_or_notify_cancel()
    lock, left = threading.RLock(), [len(chunks)]

    def done(c):
      with lock:  # re-entrant: cancelling the other chunks runs this callback again, in this thread
        if out.done():
          return
        if c.cancelled() or c.exception() is not None:  # fail fast on the first chunk that gave up
          out.set_exception(RemoteRewardError(f"remote reward {self.name!r}: request cancelled")
                            if c.cancelled() else c.exception())
          for other in chunks:
            other.cancel()
          return
        left[0] -= 1
        if left[0]:
          return
      scores = np.concatenate([c.result()[0] for c in chunks])
      infos = [i for c in chunks for i in (c.result()[1] or [None] * len(c.result()[0]))]
      out.set_result((scores, infos) if with_info else scores)

    if not chunks:
      out.set_result((np.zeros((0,), np.float32), []) if with_info else np.zeros((0,), np.float32))
    for c in chunks:
      c.add_done_callback(done)
    return out

  def __call__(self, batch):
    import jax
    import jax.numpy as jnp
    if jax.process_count() > 1:
      return self._call_multiprocess(batch)
    return jnp.asarray(self.submit(batch).result(), jnp.float32)

  def _call_multiprocess(self, batch):
    """Multi-host: every process calls with the same global batch (the trainer's contract). Each process sends only
    its own contiguous share of the rows, the shares are all-gathered, and every process returns the same (B,)
    scores, as a replicated global array on the images' mesh. A failure on any process fails the call on every
    process after the gather (no process waits forever, and no process trains on a partial reward)."""
    import types

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from normguard_jax.parallel import distributed
    images = distributed.host_array(batch.images)  # the whole batch on every host (all-gathered when sharded)
    n, procs, me = images.shape[0], jax.process_count(), jax.process_index()
    per = -(-n // procs)
    lo, hi = min(me * per, n), min((me + 1) * per, n)
    prompts = None if batch.prompts is None else list(batch.prompts)
    buf = np.zeros((per + 1,), np.float32)
    error = None
    if hi > lo:
      try:
        share = types.SimpleNamespace(images=images[lo:hi], prompts=None if prompts is None else prompts[lo:hi])
        buf[:hi - lo] = self.submit(share).result()
      except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
        error = e
    buf[-1] = 0.0 if error is not None else 1.0
    gathered = np.asarray(multihost_utils.process_allgather(buf))  # (processes, per + 1)
    failed = [p for p in range(procs) if gathered[p, -1] != 1.0]
    if error is not None:
      raise error
    if failed:
      raise RemoteRewardError(f"remote reward {self.name!r}: scoring failed on process(es) {failed} (their logs "
                              "name the cause); this process's share succeeded")
    scores = gathered[:, :per].reshape(-1)[:n]
    sharding = getattr(batch.images, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.device_put(scores, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return jnp.asarray(scores)

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


_OPTIONS = ("url", "batch_size", "timeout_s", "max_attempts", "backoff_s", "max_backoff_s", "image_format", "name",
            "metadata", "max_workers", "headers")


def build(options):
  """Reward builder (register as ``"normguard_jax.rewards.remote:build"``). Options: url (required), batch_size,
  timeout_s, max_attempts, backoff_s, max_backoff_s, image_format ('png'|'jpeg'), name, metadata, max_workers,
  headers."""
  options = dict(options or {})
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise ValueError(f"remote reward: unknown option(s) {unknown}; known: {list(_OPTIONS)}")
  if "url" not in options:
    raise ValueError("remote reward: option 'url' is required")
  return RemoteReward(options.pop("url"), **options)
