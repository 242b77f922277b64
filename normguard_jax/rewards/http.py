"""JSON-over-HTTP with bounded retries, shared by the remote reward client and the MLLM judge.

Standard library only. ``post_json`` retries, with exponential backoff and jitter, on what can be transient:
connection errors, timeouts, HTTP 408/429/5xx, a body that is not JSON, and a reply that the caller's
``validate`` rejects (``validate`` raises ``BadReply``). Other 4xx replies are caller bugs and fail at once.
When it gives up it raises ``RemoteCallError`` (or the caller's subclass) naming the URL, the last HTTP status,
what was wrong and every attempt; it never invents a value.

Also here: the wire format for images (float [-1, 1] or uint8 NHWC -> PNG/JPEG bytes -> base64).
"""

import base64
import http.client
import io
import ipaddress
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RemoteCallError(RuntimeError):
  """A remote call failed for good. ``url``, ``status`` (last HTTP status or None), ``attempts``, ``errors``."""

  def __init__(self, message, *, url=None, status=None, attempts=0, errors=()):
    super().__init__(message)
    self.url, self.status, self.attempts, self.errors = url, status, attempts, list(errors)


class BadReply(ValueError):
  """Raised by a ``validate`` callback: the reply parsed as JSON but is not what the protocol promises."""


class CallStats:
  """Thread-safe counters: ``requests``, ``attempts``, ``retries``, ``failures`` and ``retry_reasons``."""

  def __init__(self):
    self._lock = threading.Lock()
    self.data = {"requests": 0, "attempts": 0, "retries": 0, "failures": 0, "retry_reasons": {}}

  def add(self, key, n=1):
    with self._lock:
      self.data[key] += n

  def retry(self, kind):
    with self._lock:
      self.data["retries"] += 1
      self.data["retry_reasons"][kind] = self.data["retry_reasons"].get(kind, 0) + 1

  def snapshot(self):
    with self._lock:
      return {**self.data, "retry_reasons": dict(self.data["retry_reasons"])}


def _is_loopback(url):
  host = urllib.parse.urlsplit(url).hostname or ""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_DEFAULT = urllib.request.build_opener()


class _Attempt(Exception):
  """One failed attempt: ``kind`` (timeout, connection, http_500, malformed_json, bad_reply, ...) and ``retry``."""

  def __init__(self, kind, detail, status=None, retry=True):
    super().__init__(f"{kind}: {detail}")
    self.kind, self.detail, self.status, self.retry = kind, detail, status, retry


def _once(url, body, headers, timeout_s, validate):
  req = urllib.request.Request(url, data=body, headers=headers, method="POST")
  opener = _DIRECT if _is_loopback(url) else _DEFAULT  # loopback never goes through an env proxy
  try:
    with opener.open(req, timeout=timeout_s) as resp:
      status, raw = resp.status, resp.read()
  except urllib.error.HTTPError as e:
    text = e.read()[:300].decode("utf-8", "replace") if e.fp is not None else ""
    retry = e.code in RETRY_STATUSES
    raise _Attempt(f"http_{e.code}", f"HTTP {e.code} {e.reason}: {text!r}", status=e.code, retry=retry) from None
  except (socket.timeout, TimeoutError) as e:
    raise _Attempt("timeout", f"no reply within {timeout_s:g} s ({e})") from None
  except urllib.error.URLError as e:
    if isinstance(e.reason, (socket.timeout, TimeoutError)):
      raise _Attempt("timeout", f"no reply within {timeout_s:g} s ({e.reason})") from None
    raise _Attempt("connection", f"connection failed: {e.reason}") from None
  except (ConnectionError, OSError, http.client.HTTPException) as e:  # reset, broken pipe, incomplete read
    raise _Attempt("connection", f"connection failed: {e!r}") from None
  try:
    obj = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise _Attempt("malformed_json", f"reply is not JSON ({e}): {raw[:200]!r}", status=status) from None
  if validate is None:
    return obj
  try:
    return validate(obj)
  except BadReply as e:
    raise _Attempt("bad_reply", str(e), status=status) from None


def post_json(url, payload, *, timeout_s=30.0, max_attempts=4, backoff_s=0.5, max_backoff_s=8.0, validate=None,
              headers=None, stats=None, error_cls=RemoteCallError, what="request", rng=None):
  """POST ``payload`` as JSON to ``url``; return ``validate(reply)`` (or the reply). Retries as in the module doc.

  Attempt k (k >= 1) that fails waits ``min(max_backoff_s, backoff_s * 2**(k-1)) * U(1, 1.5)`` before the next.
  ``timeout_s`` bounds each socket operation (connect, each read). ``stats`` is a ``CallStats``.
  """
  if max_attempts < 1:
    raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
  body = json.dumps(payload, allow_nan=False).encode("utf-8")
  hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
  rng = rng or random
  errors = []
  last_status = None
  if stats is not None:
    stats.add("requests")
  for attempt in range(1, max_attempts + 1):
    if stats is not None:
      stats.add("attempts")
    try:
      return _once(url, body, hdrs, timeout_s, validate)
    except _Attempt as e:
      errors.append(f"attempt {attempt}: {e}")
      last_status = e.status if e.status is not None else last_status
      if not e.retry or attempt == max_attempts:
        if stats is not None:
          stats.add("failures")
        why = "not retryable" if not e.retry else "retries exhausted"
        raise error_cls(f"{what}: POST {url} failed after {attempt} attempt(s) ({why}); last HTTP status "
                        f"{last_status}; last error {e}; history: " + " | ".join(errors),
                        url=url, status=last_status, attempts=attempt, errors=errors) from None
      delay = min(max_backoff_s, backoff_s * 2 ** (attempt - 1)) * (1.0 + 0.5 * rng.random())
      if stats is not None:
        stats.retry(e.kind)
      log.warning("%s: POST %s attempt %d/%d failed (%s); retrying in %.3f s", what, url, attempt, max_attempts,
                  e, delay)
      time.sleep(delay)
  raise AssertionError("unreachable")


# ----- image wire format ---------------------------------------------------------------------------------------

def to_uint8(images):
  """(B, H, W, C) float in [-1, 1] (clipped) or uint8 -> uint8 numpy, C in {1, 3, 4}."""
  x = np.asarray(images)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"images must be (B, H, W, C) with C in (1, 3, 4), got shape {x.shape}")
  if x.dtype == np.uint8:
    return x
  x = np.nan_to_num(x.astype(np.float32), nan=0.0)
  return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def encode_image(img, image_format="png"):
  """One (H, W, C) uint8 image -> PNG or JPEG bytes."""
  from PIL import Image
  mode = {1: "L", 3: "RGB", 4: "RGBA"}[img.shape[-1]]
  pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode=mode)
  buf = io.BytesIO()
  fmt = image_format.lower()
  if fmt == "png":
    pil.save(buf, format="PNG")
  elif fmt in ("jpeg", "jpg"):
    pil.convert("RGB" if mode == "RGBA" else mode).save(buf, format="JPEG", quality=95)
  else:
    raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
  return buf.getvalue()


def b64_image(img, image_format="png"):
  return base64.b64encode(encode_image(img, image_format)).decode("ascii")


def data_url(img, image_format="png"):
  mime = "image/png" if image_format.lower() == "png" else "image/jpeg"
  return f"data:{mime};base64,{b64_image(img, image_format)}"


def decode_image(b64_or_data_url):
  """base64 (or data URL) PNG/JPEG -> (H, W, C) uint8."""
  from PIL import Image
  s = b64_or_data_url
  if s.startswith("data:"):
    s = s.split(",", 1)[1]
  img = np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))
  return img[..., None] if img.ndim == 2 else img
