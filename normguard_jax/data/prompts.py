"""Prompt sets as tfds datasets (array_record) built from LOCAL files (DESIGN.md §6); nothing is downloaded.

  python -m normguard_jax.data.prompts FORMAT SOURCE OUT [--split test] [--name NAME]

One example per prompt: ``prompt`` (Text), ``metadata`` (Text: a JSON object, ``{}`` when the format has
none) and ``index`` (int64: 0-based position in the source file). :func:`write_prompt_set` parses SOURCE
completely first (every problem is an error naming file and line), then writes ``OUT/<name>/1.0.0`` through a
hidden temp dir in OUT and a rename (tfds' log names that temp dir), so a failure leaves nothing partial; it
refuses to overwrite a prepared set.
:func:`load_prompt_set` returns a random-access source of ``{prompt: str, metadata: dict, index: int}`` in
file order. One split per dataset (write train and test under different names or OUT dirs).

Formats (one parser each; layouts checked against the public sources named):

- ``pickscore``: UTF-8 text, one prompt per line, as flow_grpo ``dataset/pickscore/{train,test}.txt`` and
  X-GenGroup/Flow-Factory ``dataset/pickscore/test.txt`` (read there by ``TextPromptDataset``:
  ``line.strip()`` per line, metadata ``{}``). Lines are stripped; blank lines at the end of the file are
  ignored, a blank line elsewhere is an error (those repos index prompts by line).
- ``ocr``: the same layout (flow_grpo ``dataset/ocr/{train,test}.txt``); each prompt holds its target text in
  ASCII double quotes. metadata ``{"target_text": ...}`` = the text between the first pair of ``"`` (flow_grpo's
  OCR reward takes ``prompt.split('"')[1]``). A prompt with no closed, non-empty quoted text is an error that
  lists every such line.
- ``geneval``: JSONL, one object per line, GenEval's ``prompts/evaluation_metadata.jsonl`` (djghosh13/geneval,
  built by ``prompts/create_prompts.py``; flow_grpo's ``GenevalPromptDataset`` reads the same schema from
  ``dataset/geneval/{split}_metadata.jsonl``): ``{"tag": str, "include": [{"class": str, "count": int, ...}],
  "exclude"?: [...], "prompt": str}``. metadata = every key but ``prompt`` (tag, include, exclude, extras),
  which is what the GenEval scorer needs. Blank lines: as ``pickscore``.
- ``drawbench``: CSV with a header holding the columns ``Prompts`` and ``Category`` (the public DrawBench
  sheet as exported to CSV, e.g. shunk031/huggingface-datasets_DrawBench: ``Prompts,Category``). metadata
  ``{"category": ...}`` plus any other non-empty columns under their header names.
- ``plain``: fallback, like ``encode_prompts.read_prompts``: text with one prompt per line (blank lines
  skipped, lines stripped), or JSONL (``.jsonl``/``.json`` suffix, or a first non-blank line that starts with
  ``{``) with a ``prompt`` field; the other fields become metadata.
"""

import argparse
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

VERSION = "1.0.0"
FEATURES = ("prompt", "metadata", "index")
TINY_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_sets", "tiny_prompts.txt")
# held-out prompts for the tiny dry run (a `test` split: encode_prompts ... --split test); none is in TINY_PROMPTS
TINY_TEST_PROMPTS = os.path.join(os.path.dirname(TINY_PROMPTS), "tiny_prompts_test.txt")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

Record = Tuple[str, dict]  # (prompt, metadata)


class PromptFormatError(ValueError):
  """Bad prompt-set input; the message names the file and line."""


def _tfds():
  import tensorflow_datasets as tfds  # heavy import, only when a dataset is written or read
  return tfds


# ----------------------------------------------------------------------------------------------- parsers

def _read_lines(path) -> List[str]:
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8-sig", newline="") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise PromptFormatError(f"{path}: not UTF-8 text ({e})") from e
  if not text.strip():
    raise PromptFormatError(f"{path}: empty file (no prompts)")
  return text.splitlines()


def _numbered(path, lines, *, skip_blank: bool):
  """(line_no, line) pairs; blank lines at the end are dropped, blank lines elsewhere are skipped or an error."""
  last = max(i for i, l in enumerate(lines) if l.strip())
  for n, line in enumerate(lines[:last + 1], 1):
    if not line.strip():
      if skip_blank:
        continue
      raise PromptFormatError(f"{path}:{n}: empty prompt (blank line inside the file; this format indexes "
                              f"prompts by line)")
    yield n, line


def _json_object(path, n, line) -> dict:
  try:
    rec = json.loads(line)
  except ValueError as e:
    raise PromptFormatError(f"{path}:{n}: malformed JSON line ({e})") from e
  if not isinstance(rec, dict):
    raise PromptFormatError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
  return rec


def _prompt_field(path, n, rec) -> str:
  if "prompt" not in rec:
    raise PromptFormatError(f"{path}:{n}: missing field 'prompt' (fields: {sorted(rec)})")
  p = rec["prompt"]
  if not isinstance(p, str):
    raise PromptFormatError(f"{path}:{n}: 'prompt' must be a string, got {type(p).__name__}")
  if not p.strip():
    raise PromptFormatError(f"{path}:{n}: empty prompt")
  return p


def parse_pickscore(path) -> List[Record]:
  """flow_grpo / Flow-Factory ``dataset/pickscore/{train,test}.txt``: one prompt per line; metadata ``{}``."""
  return [(line.strip(), {}) for _, line in _numbered(path, _read_lines(path), skip_blank=False)]


def ocr_target_text(prompt: str) -> Optional[str]:
  """The text between the first pair of ASCII double quotes (flow_grpo: ``prompt.split('"')[1]``), or None."""
  parts = prompt.split('"')
  return parts[1] if len(parts) >= 3 and parts[1].strip() else None


def parse_ocr(path) -> List[Record]:
  """flow_grpo ``dataset/ocr/{train,test}.txt``: one prompt per line with its quoted target text."""
  out, bad = [], []
  for n, line in _numbered(path, _read_lines(path), skip_blank=False):
    p = line.strip()
    t = ocr_target_text(p)
    if t is None:
      bad.append(f"{path}:{n}: {p[:80]!r}")
    out.append((p, {"target_text": t}))
  if bad:
    shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    raise PromptFormatError(f"{path}: {len(bad)} OCR prompt(s) without a target text in double quotes "
                            f"(need '...\"TEXT\"...', TEXT non-empty):\n  {shown}")
  return out


def parse_geneval(path) -> List[Record]:
  """GenEval ``evaluation_metadata.jsonl``: ``{"tag", "include", "exclude"?, "prompt"}`` per line."""
  out = []
  for n, line in _numbered(path, _read_lines(path), skip_blank=False):
    rec = _json_object(path, n, line)
    missing = [k for k in ("tag", "include", "prompt") if k not in rec]
    if missing:
      raise PromptFormatError(f"{path}:{n}: missing GenEval field(s) {missing} (fields: {sorted(rec)})")
    p = _prompt_field(path, n, rec)
    if not isinstance(rec["tag"], str) or not rec["tag"]:
      raise PromptFormatError(f"{path}:{n}: 'tag' must be a non-empty string, got {rec['tag']!r}")
    for k in ("include", "exclude"):
      if k in rec and not isinstance(rec[k], list):
        raise PromptFormatError(f"{path}:{n}: {k!r} must be a list, got {type(rec[k]).__name__}")
    out.append((p, {k: v for k, v in rec.items() if k != "prompt"}))
  return out


def parse_drawbench(path) -> List[Record]:
  """DrawBench CSV: header with ``Prompts`` and ``Category``; metadata ``{"category", <other columns>}``."""
  path = os.fspath(path)
  _read_lines(path)  # empty-file and encoding checks
  out = []
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader)]
    missing = [c for c in ("Prompts", "Category") if c not in header]
    if missing:
      raise PromptFormatError(f"{path}:1: missing column(s) {missing} (header: {header}; DrawBench CSV needs "
                              f"'Prompts' and 'Category')")
    for row in reader:
      n = reader.line_num
      if not any(c.strip() for c in row):
        continue  # blank row (also the trailing newline)
      if len(row) > len(header):
        raise PromptFormatError(f"{path}:{n}: {len(row)} fields for {len(header)} columns {header}")
      cells = dict(zip(header, row + [""] * (len(header) - len(row))))
      p = cells.pop("Prompts").strip()
      if not p:
        raise PromptFormatError(f"{path}:{n}: empty prompt (column 'Prompts')")
      meta = {"category": cells.pop("Category").strip()}
      meta.update({k: v for k, v in cells.items() if k and v.strip()})
      out.append((p, meta))
  if not out:
    raise PromptFormatError(f"{path}: no prompts (only a header)")
  return out


def parse_plain(path) -> List[Record]:
  """Fallback: one prompt per line (blank lines skipped), or JSONL with ``prompt`` (other fields -> metadata)."""
  path = os.fspath(path)
  lines = _read_lines(path)
  first = next(l for l in lines if l.strip())
  if path.endswith((".jsonl", ".json")) or first.lstrip().startswith("{"):
    out = []
    for n, line in _numbered(path, lines, skip_blank=True):
      rec = _json_object(path, n, line)
      out.append((_prompt_field(path, n, rec), {k: v for k, v in rec.items() if k != "prompt"}))
    return out
  return [(line.strip(), {}) for _, line in _numbered(path, lines, skip_blank=True)]


PARSERS: Dict[str, Callable[[str], List[Record]]] = {
    "pickscore": parse_pickscore, "ocr": parse_ocr, "geneval": parse_geneval, "drawbench": parse_drawbench,
    "plain": parse_plain,
}


def parse_prompts(source_path, fmt: str) -> List[Record]:
  """Parses ``source_path`` as ``fmt`` into [(prompt, metadata)], in file order; errors name file and line."""
  if fmt not in PARSERS:
    raise ValueError(f"unknown prompt format {fmt!r}; choose one of {sorted(PARSERS)}")
  if not os.path.isfile(source_path):
    raise FileNotFoundError(f"{source_path}: no such file")
  return PARSERS[fmt](os.fspath(source_path))


# ----------------------------------------------------------------------------------------------- tfds

def _builder_cls(name: str):
  tfds = _tfds()

  class PromptSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One split of prompts given at construction; order kept (no shuffling)."""
    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, records, split, metadata, **kwargs):
      self._records, self._split, self._metadata = records, split, metadata
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"prompt set ({self._metadata['format']}), normguard_jax.data.prompts",
          features=tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "metadata": tfds.features.Text(),
                                               "index": tfds.features.Scalar(dtype=np.int64)}),
          disable_shuffling=True, metadata=tfds.core.MetadataDict(self._metadata))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {self._split: self._generate_examples()}

    def _generate_examples(self):
      for i, (p, meta) in enumerate(self._records):
        yield i, {"prompt": p, "metadata": json.dumps(meta, sort_keys=True, ensure_ascii=False), "index": i}

  PromptSetBuilder.name = name
  return PromptSetBuilder


def write_prompt_set(data_dir, source_path, fmt: str, split: str = "train", name: Optional[str] = None) -> str:
  """Parses ``source_path`` as ``fmt`` and writes ``<data_dir>/<name>/1.0.0`` (name defaults to
  ``<fmt>_<split>``); returns that dataset dir. Nothing is written when parsing fails; refuses to overwrite."""
  records = parse_prompts(source_path, fmt)
  name = name or f"{fmt}_{split}"
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must be lower_snake_case (letters, digits, _)")
  if not re.match(r"^\w+$", split):
    raise ValueError(f"split name {split!r} must be letters, digits or _")
  data_dir = os.path.abspath(os.fspath(data_dir))
  final = os.path.join(data_dir, name, VERSION)
  if os.path.exists(os.path.join(final, "dataset_info.json")):
    raise FileExistsError(f"{final}: a prompt set is already prepared there; choose another OUT or --name")
  if os.path.exists(final) and os.listdir(final):
    raise FileExistsError(f"{final}: exists and is not a prepared prompt set (a leftover?); remove it first")
  with open(source_path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  meta = {"format": fmt, "source": os.path.abspath(os.fspath(source_path)), "source_sha256": sha,
          "num_prompts": len(records), "split": split}
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=data_dir)
  made_parent = not os.path.isdir(os.path.join(data_dir, name))
  try:
    builder = _builder_cls(name)(records=records, split=split, metadata=meta, data_dir=tmp,
                                 file_format="array_record")
    builder.download_and_prepare()
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.isdir(final):
      os.rmdir(final)  # empty, checked above
    os.replace(builder.data_dir, final)
  except BaseException:
    if made_parent and os.path.isdir(os.path.dirname(final)) and not os.listdir(os.path.dirname(final)):
      os.rmdir(os.path.dirname(final))
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def find_prompt_set_dir(path) -> str:
  """``path`` when it holds ``dataset_info.json``, else the single ``<name>/<version>`` below it."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(path, "*", "*", "dataset_info.json")))
  found += sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")))
  found = [os.path.dirname(f) for f in found]  # glob skips the hidden temp dirs of writes in progress
  if not found:
    raise FileNotFoundError(f"{path}: no prompt set (no dataset_info.json here, nor in <name>/<version>/)")
  if len(found) > 1:
    raise ValueError(f"{path}: several datasets below it; pass one of {found}")
  return found[0]


def is_prompt_set_dir(path) -> bool:
  """True when ``path`` is (or holds exactly one) dataset with the prompt-set features."""
  if not os.path.isdir(path):
    return False
  try:
    d = find_prompt_set_dir(path)
    with open(os.path.join(d, "features.json"), encoding="utf-8") as f:
      feats = f.read()
  except (OSError, ValueError):
    return False
  return all(f'"{k}"' in feats for k in FEATURES)


class PromptSetSource:
  """Random access over one split: ``src[i]`` -> ``{prompt: str, metadata: dict, index: int}``."""

  def __init__(self, data_source, info, split):
    self._src, self.info, self.split = data_source, info, split
    self.metadata = dict(info.metadata or {})

  def __len__(self):
    return len(self._src)

  @staticmethod
  def _decode(ex):
    def text(v):
      return v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return {"prompt": text(ex["prompt"]), "metadata": json.loads(text(ex["metadata"])), "index": int(ex["index"])}

  def __getitem__(self, i):
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {n} prompts")
    return self._decode(self._src[i % n])

  def __getitems__(self, indices):
    return [self._decode(ex) for ex in self._src.__getitems__(list(indices))]

  def __iter__(self):
    for s in range(0, len(self), 1024):
      yield from self.__getitems__(range(s, min(s + 1024, len(self))))

  def prompts(self) -> List[str]:
    return [ex["prompt"] for ex in self]

  def __repr__(self):
    return f"PromptSetSource({len(self)} prompts, format {self.metadata.get('format')!r}, split {self.split!r})"


def load_prompt_set(path, split: Optional[str] = None) -> PromptSetSource:
  """Random-access source over a set written by :func:`write_prompt_set` (its dir or OUT). ``split=None``: the
  only split there is."""
  builder = _tfds().builder_from_directory(find_prompt_set_dir(path))
  splits = sorted(builder.info.splits)
  if split is None:
    if len(splits) != 1:
      raise ValueError(f"{builder.data_dir}: splits {splits}; choose one")
    split = splits[0]
  if split not in builder.info.splits:
    raise KeyError(f"split {split!r} not in {splits} ({builder.data_dir})")
  missing = set(FEATURES) - set(builder.info.features.keys())
  if missing:
    raise ValueError(f"{builder.data_dir}: not a prompt set (missing features {sorted(missing)})")
  return PromptSetSource(builder.as_data_source(split=split), builder.info, split)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.data.prompts", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("format", choices=sorted(PARSERS))
  p.add_argument("source", help="local prompt file in that format")
  p.add_argument("out", help="output data_dir (gets <name>/1.0.0)")
  p.add_argument("--split", default="train")
  p.add_argument("--name", default=None, help="dataset name (default <format>_<split>)")
  args = p.parse_args(argv)
  try:
    out = write_prompt_set(args.out, args.source, args.format, split=args.split, name=args.name)
  except (PromptFormatError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  src = load_prompt_set(out, args.split)
  print(json.dumps({"out": out, "format": args.format, "split": args.split, "num_prompts": len(src)}))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
