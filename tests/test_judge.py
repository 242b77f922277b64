"""MLLM judge: reply parsing (fences, prose, bad values, garbage) and end to end against the reference server's
OpenAI-compatible chat endpoint, single and pairwise, including unparseable replies and HTTP retries."""

import json
import os

import numpy as np
import pytest

from normguard_jax.analysis import judge as J
from tests.reward_server import RewardServer

SCORES = {c: 7 for c in J.CRITERIA}


# ----- parsing ---------------------------------------------------------------------------------------------------

def test_plain_json():
  r = J.parse_single(json.dumps({"scores": SCORES, "rationale": "ok"}))
  assert r["parsed"] and r["scores"] == SCORES and r["invalid"] == {} and r["missing"] == [] and r["rationale"] == "ok"


def test_fenced_with_trailing_commas():
  body = '{"scores": {' + ", ".join(f'"{c}": 6' for c in J.CRITERIA) + ',}, "rationale": "a } brace",}'
  r = J.parse_single(f"Sure.\n```json\n{body}\n```\nHope that helps")
  assert r["parsed"] and r["scores"] == {c: 6 for c in J.CRITERIA} and r["rationale"] == "a } brace"


def test_json_in_prose_with_string_scores_and_aliases():
  text = ('My view: {"scores": {"Physical Plausibility": "8", "texture": "7/10", "edges": 9.0, "color": " 5 ", '
          '"semantic_coherence": 4, "artefacts": "3"}} -- thanks {not json}')
  r = J.parse_single(text)
  assert r["parsed"]
  assert r["scores"] == {"physical_plausibility": 8, "texture_fidelity": 7, "edges": 9, "colour": 5,
                         "semantic_coherence": 4, "artifacts": 3}


def test_bad_values_are_invalid_not_clipped():
  r = J.parse_single(json.dumps({"scores": {"physical_plausibility": 11, "texture_fidelity": 0, "edges": 7.5,
                                            "colour": True, "semantic_coherence": "high", "artifacts": None}}))
  assert r["parsed"] and r["scores"] == {}
  assert set(r["invalid"]) == set(J.CRITERIA)
  r = J.parse_single(json.dumps({"physical_plausibility": 5, "edges": -1}))  # flat object, missing criteria
  assert r["scores"] == {"physical_plausibility": 5} and r["invalid"] == {"edges": -1}
  assert set(r["missing"]) == set(J.CRITERIA) - {"physical_plausibility", "edges"}


@pytest.mark.parametrize("text", ["", "I'd give it a seven.", "{broken: json", '{"verdict": "nice"}', None,
                                  "```json\n[1, 2, 3]\n```"])
def test_garbage_is_unparsed(text):
  r = J.parse_single(text)
  assert r["parsed"] is False and r["raw"] == text and "scores" not in r
  p = J.parse_pairwise(text)
  assert p["parsed"] is False and "winner" not in p


def test_pairwise_parsing():
  r = J.parse_pairwise('```\n{"winner": "Image B", "preference": {"colour": "a", "edges": "Tie", '
                       '"texture_fidelity": "C"},}\n```')
  assert r["parsed"] and r["winner"] == "B"
  assert r["preference"] == {"colour": "A", "edges": "tie"} and r["invalid"] == {"texture_fidelity": "C"}
  r = J.parse_pairwise('{"winner": "maybe", "preference": {"colour": "B"}}')
  assert r["parsed"] and r["winner"] is None and r["invalid"] == {"winner": "maybe"}


def test_summaries_count_unparseable_and_exclude_invalid():
  results = [J.parse_single(json.dumps({"scores": {**SCORES, "edges": 3}})),
             J.parse_single(json.dumps({"scores": {**SCORES, "edges": 12}})),
             J.parse_single("no idea"),
             {"parsed": False, "failed": True, "raw": None, "error": "down"}]
  s = J.summarize_single(results)
  assert (s["n"], s["n_parsed"], s["n_unparseable"], s["n_failed"]) == (4, 2, 1, 1)
  assert s["criteria"]["edges"] == {"mean": 3.0, "std": 0.0, "n_valid": 1, "n_invalid": 1, "n_missing": 0}
  assert s["criteria"]["colour"]["mean"] == 7.0
  p = J.summarize_pairwise([J.parse_pairwise('{"winner": "A"}'), J.parse_pairwise('{"winner": "tie"}'),
                            J.parse_pairwise("garbage")])
  assert p["n_unparseable"] == 1 and p["winner"]["win_rate_A"] == 0.75


def test_chat_url():
  assert J.chat_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
  assert J.chat_url("http://h:8000/") == "http://h:8000/v1/chat/completions"
  assert J.chat_url("http://h/x/chat/completions") == "http://h/x/chat/completions"


# ----- end to end against the reference server --------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
  with RewardServer(slow_s=0.1, hang_s=3.0) as srv:
    yield srv


@pytest.fixture(autouse=True)
def fresh(request):
  if "server" in request.fixturenames:
    request.getfixturevalue("server").reset()
  yield


def gray(level, c=3):
  """(8, 8, c) float image of uniform brightness ``level`` in [0, 1] (exact in uint8 for multiples of 1/255)."""
  return np.full((8, 8, c), level * 2 - 1, np.float32)


def judge(server, model="judge", **kw):
  return J.Judge(server.chat_base, model, timeout_s=0.5, max_attempts=3, backoff_s=0.01, max_workers=2, **kw)


def test_single_end_to_end(server):
  jd = judge(server)
  r = jd.score(gray(204 / 255), prompt="a white wall")
  assert r["parsed"] and r["scores"] == {c: 1 + round(9 * 0.8) for c in J.CRITERIA}
  msgs = server.requests[-1]["messages"]
  assert msgs[0]["role"] == "system" and msgs[1]["role"] == "user"
  parts = msgs[1]["content"]
  assert '"a white wall"' in parts[0]["text"] and "colour" in parts[0]["text"]
  assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("model, valid", [("judge-fenced", set(J.CRITERIA)), ("judge-text", set(J.CRITERIA)),
                                          ("judge-range", set(J.CRITERIA) - {"edges"})])
def test_reply_styles(server, model, valid):
  r = judge(server, model).score(gray(0.0))
  assert r["parsed"] and set(r["scores"]) == valid and all(v == 1 for v in r["scores"].values())
  assert ("edges" in r["invalid"]) == (model == "judge-range")


def test_unparseable_reply_is_recorded_not_scored(server):
  jd = judge(server, "judge-garbage")
  results = jd.score_many([gray(0.2), gray(0.6)], ["a", "b"])
  assert all(r["parsed"] is False and "seven" in r["raw"] and "scores" not in r for r in results)
  s = J.summarize_single(results)
  assert s["n_unparseable"] == 2 and s["criteria"]["edges"]["mean"] is None and s["overall_mean"] is None
  assert jd.stats["retries"] == 0  # a bad reply text is recorded, not re-asked


def test_scripted_http_fault_then_scripted_garbage(server):
  server.control({"chat_script": ["500", "malformed", {"content": "```json\n{oops```"}]})
  jd = judge(server)
  r = jd.score(gray(0.5))
  assert r == {"parsed": False, "raw": "```json\n{oops```", "error": "no JSON object in reply"}
  assert jd.stats["retry_reasons"] == {"http_500": 1, "malformed_json": 1}


def test_failed_requests_recorded_or_raised(server):
  server.control({"chat_script": ["503"] * 4})
  jd = J.Judge(server.chat_base, "judge", timeout_s=0.5, max_attempts=2, backoff_s=0.01, max_workers=1)
  with pytest.raises(J.JudgeError, match="HTTP 503"):
    jd.score(gray(0.5))
  (r,) = jd.score_many([gray(0.5)])
  assert r["failed"] and r["parsed"] is False and "503" in r["error"]
  assert J.summarize_single([r])["n_failed"] == 1


def test_pairwise_end_to_end_order_mapped_back(server):
  a = [gray(0.8), gray(0.2), gray(0.6), gray(0.1), gray(0.5)]
  b = [gray(0.3), gray(0.9), gray(0.6), gray(0.4), gray(0.2)]
  results = judge(server).compare_many(a, b, ["p"] * 5, order="random", seed=1)
  assert {r["swapped"] for r in results} == {True, False}  # both orders were used
  assert [r["winner"] for r in results] == ["A", "B", "tie", "B", "A"]
  assert all(set(r["preference"].values()) == {r["winner"]} for r in results)
  s = J.summarize_pairwise(results)
  assert s["winner"]["win_rate_A"] == pytest.approx(2.5 / 5) and s["n_unparseable"] == 0
  parts = server.requests[-1]["messages"][1]["content"]
  assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]


def test_pairwise_garbage(server):
  (r,) = judge(server, "judge-garbage").compare_many([gray(0.1)], [gray(0.2)], order="fixed")
  assert r["parsed"] is False and "winner" not in r
  assert J.summarize_pairwise([r])["n_unparseable"] == 1


def test_cli_single_and_pairwise(server, tmp_path):
  from PIL import Image
  levels = [51 / 255, 128 / 255, 230 / 255]
  np.savez(tmp_path / "a.npz", images=np.stack([gray(v) for v in levels]))
  os.makedirs(tmp_path / "b")
  for i, v in enumerate([0.4, 0.4, 0.4]):
    Image.fromarray(np.full((8, 8, 3), round(v * 255), np.uint8)).save(tmp_path / "b" / f"{i:02d}.png")
  (tmp_path / "prompts.txt").write_text("a cat\na dog\na car\n")
  out = tmp_path / "judge.json"
  rep = J.main(["--images", str(tmp_path / "a.npz"), "--prompts", str(tmp_path / "prompts.txt"), "--url",
                server.chat_base, "--model", "judge", "--out", str(out), "--timeout-s", "1", "--backoff-s", "0.01"])
  saved = json.loads(out.read_text())
  assert saved["mode"] == "single" and saved["summary"]["n_parsed"] == 3 and saved["summary"]["n_unparseable"] == 0
  assert [r["prompt"] for r in saved["results"]] == ["a cat", "a dog", "a car"]
  assert saved["summary"]["criteria"]["colour"]["mean"] == pytest.approx(np.mean([1 + round(9 * v) for v in levels]))
  assert rep["summary"] == saved["summary"] and (tmp_path / "judge.png").stat().st_size > 0
  out2 = tmp_path / "pair.json"
  J.main(["--images", str(tmp_path / "a.npz"), "--pairwise", str(tmp_path / "b"), "--url", server.chat_base,
          "--model", "judge-fenced", "--out", str(out2), "--timeout-s", "1", "--backoff-s", "0.01"])
  saved = json.loads(out2.read_text())
  assert saved["mode"] == "pairwise" and [r["winner"] for r in saved["results"]] == ["B", "A", "A"]
  assert saved["results"][0]["name_b"] == "00.png" and (tmp_path / "pair.png").exists()
  from normguard_jax.analysis import evaluate  # its per-model sample files carry their prompts to the judge
  evaluate.save_samples(str(tmp_path / "s.npz"), np.stack([gray(v) for v in levels]), None, ["x", "y", "z"])
  rep = J.main(["--images", str(tmp_path / "s.npz"), "--url", server.chat_base, "--model", "judge", "--out",
                str(tmp_path / "s.json"), "--timeout-s", "1", "--backoff-s", "0.01"])
  assert [r["prompt"] for r in rep["results"]] == ["x", "y", "z"] and rep["summary"]["n_parsed"] == 3
