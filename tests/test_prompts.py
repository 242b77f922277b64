"""Prompt sets as tfds datasets over local files (data/prompts.py): each format round-trips in order, bad input
gives errors naming file and line and writes nothing, the CLI works, and encode_prompts reads a prompt-set dir."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")

from normguard_jax.data import encode_prompts, prompts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS_DIR = os.path.join(ROOT, "tests", "data", "prompt_formats")

EXPECTED = {
    "pickscore": ("pickscore_train.txt", [
        ("a lantern floating over a misty lake, fantasy art", {}),
        ("portrait of an old fisherman, charcoal drawing, highly detailed", {}),
        (", pastel, dreamy, a cat made of clouds", {}),
        ("a neon diner on a rainy night, 35mm photo", {})]),
    "ocr": ("ocr_train.txt", [
        ('A shop window with a sticker that says "SALE 50%"', {"target_text": "SALE 50%"}),
        ('A birthday cake decorated with icing that reads "Happy 9th, Mia"', {"target_text": "Happy 9th, Mia"}),
        ('A street sign pointing left labeled "Maple Ave" and right labeled "Oak St"', {"target_text": "Maple Ave"}),
        ('A mug printed with the words "coffee first" on a wooden desk', {"target_text": "coffee first"})]),
    "geneval": ("geneval_metadata.jsonl", [
        ("a photo of an umbrella", {"tag": "single_object", "include": [{"class": "umbrella", "count": 1}]}),
        ("a photo of a cup and a spoon", {"tag": "two_object", "include": [{"class": "cup", "count": 1},
                                                                          {"class": "spoon", "count": 1}]}),
        ("a photo of three apples", {"tag": "counting", "include": [{"class": "apple", "count": 3}],
                                     "exclude": [{"class": "apple", "count": 4}]}),
        ("a photo of a green car", {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "green"}]}),
        ("a photo of a bench left of a dog", {"tag": "position", "include": [
            {"class": "dog", "count": 1}, {"class": "bench", "count": 1, "position": ["left of", 0]}]}),
        ("a photo of a red book and a white vase", {"tag": "color_attr", "include": [
            {"class": "book", "count": 1, "color": "red"}, {"class": "vase", "count": 1, "color": "white"}]})]),
    "drawbench": ("drawbench.csv", [
        ("A yellow kite above a blue tent.", {"category": "Colors"}),
        ("Three teacups and one saucer.", {"category": "Counting"}),
        ("A cactus, a snail, and a kettle on a shelf.", {"category": "Positional"}),
        ("A sign that says 'Gone fishing'.", {"category": "Text"})]),
    "plain": ("plain.txt", [("a small boat on a calm sea", {}), ("a bee on a lavender flower", {}),
                            ("an origami elephant", {})]),
    "plain_jsonl": ("plain.jsonl", [("a kite shaped like a fish", {"source": "handwritten", "id": 7}),
                                    ("a teapot in the shape of a snail", {})]),
}


def _expected_examples(records):
  return [{"prompt": p, "metadata": m, "index": i} for i, (p, m) in enumerate(records)]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_format_round_trip(case, tmp_path):
  fmt = case.split("_")[0]
  fname, records = EXPECTED[case]
  src_path = os.path.join(FORMATS_DIR, fname)
  assert prompts.parse_prompts(src_path, fmt) == records
  out = prompts.write_prompt_set(tmp_path, src_path, fmt, split="test")
  assert out == str(tmp_path / f"{fmt}_test" / "1.0.0")
  src = prompts.load_prompt_set(tmp_path, "test")  # the OUT dir works as well as the dataset dir
  want = _expected_examples(records)
  assert len(src) == len(want) and list(src) == want  # order kept
  assert src[1] == want[1] and src[-1] == want[-1] and src.__getitems__([len(want) - 1, 0]) == [want[-1], want[0]]
  assert src.prompts() == [p for p, _ in records]
  assert src.metadata["format"] == fmt and src.metadata["num_prompts"] == len(records)
  assert prompts.load_prompt_set(out)[0] == want[0]  # split=None: the only split
  with pytest.raises(KeyError, match="split 'train' not in"):
    prompts.load_prompt_set(out, "train")
  with pytest.raises(IndexError):
    src[len(want)]


def test_tiny_prompt_set(tmp_path):
  recs = prompts.parse_prompts(prompts.TINY_PROMPTS, "pickscore")
  assert len(recs) == 32 and len({p for p, _ in recs}) == 32 and all(p and not m for p, m in recs)
  out = prompts.write_prompt_set(tmp_path, prompts.TINY_PROMPTS, "plain", name="tiny")
  assert prompts.load_prompt_set(out).prompts() == [p for p, _ in recs]
  held_out = [p for p, _ in prompts.parse_prompts(prompts.TINY_TEST_PROMPTS, "pickscore")]
  assert len(held_out) == 8 and not set(held_out) & {p for p, _ in recs}  # the dry run's `test` split


def _write(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text, encoding="utf-8")
  return str(p)


BAD = [  # (format, file name, content, regex the error must match; {f} is the file path)
    ("pickscore", "e.txt", "", r"{f}: empty file"),
    ("pickscore", "w.txt", "  \n\n", r"{f}: empty file"),
    ("geneval", "e.jsonl", "", r"{f}: empty file"),
    ("drawbench", "e.csv", "", r"{f}: empty file"),
    ("plain", "e.txt", "\n", r"{f}: empty file"),
    ("pickscore", "blank.txt", "a cat\n\na dog\n", r"{f}:2: empty prompt"),
    ("ocr", "blank.txt", 'say "hi"\n   \nsay "yo"\n', r"{f}:2: empty prompt"),
    ("geneval", "bad.jsonl", '{"tag": "t", "include": [], "prompt": "a"}\n{"tag": "t", "include": [\n',
     r"{f}:2: malformed JSON line"),
    ("geneval", "arr.jsonl", '["a"]\n', r"{f}:1: expected a JSON object"),
    ("geneval", "miss.jsonl", '{"tag": "t", "include": [], "prompt": "a"}\n{"tag": "t", "prompt": "b"}\n',
     r"{f}:2: missing GenEval field\(s\) \['include'\]"),
    ("geneval", "emp.jsonl", '{"tag": "t", "include": [], "prompt": "  "}\n', r"{f}:1: empty prompt"),
    ("geneval", "inc.jsonl", '{"tag": "t", "include": "cat", "prompt": "a cat"}\n', r"{f}:1: 'include' must be a list"),
    ("drawbench", "col.csv", "Prompt,Category\na cat,Animals\n", r"{f}:1: missing column\(s\) \['Prompts'\]"),
    ("drawbench", "cat.csv", "Prompts\na cat\n", r"{f}:1: missing column\(s\) \['Category'\]"),
    ("drawbench", "emp.csv", "Prompts,Category\na cat,Animals\n,Colors\n", r"{f}:3: empty prompt"),
    ("drawbench", "hdr.csv", "Prompts,Category\n", r"{f}: no prompts"),
    ("plain", "p.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', r"{f}:2: missing field 'prompt'"),
    ("plain", "q.jsonl", '{"prompt": "a"}\nnot json\n', r"{f}:2: malformed JSON line"),
    ("plain", "r.jsonl", '{"prompt": ""}\n', r"{f}:1: empty prompt"),
]


@pytest.mark.parametrize("fmt,name,text,pattern", BAD, ids=[f"{b[0]}-{b[1]}" for b in BAD])
def test_bad_input_errors(fmt, name, text, pattern, tmp_path):
  f = _write(tmp_path, name, text)
  with pytest.raises(prompts.PromptFormatError, match=pattern.format(f=f.replace("\\", "\\\\"))):
    prompts.parse_prompts(f, fmt)


def test_ocr_reports_every_prompt_without_target(tmp_path):
  f = _write(tmp_path, "ocr.txt", 'a sign that says "OPEN"\na plain wall\na note reading "unclosed\nempty "" quotes\n')
  with pytest.raises(prompts.PromptFormatError) as e:
    prompts.parse_prompts(f, "ocr")
  msg = str(e.value)
  assert "3 OCR prompt(s) without a target text" in msg
  assert f"{f}:2:" in msg and f"{f}:3:" in msg and f"{f}:4:" in msg and f"{f}:1:" not in msg
  assert prompts.ocr_target_text('x "a" y "b"') == "a"


def test_unknown_format_and_missing_file(tmp_path):
  with pytest.raises(ValueError, match="unknown prompt format 'parti'"):
    prompts.parse_prompts(os.path.join(FORMATS_DIR, "plain.txt"), "parti")
  with pytest.raises(FileNotFoundError, match="no such file"):
    prompts.write_prompt_set(tmp_path, str(tmp_path / "nope.txt"), "plain")


def test_nothing_partial_and_no_overwrite(tmp_path, monkeypatch):
  bad = _write(tmp_path, "bad.jsonl", '{"tag": "t", "include": [], "prompt": "a"}\n{oops\n')
  out_dir = tmp_path / "out"
  with pytest.raises(prompts.PromptFormatError, match=":2: malformed JSON"):
    prompts.write_prompt_set(out_dir, bad, "geneval")
  assert not out_dir.exists()  # parsing happens before anything is written

  good = os.path.join(FORMATS_DIR, "pickscore_train.txt")
  first = prompts.write_prompt_set(out_dir, good, "pickscore")
  with pytest.raises(FileExistsError, match="already prepared"):
    prompts.write_prompt_set(out_dir, os.path.join(FORMATS_DIR, "plain.txt"), "plain", name="pickscore_train")
  assert len(prompts.load_prompt_set(first)) == 4  # untouched

  class Boom(RuntimeError):
    pass

  def failing_builder(name):
    class B:
      def __init__(self, **kw):
        pass

      def download_and_prepare(self):
        raise Boom("disk full")
    return B

  monkeypatch.setattr(prompts, "_builder_cls", failing_builder)
  with pytest.raises(Boom):
    prompts.write_prompt_set(out_dir, good, "pickscore", name="other")
  assert sorted(os.listdir(out_dir)) == ["pickscore_train"]  # no temp dir, no half-written "other"


def test_several_sets_in_one_out_dir(tmp_path):
  prompts.write_prompt_set(tmp_path, os.path.join(FORMATS_DIR, "plain.txt"), "plain")
  prompts.write_prompt_set(tmp_path, os.path.join(FORMATS_DIR, "drawbench.csv"), "drawbench")
  with pytest.raises(ValueError, match="several datasets"):
    prompts.load_prompt_set(tmp_path)
  assert len(prompts.load_prompt_set(tmp_path / "drawbench_train")) == 4


def test_cli(tmp_path, capsys):
  src = os.path.join(FORMATS_DIR, "ocr_train.txt")
  out = prompts.main(["ocr", src, str(tmp_path), "--split", "test"])
  res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert res == {"out": out, "format": "ocr", "split": "test", "num_prompts": 4}
  assert prompts.load_prompt_set(out, "test")[3]["metadata"] == {"target_text": "coffee first"}
  bad = _write(tmp_path, "bad.csv", "Prompts,Category\n,Colors\n")
  with pytest.raises(SystemExit) as e:
    prompts.main(["drawbench", bad, str(tmp_path / "o2")])
  assert e.value.code == 2 and f"{bad}:2: empty prompt" in capsys.readouterr().err
  assert not (tmp_path / "o2").exists()


def test_cli_subprocess(tmp_path):
  r = subprocess.run([sys.executable, "-m", "normguard_jax.data.prompts", "geneval",
                      os.path.join(FORMATS_DIR, "geneval_metadata.jsonl"), str(tmp_path), "--name", "geneval_eval"],
                     cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["num_prompts"] == 6 and res["out"] == str(tmp_path / "geneval_eval" / "1.0.0")
  assert prompts.load_prompt_set(res["out"])[2]["metadata"]["exclude"] == [{"class": "apple", "count": 4}]


def test_encode_prompts_reads_a_prompt_set_dir(tmp_path):
  out = prompts.write_prompt_set(tmp_path / "sets", os.path.join(FORMATS_DIR, "drawbench.csv"), "drawbench")
  want = [p for p, _ in EXPECTED["drawbench"][1]]
  assert encode_prompts.read_prompts(out) == want
  assert encode_prompts.read_prompts(str(tmp_path / "sets"), "train") == want
  with pytest.raises(KeyError, match="split 'test'"):
    encode_prompts.read_prompts(out, "test")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a prepared prompt set"):
    encode_prompts.read_prompts(str(tmp_path / "empty"))
  assert encode_prompts.read_prompts(os.path.join(FORMATS_DIR, "plain.txt"))[0] == "a small boat on a calm sea"
