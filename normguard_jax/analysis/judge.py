"""MLLM judge over an OpenAI-compatible chat API (e.g. vLLM serving Qwen2.5-VL): rubric scores for single images and
pairwise preferences, for the quality damage that a reward does not see (over-saturation, burnt colours, texture
loss, artifacts).

Images go as base64 data URLs in ``image_url`` content parts. The judge is asked for strict JSON:
single  -> {"scores": {criterion: int 1-10, ...}, "rationale": str}
pairwise-> {"winner": "A"|"B"|"tie", "preference": {criterion: "A"|"B"|"tie", ...}, "rationale": str}
Parsing is lenient about the wrapping (code fences, prose around the object, trailing commas, "7" or "7/10"), strict
about values: a non-integer or out-of-range score is recorded under ``invalid``, never clipped. A reply with no
usable JSON is recorded as ``{"parsed": false, "raw": ...}`` and never as a score; a request that failed after the
HTTP retries (``normguard_jax.rewards.http``) is recorded with ``failed: true``. Summaries count both.

CLI:  python -m normguard_jax.analysis.judge --images DIR_OR_NPZ [--prompts FILE] --url URL --model NAME
        --out judge.json [--pairwise DIR_OR_NPZ_B]      (also writes judge.png: per-criterion means / win rates)
The per-model .npz files of ``python -m normguard_jax.analysis evaluate`` (WORKDIR/analysis/evaluate/samples/) hold
their prompts and share the held-out noise row by row: ``--images nft_base.npz --pairwise nft_ng.npz`` is a paired
comparison of the same prompts and seeds.
"""

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import re

import numpy as np

from normguard_jax.rewards import http

CRITERIA = ("physical_plausibility", "texture_fidelity", "edges", "colour", "semantic_coherence", "artifacts")

RUBRIC = {
    "physical_plausibility": "Could this exist? Geometry, anatomy, perspective, lighting, shadows and reflections "
                             "are physically consistent. 10 = fully plausible; 1 = impossible shapes or lighting.",
    "texture_fidelity": "Surfaces (skin, fabric, foliage, stone, fur) carry natural fine detail. Penalise waxy, "
                        "plastic, over-smoothed, smeared or noise-like repetitive texture. 10 = photographic detail.",
    "edges": "Edges and thin structures are crisp and clean. Penalise blur, halos, ringing, jagged, doubled or "
             "melting boundaries. 10 = clean edges everywhere.",
    "colour": "Colours and exposure are natural for the scene. Penalise over-saturation, neon or burnt-looking "
              "colours, colour casts, blown highlights, crushed shadows, harsh contrast and banding. 10 = natural.",
    "semantic_coherence": "The image shows what the prompt asks for (objects, counts, attributes, spatial relations, "
                          "text) and the scene makes sense as a whole. 10 = fully faithful and coherent.",
    "artifacts": "Absence of generation artifacts: extra or fused fingers and limbs, garbled text, duplicated "
                 "objects, grid, checkerboard or speckle patterns, adversarial-looking high-frequency noise. "
                 "10 = no artifacts; 1 = dominated by artifacts.",
}

SYSTEM = ("You are a strict, consistent image-quality judge for research on generative image models. Judge only "
          "what is visible, use the full 1-10 range, and reply with one JSON object and nothing else.")


def _rubric_text():
  return "\n".join(f"- {c}: {RUBRIC[c]}" for c in CRITERIA)


def single_prompt(prompt):
  keys = ", ".join(f'"{c}": <integer 1-10>' for c in CRITERIA)
  ctx = (f'The image was generated for the prompt: "{prompt}".' if prompt else
         "No prompt is available: judge semantic_coherence as the internal coherence of the scene.")
  return (f"{ctx}\nScore the image on each criterion, 1 (worst) to 10 (best):\n{_rubric_text()}\n\n"
          f'Reply with exactly this JSON and nothing else: {{"scores": {{{keys}}}, "rationale": "<one sentence>"}}')


def pairwise_prompt(prompt):
  keys = ", ".join(f'"{c}": "A" | "B" | "tie"' for c in CRITERIA)
  ctx = (f'Both images were generated for the prompt: "{prompt}".' if prompt else
         "No prompt is available: judge semantic_coherence as the internal coherence of each scene.")
  return (f"{ctx}\nCompare image A (first) with image B (second) on each criterion; prefer the image that is better "
          f"on it, or say tie:\n{_rubric_text()}\n\nThen give the overall winner. Ignore the order in which the "
          f"images are shown. Reply with exactly this JSON and nothing else: "
          f'{{"winner": "A" | "B" | "tie", "preference": {{{keys}}}, "rationale": "<one sentence>"}}')


# ----- parsing ---------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def _balanced_objects(text):
  """Every top-level {...} substring, string-aware, in order."""
  out, depth, start, in_str, esc = [], 0, None, False, False
  for i, ch in enumerate(text):
    if in_str:
      if esc:
        esc = False
      elif ch == "\\":
        esc = True
      elif ch == '"':
        in_str = False
      continue
    if ch == '"' and depth > 0:
      in_str = True
    elif ch == "{":
      if depth == 0:
        start = i
      depth += 1
    elif ch == "}" and depth > 0:
      depth -= 1
      if depth == 0:
        out.append(text[start:i + 1])
  return out


def _loads(s):
  s = s.strip().replace("\u201c", '"').replace("\u201d", '"')
  for cand in (s, _TRAILING_COMMA.sub(r"\1", s)):
    try:
      obj = json.loads(cand)
    except ValueError:
      continue
    if isinstance(obj, dict):
      return obj
  return None


def extract_json(text):
  """The first JSON object in a reply: inside a code fence, the whole text, or embedded in prose. None if none."""
  if not isinstance(text, str):
    return None
  for cand in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
    obj = _loads(cand)
    if obj is not None:
      return obj
    for sub in _balanced_objects(cand):
      obj = _loads(sub)
      if obj is not None:
        return obj
  return None


_ALIASES = {"physical": "physical_plausibility", "plausibility": "physical_plausibility",
            "texture": "texture_fidelity", "edge": "edges", "edges": "edges", "sharpness": "edges",
            "colour": "colour", "color": "colour", "colours": "colour", "colors": "colour",
            "semantic": "semantic_coherence", "semantics": "semantic_coherence", "prompt": "semantic_coherence",
            "artifacts": "artifacts", "artefacts": "artifacts", "artifact": "artifacts", "artefact": "artifacts"}


def _criterion(key):
  k = re.sub(r"[^a-z0-9]+", "_", str(key).lower()).strip("_")
  if k in CRITERIA:
    return k
  return _ALIASES.get(k) or _ALIASES.get(k.split("_")[0])


def score_value(v):
  """An integer 1-10 from an int, an integral float, or a string like "7", "7.0", "7/10"; else None."""
  if isinstance(v, bool):
    return None
  if isinstance(v, str):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", v)
    if not m:
      return None
    v = float(m.group(1))
  if isinstance(v, float):
    if not math.isfinite(v) or v != int(v):
      return None
    v = int(v)
  if isinstance(v, int) and 1 <= v <= 10:
    return v
  return None


def side_value(v):
  """"A", "B" or "tie" from lenient spellings ("image A", "a", "1", "first", "equal"); else None."""
  if not isinstance(v, (str, int)) or isinstance(v, bool):
    return None
  s = re.sub(r"^(image|img|picture)\s*", "", str(v).strip().lower()).strip(" .!\"'()[]")
  if s in ("a", "1", "first", "left"):
    return "A"
  if s in ("b", "2", "second", "right"):
    return "B"
  if s in ("tie", "equal", "same", "draw", "none", "neither", "both", "0"):
    return "tie"
  return None


def _per_criterion(block, convert):
  good, invalid = {}, {}
  if isinstance(block, dict):
    for k, v in block.items():
      c = _criterion(k)
      if c is None or c in good:
        continue
      val = convert(v)
      if val is None:
        invalid[c] = v
      else:
        good[c] = val
        invalid.pop(c, None)
  missing = [c for c in CRITERIA if c not in good and c not in invalid]
  return good, invalid, missing


def _unparsed(raw, error):
  return {"parsed": False, "raw": raw, "error": error}


def parse_single(text):
  """Reply -> {"parsed": True, "scores", "invalid", "missing", "rationale", "raw"} or {"parsed": False, "raw"}."""
  obj = extract_json(text)
  if obj is None:
    return _unparsed(text, "no JSON object in reply")
  block = obj.get("scores") if isinstance(obj.get("scores"), dict) else obj  # also accept a flat object
  scores, invalid, missing = _per_criterion(block, score_value)
  if not scores and not invalid:
    return _unparsed(text, "JSON has no criterion scores")
  return {"parsed": True, "scores": scores, "invalid": invalid, "missing": missing,
          "rationale": obj.get("rationale"), "raw": text}


def parse_pairwise(text):
  """Reply -> {"parsed": True, "winner" (A/B/tie or None if invalid), "preference", "invalid", "missing", ...}."""
  obj = extract_json(text)
  if obj is None:
    return _unparsed(text, "no JSON object in reply")
  block = obj.get("preference", obj.get("preferences", obj.get("criteria")))
  pref, invalid, missing = _per_criterion(block if isinstance(block, dict) else {}, side_value)
  winner = side_value(obj.get("winner"))
  if "winner" in obj and winner is None:
    invalid["winner"] = obj.get("winner")
  if winner is None and not pref:
    return _unparsed(text, "JSON has no usable winner or preferences")
  return {"parsed": True, "winner": winner, "preference": pref, "invalid": invalid, "missing": missing,
          "rationale": obj.get("rationale"), "raw": text}


def _swap(side):
  return {"A": "B", "B": "A"}.get(side, side)


# ----- summaries -------------------------------------------------------------------------------------------------

def _counts(results):
  return {"n": len(results), "n_parsed": sum(bool(r.get("parsed")) for r in results),
          "n_unparseable": sum(not r.get("parsed") and not r.get("failed") for r in results),
          "n_failed": sum(bool(r.get("failed")) for r in results)}


def summarize_single(results):
  """Per-criterion mean/std over valid scores, with counts of invalid and missing values and unparseable replies."""
  ok = [r for r in results if r.get("parsed")]
  out = {**_counts(results), "criteria": {}}
  for c in CRITERIA:
    vals = [r["scores"][c] for r in ok if c in r["scores"]]
    out["criteria"][c] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None,
                          "n_valid": len(vals), "n_invalid": sum(c in r["invalid"] for r in ok),
                          "n_missing": sum(c in r["missing"] for r in ok)}
  per_image = [np.mean(list(r["scores"].values())) for r in ok if r["scores"]]
  out["overall_mean"] = float(np.mean(per_image)) if per_image else None
  return out


def _rates(sides):
  n = len(sides)
  a, b, t = sides.count("A"), sides.count("B"), sides.count("tie")
  return {"A": a, "B": b, "tie": t, "n_valid": n, "win_rate_A": (a + 0.5 * t) / n if n else None}


def summarize_pairwise(results):
  """Winner counts and win rate of A ((wins + ties / 2) / valid), overall and per criterion."""
  ok = [r for r in results if r.get("parsed")]
  out = {**_counts(results), "winner": _rates([r["winner"] for r in ok if r["winner"] is not None]), "criteria": {}}
  out["winner"]["n_invalid"] = sum(r["winner"] is None for r in ok)
  for c in CRITERIA:
    out["criteria"][c] = {**_rates([r["preference"][c] for r in ok if c in r["preference"]]),
                          "n_invalid": sum(c in r["invalid"] for r in ok)}
  return out


# ----- client ----------------------------------------------------------------------------------------------------

class JudgeError(http.RemoteCallError):
  """The chat endpoint failed after all retries."""


def chat_url(url):
  u = url.rstrip("/")
  if u.endswith("/chat/completions"):
    return u
  return u + ("/chat/completions" if u.endswith("/v1") else "/v1/chat/completions")


def _content(obj):
  try:
    content = obj["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise http.BadReply(f"not a chat completion (no choices[0].message.content): {str(obj)[:200]}") from None
  if isinstance(content, list):  # some servers return content parts
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if not isinstance(content, str):
    raise http.BadReply(f"message content is {type(content).__name__}, not text")
  return content


class Judge:
  """Client for one judge model. ``score``/``compare`` raise ``JudgeError`` when the endpoint is down; the
  ``*_many`` versions record such failures (``failed: true``) unless ``on_error="raise"``."""

  def __init__(self, url, model, *, timeout_s=120.0, max_attempts=3, backoff_s=1.0, max_backoff_s=16.0,
               max_tokens=512, temperature=0.0, api_key=None, image_format="png", max_workers=4, extra_body=None):
    self.url, self.model = chat_url(url), model
    self.timeout_s, self.max_attempts, self.backoff_s, self.max_backoff_s = timeout_s, max_attempts, backoff_s, \
        max_backoff_s
    self.max_tokens, self.temperature, self.image_format = max_tokens, temperature, image_format
    self.max_workers, self.extra_body = max_workers, dict(extra_body or {})
    self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    self._stats = http.CallStats()

  @property
  def stats(self):
    return self._stats.snapshot()

  def _image(self, img):
    return {"type": "image_url", "image_url": {"url": http.data_url(http.to_uint8(np.asarray(img)[None])[0],
                                                                    self.image_format)}}

  def chat(self, parts):
    """Send one user message (content parts) after the system prompt; return the reply text."""
    payload = {"model": self.model, "messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": parts}],
               "max_tokens": self.max_tokens, "temperature": self.temperature, **self.extra_body}
    return http.post_json(self.url, payload, timeout_s=self.timeout_s, max_attempts=self.max_attempts,
                          backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s, validate=_content,
                          headers=self.headers, stats=self._stats, error_cls=JudgeError,
                          what=f"judge {self.model!r}")

  def score(self, image, prompt=None):
    """One (H, W, C) image (float [-1, 1] or uint8) -> parse_single record."""
    return parse_single(self.chat([{"type": "text", "text": single_prompt(prompt)}, self._image(image)]))

  def compare(self, image_a, image_b, prompt=None, swap=False):
    """Pairwise record; ``swap`` shows B first and maps the answer back, so "A" always means ``image_a``."""
    first, second = (image_b, image_a) if swap else (image_a, image_b)
    rec = parse_pairwise(self.chat([{"type": "text", "text": pairwise_prompt(prompt)},
                                    {"type": "text", "text": "Image A:"}, self._image(first),
                                    {"type": "text", "text": "Image B:"}, self._image(second)]))
    rec["swapped"] = bool(swap)
    if swap and rec["parsed"]:
      rec["winner"] = _swap(rec["winner"])
      rec["preference"] = {c: _swap(s) for c, s in rec["preference"].items()}
    return rec

  def _many(self, fn, jobs, on_error):
    def run(job):
      try:
        return fn(*job)
      except http.RemoteCallError as e:
        if on_error == "raise":
          raise
        return {"parsed": False, "failed": True, "raw": None, "error": str(e)}
    with cf.ThreadPoolExecutor(self.max_workers) as pool:
      return list(pool.map(run, jobs))

  def score_many(self, images, prompts=None, on_error="record"):
    prompts = list(prompts) if prompts is not None else [None] * len(images)
    return self._many(self.score, list(zip(images, prompts)), on_error)

  def compare_many(self, images_a, images_b, prompts=None, order="random", seed=0, on_error="record"):
    """``order``: "fixed" (A first), "random" (seeded per-pair coin against position bias), "swapped"."""
    if len(images_a) != len(images_b):
      raise ValueError(f"pairwise needs equal counts, got {len(images_a)} and {len(images_b)}")
    prompts = list(prompts) if prompts is not None else [None] * len(images_a)
    rng = random.Random(seed)
    swaps = [{"fixed": False, "swapped": True}.get(order, None) for _ in images_a]
    swaps = [rng.random() < 0.5 if s is None else s for s in swaps]
    return self._many(self.compare, list(zip(images_a, images_b, prompts, swaps)), on_error)


# ----- CLI -------------------------------------------------------------------------------------------------------

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_images(path):
  """A folder of images (sorted by name) or an .npz (key "images", else its first array; float in [-1, 1] or
  uint8) -> (list of (H, W, C) uint8, names)."""
  if os.path.isdir(path):
    from PIL import Image
    names = sorted(f for f in os.listdir(path) if f.lower().endswith(_IMAGE_EXT))
    imgs = []
    for f in names:
      im = Image.open(os.path.join(path, f))
      im = im if im.mode in ("L", "RGB", "RGBA") else im.convert("RGB")
      a = np.asarray(im)
      imgs.append(a[..., None] if a.ndim == 2 else a)
    return imgs, names
  with np.load(path) as z:
    arr = z["images"] if "images" in z.files else z[z.files[0]]
  arr = http.to_uint8(arr)
  return list(arr), [f"{os.path.basename(path)}[{i}]" for i in range(len(arr))]


def npz_prompts(path):
  """The ``prompts`` array of an .npz of images (as ``analysis evaluate`` writes), else None."""
  if path is None or os.path.isdir(path) or not str(path).endswith(".npz"):
    return None
  with np.load(path) as z:
    return [str(p) for p in z["prompts"]] if "prompts" in z.files else None


def load_prompts(path, n):
  """Text (one per line), .json (list or {"prompts": [...]}) or .jsonl (strings or {"prompt": ...}); one prompt
  is broadcast to all ``n`` images."""
  if path is None:
    return [None] * n
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    obj = json.loads(text)
    prompts = obj["prompts"] if isinstance(obj, dict) else obj
  elif path.endswith(".jsonl"):
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = [r["prompt"] if isinstance(r, dict) else r for r in rows]
  else:
    prompts = text.splitlines()
    while prompts and not prompts[-1].strip():
      prompts.pop()
  prompts = [str(p) for p in prompts]
  if len(prompts) == 1:
    prompts = prompts * n
  if len(prompts) != n:
    raise ValueError(f"{path}: {len(prompts)} prompts for {n} images")
  return prompts


def plot_summary(summary, mode, path, title=""):
  """Bar plot: per-criterion mean score (single) or win rate of A (pairwise)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  key = "mean" if mode == "single" else "win_rate_A"
  vals = [summary["criteria"][c][key] for c in CRITERIA]
  fig, ax = plt.subplots(figsize=(7, 3.2))
  ax.bar(range(len(CRITERIA)), [np.nan if v is None else v for v in vals], color="tab:blue")
  ax.set_xticks(range(len(CRITERIA)), [c.replace("_", "\n") for c in CRITERIA], fontsize=8)
  if mode == "single":
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean score (1-10)")
  else:
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_ylabel("win rate of A (ties = 1/2)")
  ax.set_title(f"{title} (n={summary['n']}, unparseable={summary['n_unparseable']}, failed={summary['n_failed']})",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description="Score images with an MLLM judge over an OpenAI-compatible API.")
  p.add_argument("--images", required=True, help="folder of images or .npz (A in pairwise mode)")
  p.add_argument("--pairwise", default=None, help="folder or .npz of images B: compare A vs B pair by pair")
  p.add_argument("--prompts", default=None, help="prompt file: .txt (one per line), .json or .jsonl (default: the "
                 "prompts stored in the --images .npz, as `analysis evaluate` writes them)")
  p.add_argument("--url", required=True, help="base URL (http://host:8000/v1) or the full chat/completions URL")
  p.add_argument("--model", required=True)
  p.add_argument("--out", default="judge.json")
  p.add_argument("--order", default="random", choices=("random", "fixed", "swapped"), help="pairwise image order")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout-s", type=float, default=120.0)
  p.add_argument("--max-attempts", type=int, default=3)
  p.add_argument("--backoff-s", type=float, default=1.0)
  p.add_argument("--max-tokens", type=int, default=512)
  p.add_argument("--workers", type=int, default=4)
  p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key, if any")
  a = p.parse_args(argv)

  images, names = load_images(a.images)
  stored = None if a.prompts else npz_prompts(a.images)
  if stored is not None and len(stored) != len(images):
    raise ValueError(f"{a.images}: {len(stored)} prompts for {len(images)} images")
  prompts = stored if stored is not None else load_prompts(a.prompts, len(images))
  judge = Judge(a.url, a.model, timeout_s=a.timeout_s, max_attempts=a.max_attempts, backoff_s=a.backoff_s,
                max_tokens=a.max_tokens, api_key=os.environ.get(a.api_key_env), max_workers=a.workers)
  if a.pairwise:
    images_b, names_b = load_images(a.pairwise)
    results = judge.compare_many(images, images_b, prompts, order=a.order, seed=a.seed)
    for r, na, nb in zip(results, names, names_b):
      r.update(name_a=na, name_b=nb)
    mode, summary = "pairwise", summarize_pairwise(results)
  else:
    results = judge.score_many(images, prompts)
    for r, n in zip(results, names):
      r["name"] = n
    mode, summary = "single", summarize_single(results)
  for i, (r, pr) in enumerate(zip(results, prompts)):
    r.update(index=i, prompt=pr)
  report = {"mode": mode, "model": a.model, "url": judge.url, "images": a.images, "images_b": a.pairwise,
            "criteria": list(CRITERIA), "summary": summary, "http": judge.stats, "results": results}
  out_dir = os.path.dirname(os.path.abspath(a.out))
  os.makedirs(out_dir, exist_ok=True)
  with open(a.out, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=str)
  plot_path = os.path.splitext(a.out)[0] + ".png"
  plot_summary(summary, mode, plot_path, title=f"{a.model} {mode}")
  print(json.dumps({"out": a.out, "plot": plot_path, **{k: summary[k] for k in ("n", "n_parsed", "n_unparseable",
                                                                                "n_failed")}}))
  return report


if __name__ == "__main__":
  main()
