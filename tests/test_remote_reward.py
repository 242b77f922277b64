"""Remote reward client against the local reference server (tests/reward_server.py): success, batching, every
fault mode, retries counted, exhausted retries raise, and two batches in flight at once."""

import concurrent.futures as cf
import socket
import time

import jax
import numpy as np
import pytest

from normguard_jax.rewards import api
from normguard_jax.rewards.api import RewardBatch
from normguard_jax.rewards.remote import RemoteRewardError, build
from tests.reward_server import RewardServer


@pytest.fixture(scope="module")
def server():
  with RewardServer(slow_s=0.15, hang_s=3.0) as srv:
    yield srv


@pytest.fixture(autouse=True)
def fresh(server):
  server.reset()
  server.control({"slow_s": 0.15})
  yield


def make(server, url=None, **kw):
  opts = dict(url=url or server.score_url, batch_size=4, timeout_s=0.5, max_attempts=3, backoff_s=0.01)
  opts.update(kw)
  return build(opts)


def images(n, seed=0, c=1, hw=8):
  return np.random.RandomState(seed).uniform(-1, 1, (n, hw, hw, c)).astype(np.float32)


def expected(x):
  u = np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)
  return u.reshape(len(u), -1).mean(1) / 255.0


def test_success_and_batching(server):
  x = images(7)
  prompts = [f"prompt {i}" for i in range(7)]
  r = make(server, batch_size=3, name="bright", metadata={"run": "t"})
  out = r(RewardBatch(x, prompts=prompts))
  assert out.shape == (7,) and out.dtype == np.float32
  np.testing.assert_allclose(np.asarray(out), expected(x), atol=1e-6)
  reqs = sorted(server.requests, key=lambda q: q["metadata"]["offset"])
  assert [q["n"] for q in reqs] == [3, 3, 1]
  assert [q["metadata"]["offset"] for q in reqs] == [0, 3, 6]
  assert sum((q["prompts"] for q in reqs), []) == prompts
  assert reqs[0]["metadata"]["reward"] == "bright" and reqs[0]["metadata"]["run"] == "t"
  assert r.stats["retries"] == 0 and r.stats["requests"] == 3


def test_rgb_uint8_jpeg_no_prompts_and_info(server):
  x = images(3, c=3)
  u8 = np.round((x + 1) * 127.5).astype(np.uint8)
  scores, info = make(server).submit(RewardBatch(u8), with_info=True).result()
  np.testing.assert_allclose(scores, expected(x), atol=1e-6)
  assert [i["mean"] for i in info] == pytest.approx(scores, abs=1e-6)
  assert server.requests[-1]["prompts"] is None
  jpeg = make(server, image_format="jpeg")(RewardBatch(x))  # lossy: close, not equal
  np.testing.assert_allclose(np.asarray(jpeg), expected(x), atol=0.02)


def test_registered_as_lazy_builder(server, monkeypatch):
  monkeypatch.setitem(api.REGISTRY, "remote", "normguard_jax.rewards.remote:build")
  fn = api.make_reward({"remote": 2.0}, {"remote": {"url": server.score_url, "timeout_s": 0.5}})
  x = images(5)
  total, parts = fn(RewardBatch(x))
  np.testing.assert_allclose(np.asarray(parts["remote"]), expected(x), atol=1e-6)
  np.testing.assert_allclose(np.asarray(total), 2 * expected(x), atol=1e-5)


def test_bad_options():
  with pytest.raises(ValueError, match="url"):
    build({})
  with pytest.raises(ValueError, match="unknown option"):
    build({"url": "http://127.0.0.1:1/score", "retries": 3})
  with pytest.raises(ValueError, match="image_format"):
    build({"url": "http://127.0.0.1:1/score", "image_format": "gif"})


def test_slow_reply_under_timeout_succeeds(server):
  x = images(2)
  r = make(server, url=server.score_url + "?fault=slow", timeout_s=1.0)
  np.testing.assert_allclose(np.asarray(r(RewardBatch(x))), expected(x), atol=1e-6)
  assert r.stats["retries"] == 0


def test_timeout_exhausts_retries(server):
  r = make(server, url=server.score_url + "?fault=timeout", timeout_s=0.2, max_attempts=2)
  t0 = time.monotonic()
  with pytest.raises(RemoteRewardError) as e:
    r(RewardBatch(images(2)))
  assert time.monotonic() - t0 < 2.0
  msg = str(e.value)
  assert "timeout" in msg and server.score_url in msg and "2 attempt" in msg
  assert e.value.attempts == 2 and e.value.status is None
  assert r.stats["retry_reasons"] == {"timeout": 1} and r.stats["failures"] == 1


@pytest.mark.parametrize("fault, kind, text", [
    ("500", "http_500", "HTTP 500"),
    ("503", "http_503", "HTTP 503"),
    ("malformed", "malformed_json", "not JSON"),
    ("wrong_length", "bad_reply", "wrong number of scores: sent 3 images, got 2"),
    ("nan", "bad_reply", "not finite"),
    ("non_numeric", "bad_reply", "not a number"),
    ("missing", "bad_reply", "no 'scores'"),
    ("drop", "connection", "connection failed"),
])
def test_fault_exhausts_retries_and_raises(server, fault, kind, text):
  r = make(server, url=f"{server.score_url}?fault={fault}", max_attempts=3)
  fut = r.submit(RewardBatch(images(3)))
  with pytest.raises(RemoteRewardError, match=text) as e:
    fut.result(timeout=10)
  assert e.value.attempts == 3 and len(e.value.errors) == 3
  assert "3 attempt" in str(e.value) and server.score_url in str(e.value)
  assert r.stats["retries"] == 2 and r.stats["retry_reasons"] == {kind: 2}
  assert server.count("score") == 3


def test_client_error_is_not_retried(server):
  r = make(server, url=server.score_url + "?fault=400")
  with pytest.raises(RemoteRewardError, match="not retryable") as e:
    r(RewardBatch(images(2)))
  assert e.value.status == 400 and e.value.attempts == 1 and server.count("score") == 1


def test_connection_refused():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]  # closed again: nothing listens there
  r = build({"url": f"http://127.0.0.1:{port}/score", "timeout_s": 0.3, "max_attempts": 2, "backoff_s": 0.01})
  with pytest.raises(RemoteRewardError, match="connection"):
    r(RewardBatch(images(1)))
  assert r.stats["retry_reasons"] == {"connection": 1}


def test_fail_first_n_then_succeed(server):
  server.control({"fail_first": 2, "fault": "500"})
  x = images(3)
  r = make(server, batch_size=8)
  np.testing.assert_allclose(np.asarray(r(RewardBatch(x))), expected(x), atol=1e-6)
  assert r.stats["retries"] == 2 and r.stats["attempts"] == 3 and r.stats["failures"] == 0


def test_mixed_faults_then_succeed(server):
  server.control({"script": ["timeout", "nan", "malformed", "wrong_length"]})
  x = images(3)
  r = make(server, batch_size=8, timeout_s=0.25, max_attempts=5)
  np.testing.assert_allclose(np.asarray(r(RewardBatch(x))), expected(x), atol=1e-6)
  assert r.stats["retry_reasons"] == {"timeout": 1, "bad_reply": 2, "malformed_json": 1}


def test_one_failed_chunk_fails_the_whole_batch(server):
  server.control({"default": "nan"})  # every chunk fails for good: nothing partial comes back
  r = make(server, batch_size=2, max_attempts=2)
  fut = r.submit(RewardBatch(images(6)))
  assert isinstance(fut.exception(timeout=10), RemoteRewardError)
  with pytest.raises(RemoteRewardError):
    fut.result()


def test_two_batches_in_flight(server):
  server.control({"default": "slow", "slow_s": 0.3})
  xa, xb = images(3, seed=1), images(5, seed=2)
  r = make(server, batch_size=8, timeout_s=2.0, max_workers=2)
  t0 = time.monotonic()
  fa = r.submit(RewardBatch(xa))
  fb = r.submit(RewardBatch(xb))
  assert time.monotonic() - t0 < 0.25 and not fa.done() and not fb.done()  # submit does not wait for the server
  done, _ = cf.wait([fa, fb], timeout=5)
  assert len(done) == 2
  np.testing.assert_allclose(fa.result(), expected(xa), atol=1e-6)
  np.testing.assert_allclose(fb.result(), expected(xb), atol=1e-6)
  t = sorted(q["time"] for q in server.requests)
  assert t[1] - t[0] < 0.3  # the second request arrived while the first was still being served


def test_submit_copies_host_images(server):
  x = np.round((images(2) + 1) * 127.5).astype(np.uint8)
  want = expected(images(2))
  r = make(server, url=server.score_url + "?fault=slow")
  fut = r.submit(RewardBatch(x))
  x[:] = 0  # the caller reuses its buffer while the request is in flight
  np.testing.assert_allclose(fut.result(), want, atol=1e-6)


def test_inside_jit_is_a_clear_error(server):
  r = make(server)
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda im: r(RewardBatch(im)))(images(1))


def test_server_cli_prints_port():
  import subprocess
  import sys
  import urllib.request
  p = subprocess.Popen([sys.executable, "tests/reward_server.py", "--port", "0"], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, cwd=__file__.rsplit("/tests/", 1)[0])
  try:
    port = int(p.stdout.readline())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
      assert resp.status == 200
  finally:
    p.terminate()
    p.wait(5)


@pytest.mark.parametrize("fault", ["500", "nan", "malformed"])
def test_failed_server_stops_the_iteration_before_the_advantages(server, fault):
  """Through the loop's rollout-and-score path: a server that keeps failing raises after its retries, so the
  iteration never reaches group advantages or the train batch; no 0 or NaN stands in for a reward."""
  from normguard_jax.train import loop
  seen = []
  fn = api.make_reward({"remote": 1.0}, {"remote": {"url": server.score_url + f"?fault={fault}", "timeout_s": 0.5,
                                                    "max_attempts": 2, "backoff_s": 0.01}})
  def reward_fn(batch):
    out = fn(batch)
    seen.append(out)  # only a successful reply would get here
    return out
  cond = np.arange(8, dtype=np.int32)
  rollout_fn = lambda c, u, k: {"x0": images(len(c), seed=int(c[0]))}
  with pytest.raises(RemoteRewardError):
    loop.rollout_and_score(rollout_fn, lambda x: x, reward_fn, cond, None, None, jax.random.PRNGKey(0), 4)
  assert seen == []
  server.control({"default": "ok"})
  ro, rewards, parts = loop.rollout_and_score(rollout_fn, lambda x: x, api.make_reward(
      {"remote": 1.0}, {"remote": {"url": server.score_url, "timeout_s": 0.5}}), cond, None, None,
      jax.random.PRNGKey(0), 4)
  np.testing.assert_allclose(np.asarray(rewards), np.concatenate([expected(images(4, 0)), expected(images(4, 4))]),
                             atol=1e-6)
  assert ro["x0"].shape == (8, 8, 8, 1)


def test_multihost_remote_reward(server, tmp_path):
  """Two processes x 2 CPU devices (jax.distributed on localhost), one global row-sharded batch: each process sends
  only its share, the server scores every image once, both processes get the same replicated scores (also summed
  with a JAX reward), and a failure on one process fails the call on both."""
  import json
  import os
  import subprocess
  import sys
  from normguard_jax.rewards import http
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  worker = os.path.join(os.path.dirname(__file__), "multihost_reward_worker.py")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  procs = [subprocess.Popen([sys.executable, worker, str(tmp_path / "out"), str(i), port, server.score_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
  a, b = (json.loads((tmp_path / f"out.{i}.json").read_text()) for i in range(2))
  host = np.random.RandomState(0).uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
  expected = http.to_uint8(host).reshape(8, -1).mean(1) / 255.0
  np.testing.assert_allclose(a["scores"], expected, rtol=1e-6)
  assert a["scores"] == b["scores"] and a["total"] == b["total"] and a["replicated"] and b["replicated"]
  np.testing.assert_allclose(a["total"], expected, rtol=1e-6)  # contrast has weight 0
  ok = [r for r in server.requests if r["metadata"]["reward"] == "remote"]
  assert sum(r["n"] for r in ok) == 8 and sorted(r["metadata"]["offset"] for r in ok) == [0, 0, 3, 3]
  assert sorted(p for r in ok for p in r["prompts"]) == [f"p{i}" for i in range(8)]  # every image once
  assert "HTTP 500" in b["phase2"] and "process(es) [1]" in a["phase2"]
  phase2 = [r for r in server.requests if r["metadata"]["reward"] == "phase2"]
  assert sum(r["n"] for r in phase2 if not r["metadata"].get("fault")) == 4  # process 0's share, sent once
