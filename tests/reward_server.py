"""Reference reward server for the remote reward client and the MLLM judge (stdlib only; numpy + PIL to decode).

Run:  python tests/reward_server.py --port 0     (prints the port on stdout, then serves until interrupted)
In tests:  ``with RewardServer() as srv: ... srv.score_url ... srv.chat_base ...``

Endpoints
  POST /score                  the remote-reward protocol (normguard_jax/rewards/remote.py); the score of an image is
                               its mean brightness in [0, 1]; ``info`` carries {"mean": score}.
  POST /v1/chat/completions    OpenAI-compatible judge. The reply depends on the ``model`` name:
                               judge (plain JSON), judge-fenced (```json fence + trailing comma), judge-text (JSON in
                               prose, scores as strings), judge-range (an out-of-range score), judge-garbage (no JSON).
                               Single image: every criterion = 1 + round(9 * brightness). Two images: the brighter one
                               wins ("A" = first image), on every criterion.
  POST /control                {"script": [...], "chat_script": [...], "default": fault|null, "slow_s", "hang_s"}:
                               faults for the next requests, one per request, then ``default``. A ``chat_script``
                               entry is a fault name or {"content": "raw reply text"}. {"reset": true} clears all.
  GET  /health, GET /stats

Faults (also per request: ``/score?fault=NAME`` or ``metadata.fault``): ok, slow (sleep slow_s, then answer),
timeout (sleep hang_s, then answer), 500, 503, 400, malformed (200 with broken JSON), wrong_length (one score too
few), nan (a NaN score), non_numeric (a string score), missing (no "scores"), drop (close without a reply).
"""

import argparse
import base64
import io
import json
import math
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

FAULTS = ("ok", "slow", "timeout", "500", "503", "400", "malformed", "wrong_length", "nan", "non_numeric", "missing",
          "drop")
CRITERIA = ("physical_plausibility", "texture_fidelity", "edges", "colour", "semantic_coherence", "artifacts")


def brightness(b64):
  from PIL import Image
  if b64.startswith("data:"):
    b64 = b64.split(",", 1)[1]
  img = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), np.float64)
  return float(img.mean() / 255.0)


class _Handler(BaseHTTPRequestHandler):
  server_version = "NormguardRewardServer/1"

  def log_message(self, fmt, *args):  # quiet
    pass

  def _reply(self, status, body, content_type="application/json"):
    data = body if isinstance(body, bytes) else body.encode("utf-8")
    try:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
      pass

  def _json(self, status, obj):
    self._reply(status, json.dumps(obj))  # allow_nan: the "nan" fault sends a bare NaN, as Python servers do

  def do_GET(self):
    if self.path == "/health":
      self._json(200, {"ok": True})
    elif self.path == "/stats":
      self._json(200, self.server.owner.stats())
    else:
      self._json(404, {"error": f"no route {self.path}"})

  def do_POST(self):
    owner = self.server.owner
    url = urllib.parse.urlsplit(self.path)
    try:
      body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
    except ValueError:
      return self._json(400, {"error": "request body is not JSON"})
    if url.path == "/control":
      owner.control(body)
      return self._json(200, {"ok": True})
    if url.path == "/score":
      query_fault = urllib.parse.parse_qs(url.query).get("fault", [None])[0]
      return self._score(owner, body, query_fault or (body.get("metadata") or {}).get("fault"))
    if url.path in ("/v1/chat/completions", "/chat/completions"):
      return self._chat(owner, body)
    return self._json(404, {"error": f"no route {url.path}"})

  def _fault(self, owner, fault):
    """Apply the transport part of a fault. Returns True when the reply has been sent (or dropped)."""
    if fault == "slow":
      owner.stop_event.wait(owner.slow_s)
    elif fault == "timeout":
      owner.stop_event.wait(owner.hang_s)
    elif fault in ("500", "503", "400"):
      self._json(int(fault), {"error": f"injected HTTP {fault}"})
      return True
    elif fault == "malformed":
      self._reply(200, '{"scores": [0.1, 0.2')
      return True
    elif fault == "drop":
      self.close_connection = True
      self.connection.close()
      return True
    return False

  def _score(self, owner, body, fault):
    images, prompts = body.get("images"), body.get("prompts")
    if not isinstance(images, list) or (prompts is not None and len(prompts) != len(images)):
      return self._json(400, {"error": "need 'images' (list) and 'prompts' (null or same length)"})
    try:
      fault = owner.next_fault("score", fault)
    except ValueError as e:
      return self._json(400, {"error": str(e)})
    owner.log("score", n=len(images), fault=fault, metadata=body.get("metadata"), prompts=prompts)
    if self._fault(owner, fault):
      return
    scores = [brightness(im) for im in images]
    info = [{"mean": s} for s in scores]
    if fault == "wrong_length":
      scores = scores[:-1]
    elif fault == "nan" and scores:
      scores[-1] = math.nan
    elif fault == "non_numeric" and scores:
      scores[0] = str(scores[0])
    elif fault == "missing":
      return self._json(200, {"result": scores})
    self._json(200, {"scores": scores, "info": info})

  def _chat(self, owner, body):
    entry = owner.next_fault("chat", None)
    content = None
    if isinstance(entry, dict):
      content, entry = entry.get("content", ""), "ok"
    model = str(body.get("model", "judge"))
    owner.log("chat", fault=entry, model=model, messages=body.get("messages"))
    if self._fault(owner, entry):
      return
    if content is None:
      images = [part["image_url"]["url"] for msg in body.get("messages", []) if isinstance(msg.get("content"), list)
                for part in msg["content"] if part.get("type") == "image_url"]
      content = _judge_reply(model, [brightness(u) for u in images])
    self._json(200, {"id": f"chatcmpl-{owner.count('chat')}", "object": "chat.completion", "created": int(time.time()),
                     "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})


def _judge_reply(model, means):
  if len(means) == 2:
    w = "A" if means[0] > means[1] else "B" if means[1] > means[0] else "tie"
    obj = {"winner": w, "preference": {c: w for c in CRITERIA}, "rationale": "brighter wins"}
  else:
    s = 1 + int(round(9 * (means[0] if means else 0.0)))
    obj = {"scores": {c: s for c in CRITERIA}, "rationale": "scored by brightness"}
  text = json.dumps(obj, indent=1)
  if model.endswith("-fenced"):
    return "Here is my assessment.\n```json\n" + text[:-2] + ",\n}\n```\n"  # trailing comma inside a fence
  if model.endswith("-text"):
    if "scores" in obj:
      obj["scores"] = {c: str(v) for c, v in obj["scores"].items()}
    return "Sure! My verdict: " + json.dumps(obj) + " Let me know if you need more."
  if model.endswith("-range") and "scores" in obj:
    obj["scores"]["edges"] = 11
    return json.dumps(obj)
  if model.endswith("-garbage"):
    return "The image looks quite nice overall, I would say about seven out of ten."
  return text


class RewardServer:
  """In-process server on a free localhost port: ``with RewardServer() as srv``; ``srv.requests`` logs requests."""

  def __init__(self, host="127.0.0.1", port=0, slow_s=0.3, hang_s=5.0):
    self.host, self.slow_s, self.hang_s = host, slow_s, hang_s
    self.stop_event = threading.Event()
    self._lock = threading.Lock()
    self._httpd = ThreadingHTTPServer((host, port), _Handler)
    self._httpd.daemon_threads = True
    self._httpd.block_on_close = False
    self._httpd.owner = self
    self.port = self._httpd.server_address[1]
    self._thread = None
    self.reset()

  @property
  def url(self):
    return f"http://{self.host}:{self.port}"

  @property
  def score_url(self):
    return self.url + "/score"

  @property
  def chat_base(self):
    return self.url + "/v1"

  def reset(self):
    with self._lock:
      self.scripts = {"score": [], "chat": []}
      self.default = None
      self.requests = []

  def control(self, cmd):
    """Same commands as POST /control."""
    if cmd.get("reset"):
      self.reset()
    with self._lock:
      if "fail_first" in cmd:
        self.scripts["score"] = [cmd.get("fault", "500")] * int(cmd["fail_first"])
      if "script" in cmd:
        self.scripts["score"] = list(cmd["script"])
      if "chat_script" in cmd:
        self.scripts["chat"] = list(cmd["chat_script"])
      if "default" in cmd:
        self.default = cmd["default"]
      self.slow_s = float(cmd.get("slow_s", self.slow_s))
      self.hang_s = float(cmd.get("hang_s", self.hang_s))

  def next_fault(self, kind, requested):
    with self._lock:
      if self.scripts[kind]:
        return self.scripts[kind].pop(0)
      fault = requested or self.default or "ok"
    if isinstance(fault, str) and fault not in FAULTS:
      raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")
    return fault

  def log(self, kind, **fields):
    with self._lock:
      self.requests.append({"kind": kind, "time": time.monotonic(), **fields})

  def count(self, kind):
    with self._lock:
      return sum(r["kind"] == kind for r in self.requests)

  def stats(self):
    with self._lock:
      return {"requests": len(self.requests), "faults": [r.get("fault") for r in self.requests]}

  def start(self):
    self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self.stop_event.set()  # wakes handlers sleeping in slow/timeout faults
    self._httpd.shutdown()
    self._httpd.server_close()

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
  p.add_argument("--default-fault", default=None, choices=FAULTS)
  p.add_argument("--slow-s", type=float, default=0.3)
  p.add_argument("--hang-s", type=float, default=5.0)
  a = p.parse_args(argv)
  srv = RewardServer(a.host, a.port, slow_s=a.slow_s, hang_s=a.hang_s)
  srv.default = a.default_fault
  print(srv.port, flush=True)
  print(f"serving {srv.score_url} and {srv.chat_base}/chat/completions", file=sys.stderr, flush=True)
  try:
    srv._httpd.serve_forever(poll_interval=0.1)
  except KeyboardInterrupt:
    pass
  finally:
    srv.stop_event.set()
    srv._httpd.server_close()


if __name__ == "__main__":
  main()
