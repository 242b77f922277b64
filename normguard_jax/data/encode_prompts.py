"""Offline SD3 / FLUX.1 / FLUX.2-klein prompt encoding with the real text encoders (transformers, PyTorch),
cached as a tfds dataset.

  python -m normguard_jax.data.encode_prompts PIPELINE_DIR PROMPTS OUT [--family sd3|flux1|flux2]
      [--batch-size 16] [--max-sequence-length N] [--clip-skip N] [--device cuda] [--dtype float16] [--split train]

Splits. The first run writes a new dataset in OUT (split ``--split``, default ``train``). A later run with the same
OUT and another ``--split`` (``test`` for held-out eval prompts, ``negative`` for CFG) ADDS that split to the same
dataset, leaving the existing splits untouched (``data.text_embeddings.add_split``); it must use the same family,
shapes and encoder settings (max_sequence_length, clip_skip, use_t5, hidden-state layers), else it stops with an
error naming both values. An existing split is never overwritten. All of this, the prompts and the split name are
checked before the encoders run; bad input exits with status 2 and a message naming the argument. Needs torch and
transformers (``pip install -r requirements-encode.txt``).

The family comes from ``--family`` or else PIPELINE_DIR/model_index.json ``_class_name``
(``StableDiffusion3*`` -> sd3, ``Flux2Klein*`` -> flux2, other ``Flux*`` -> flux1; ``Flux2Pipeline``, i.e.
FLUX.2-dev with its Mistral3 encoder, is not supported), or without that file from the text encoders'
config.json ``model_type`` (see :func:`detect_family`). ``--max-sequence-length`` defaults to diffusers'
(256 for SD3, 512 for both FLUX). The dataset metadata records ``family`` and ``max_sequence_length``.

SD3. PIPELINE_DIR is a LOCAL diffusers SD3 pipeline layout: text_encoder, text_encoder_2
(CLIPTextModelWithProjection), text_encoder_3 (T5EncoderModel), tokenizer, tokenizer_2 (CLIPTokenizer),
tokenizer_3 (T5 tokenizer); nothing is downloaded. PROMPTS is a text file (one prompt per line, blank lines
skipped), JSONL with a ``prompt`` field, or a prompt-set dataset dir prepared by ``data/prompts.py`` (read in
order; ``--prompts-split`` picks its split). OUT receives ``text_embeddings/1.0.0`` (array_record), read back
by ``data.text_embeddings.load_text_embeddings``.

The math is diffusers ``StableDiffusion3Pipeline.encode_prompt`` (one prompt for all three encoders, no
CFG, one image per prompt): each CLIP gets max_length padding to tokenizer.model_max_length (77) with
truncation and no attention mask; its embedding is the penultimate hidden state (``hidden_states[-(clip_skip
+ 2)]``) and its pooled output ``text_embeds``. T5 gets max_length padding to ``max_sequence_length``, no mask,
last hidden state. prompt_embeds = concat_seq(pad_to_T5_width(concat_feat(clip_l, clip_g)), t5); pooled =
concat(pooled_l, pooled_g). Without text_encoder_3 (``--no-t5``) the T5 part is zeros, as in diffusers.

FLUX.1 (:class:`FluxTextEncoder`, diffusers ``FluxPipeline.encode_prompt``): text_encoder (CLIPTextModel) +
tokenizer, text_encoder_2 (T5EncoderModel) + tokenizer_2. prompt_embeds = T5 last hidden state
(max_sequence_length, d_model); pooled = CLIP ``pooler_output`` (hidden_size). Both max_length-padded and
truncated, no attention mask.

FLUX.2-klein (:class:`Flux2TextEncoder`, diffusers ``Flux2KleinPipeline.encode_prompt``): text_encoder
(Qwen3ForCausalLM) + tokenizer (Qwen2TokenizerFast). Each prompt goes through the chat template (one user
turn, generation prompt, thinking disabled), is max_length-padded / truncated to max_sequence_length, and
the model runs WITH the attention mask; prompt_embeds = hidden_states[9], [18], [27] concatenated on the
feature axis per token (L, 3 * hidden_size). There is no pooled vector: ``pooled`` is stored with shape
(0,) and the metadata says ``pooled: "none"`` (see data/text_embeddings.py).
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from normguard_jax.data import text_embeddings
from normguard_jax.tools import command


def read_prompts(path, split: Optional[str] = None) -> List[str]:
  """One prompt per line, or JSONL (``.jsonl``/``.json`` or a first line that is a JSON object) with ``prompt``;
  or a prepared prompt-set dir (``data.prompts``), read in order (``split``: default its only split)."""
  if os.path.isdir(path):
    from normguard_jax.data import prompts as prompt_sets
    if not prompt_sets.is_prompt_set_dir(path):
      raise ValueError(f"{path}: a directory, but not a prepared prompt set "
                       f"(python -m normguard_jax.data.prompts writes one)")
    return prompt_sets.load_prompt_set(path, split).prompts()
  with open(path, encoding="utf-8") as f:
    lines = [l.rstrip("\r\n") for l in f]
  first = next((l for l in lines if l.strip()), "")
  jsonl = path.endswith((".jsonl", ".json")) or first.lstrip().startswith("{")
  prompts = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if jsonl:
      try:
        rec = json.loads(line)
        prompts.append(str(rec["prompt"]))
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{n}: not a JSON object with a 'prompt' field ({e})") from e
    else:
      prompts.append(line)
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


class SD3TextEncoder:
  """The three SD3 text encoders from a local pipeline dir; :meth:`encode` is ``encode_prompt``'s math."""
  family = "sd3"
  pooled_kind = "clip_l + clip_g text_embeds"

  def __init__(self, path, *, device="cpu", dtype="float32", max_sequence_length=256,
               clip_skip: Optional[int] = None, use_t5=True, joint_attention_dim: Optional[int] = None):
    import torch
    import transformers
    self.torch = torch
    path = os.fspath(path)
    self.device, self.dtype = torch.device(device), getattr(torch, dtype)
    self.max_sequence_length, self.clip_skip = int(max_sequence_length), clip_skip

    def sub(name):
      d = os.path.join(path, name)
      if not os.path.isdir(d):
        raise FileNotFoundError(f"{path}: no {name}/ (expected a diffusers SD3 pipeline layout)")
      return d

    load = dict(local_files_only=True)
    self.tokenizers = [transformers.CLIPTokenizer.from_pretrained(sub("tokenizer"), **load),
                       transformers.CLIPTokenizer.from_pretrained(sub("tokenizer_2"), **load)]
    self.clips = [transformers.CLIPTextModelWithProjection.from_pretrained(sub(n), dtype=self.dtype, **load)
                  .to(self.device).eval() for n in ("text_encoder", "text_encoder_2")]
    self.tokenizer_max_length = self.tokenizers[0].model_max_length  # diffusers uses tokenizer 1's for both
    if use_t5:
      self.tokenizer_3 = transformers.T5TokenizerFast.from_pretrained(sub("tokenizer_3"), **load)
      self.t5 = transformers.T5EncoderModel.from_pretrained(sub("text_encoder_3"), dtype=self.dtype, **load)
      self.t5 = self.t5.to(self.device).eval()
      self.embed_dim = self.t5.config.d_model
    else:
      if joint_attention_dim is None:
        raise ValueError("use_t5=False needs joint_attention_dim (the transformer's; 4096 for SD3)")
      self.tokenizer_3 = self.t5 = None
      self.embed_dim = int(joint_attention_dim)
    clip_width = sum(m.config.hidden_size for m in self.clips)
    if clip_width > self.embed_dim:
      raise ValueError(f"CLIP widths sum to {clip_width} > T5 width {self.embed_dim}: cannot pad (diffusers pads)")
    self.seq_len = self.tokenizer_max_length + self.max_sequence_length
    self.pooled_dim = sum(m.config.projection_dim for m in self.clips)
    self.source = os.path.abspath(path)

  def _clip(self, i, prompts):
    tok = self.tokenizers[i](prompts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                             return_tensors="pt")
    out = self.clips[i](tok.input_ids.to(self.device), output_hidden_states=True)
    skip = 0 if self.clip_skip is None else self.clip_skip
    return out.hidden_states[-(skip + 2)], out[0]

  def encode(self, prompts: Sequence[str]):
    """-> (prompt_embeds (B, 77 + max_sequence_length, T5 width), pooled (B, P)), float32 numpy."""
    torch = self.torch
    prompts = list(prompts)
    with torch.no_grad():
      (e1, p1), (e2, p2) = self._clip(0, prompts), self._clip(1, prompts)
      clip = torch.cat([e1, e2], dim=-1)
      if self.t5 is not None:
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        t5 = self.t5(ids.to(self.device))[0]
      else:
        t5 = torch.zeros((len(prompts), self.max_sequence_length, self.embed_dim), dtype=clip.dtype, device=clip.device)
      clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
      embeds = torch.cat([clip.to(t5.dtype), t5], dim=-2)
      pooled = torch.cat([p1, p2], dim=-1)
    return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

  def metadata(self):
    return {"source": self.source, "max_sequence_length": self.max_sequence_length, "clip_skip": self.clip_skip,
            "tokenizer_max_length": self.tokenizer_max_length, "use_t5": self.t5 is not None,
            "encoder_dtype": str(self.dtype).replace("torch.", ""), "reference": "diffusers "
            "StableDiffusion3Pipeline.encode_prompt (prompt_2 = prompt_3 = prompt)"}


FAMILY_NAMES = {"sd3": "SD3", "flux1": "FLUX.1", "flux2": "FLUX.2-klein"}
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux1": 512, "flux2": 512}  # diffusers' encode_prompt defaults


def _model_type(path, sub):
  cfg = os.path.join(path, sub, "config.json")
  if not os.path.isfile(cfg):
    return None
  with open(cfg, encoding="utf-8") as f:
    return json.load(f).get("model_type")


def detect_family(path) -> str:
  """sd3 / flux1 / flux2 from ``model_index.json`` ``_class_name`` (diffusers' pipeline class); without one,
  from the text encoders' ``model_type`` (text_encoder qwen3 -> flux2; text_encoder_2 t5 -> flux1; CLIP
  text_encoder + text_encoder_2 -> sd3)."""
  path = os.fspath(path)
  index = os.path.join(path, "model_index.json")
  if not os.path.isfile(index):
    te, te2 = _model_type(path, "text_encoder"), _model_type(path, "text_encoder_2")
    if te == "qwen3":
      return "flux2"
    if te2 == "t5":
      return "flux1"
    if te2 is not None and te2.startswith("clip"):
      return "sd3"
    raise FileNotFoundError(f"{path}: no model_index.json and no recognised text encoder layout; "
                            f"pass --family sd3|flux1|flux2")
  with open(index, encoding="utf-8") as f:
    name = str(json.load(f).get("_class_name", ""))
  if name.startswith("StableDiffusion3"):
    return "sd3"
  if name.startswith("Flux2Klein"):
    return "flux2"
  if name.startswith("Flux2"):
    raise ValueError(f"{path}: {name} (FLUX.2-dev, Mistral3 text encoder) is not supported; "
                              f"FLUX.2-klein (Flux2KleinPipeline) is")
  if name.startswith("Flux"):
    return "flux1"
  raise ValueError(f"{path}: model_index.json _class_name {name!r} is neither an SD3 nor a FLUX pipeline; "
                   f"pass --family")


def _subdir(path, name, layout):
  d = os.path.join(path, name)
  if not os.path.isdir(d):
    raise FileNotFoundError(f"{path}: no {name}/ (expected a diffusers {layout} pipeline layout)")
  return d


class FluxTextEncoder:
  """FLUX.1's CLIP-L + T5 from a local pipeline dir; :meth:`encode` is diffusers ``FluxPipeline.encode_prompt``
  (prompt_2 = prompt, one image per prompt): ``_get_clip_prompt_embeds`` (max_length padding to the CLIP
  tokenizer's model_max_length, truncation, no mask, ``pooler_output``) and ``_get_t5_prompt_embeds``
  (max_length padding to ``max_sequence_length``, truncation, no mask, last hidden state)."""
  family = "flux1"
  pooled_kind = "clip_l pooler_output"

  def __init__(self, path, *, device="cpu", dtype="float32", max_sequence_length=512):
    import torch
    import transformers
    self.torch = torch
    path = os.fspath(path)
    self.device, self.dtype = torch.device(device), getattr(torch, dtype)
    self.max_sequence_length = int(max_sequence_length)
    load = dict(local_files_only=True)
    sub = lambda name: _subdir(path, name, "FLUX.1")  # noqa: E731
    self.tokenizer = transformers.CLIPTokenizer.from_pretrained(sub("tokenizer"), **load)
    self.clip = transformers.CLIPTextModel.from_pretrained(sub("text_encoder"), dtype=self.dtype, **load)
    self.clip = self.clip.to(self.device).eval()
    self.tokenizer_2 = transformers.T5TokenizerFast.from_pretrained(sub("tokenizer_2"), **load)
    self.t5 = transformers.T5EncoderModel.from_pretrained(sub("text_encoder_2"), dtype=self.dtype, **load)
    self.t5 = self.t5.to(self.device).eval()
    self.tokenizer_max_length = self.tokenizer.model_max_length
    self.seq_len, self.embed_dim = self.max_sequence_length, self.t5.config.d_model
    self.pooled_dim = self.clip.config.hidden_size
    self.source = os.path.abspath(path)

  def encode(self, prompts: Sequence[str]):
    """-> (prompt_embeds (B, max_sequence_length, T5 width), pooled (B, CLIP width)), float32 numpy."""
    torch = self.torch
    prompts = list(prompts)
    with torch.no_grad():
      ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer_max_length, truncation=True,
                           return_tensors="pt").input_ids
      pooled = self.clip(ids.to(self.device), output_hidden_states=False).pooler_output
      ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                             return_tensors="pt").input_ids
      embeds = self.t5(ids.to(self.device), output_hidden_states=False)[0]
    return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

  def metadata(self):
    return {"source": self.source, "max_sequence_length": self.max_sequence_length,
            "tokenizer_max_length": self.tokenizer_max_length,
            "encoder_dtype": str(self.dtype).replace("torch.", ""),
            "reference": "diffusers FluxPipeline.encode_prompt (prompt_2 = prompt)"}


class Flux2TextEncoder:
  """FLUX.2-klein's Qwen3 encoder from a local pipeline dir; :meth:`encode` is diffusers
  ``Flux2KleinPipeline.encode_prompt`` / ``_get_qwen3_prompt_embeds``: per prompt ``apply_chat_template([{user:
  prompt}], add_generation_prompt=True, enable_thinking=False)``, max_length padding + truncation to
  ``max_sequence_length``, forward with the attention mask, hidden_states at ``hidden_states_layers`` stacked and
  flattened per token to (L, len(layers) * hidden_size). The base ``Qwen3Model`` (``.model``) is run, skipping
  the unused LM head; its hidden states are the ones ``Qwen3ForCausalLM`` returns."""
  family = "flux2"
  pooled_kind = "none"

  def __init__(self, path, *, device="cpu", dtype="float32", max_sequence_length=512,
               hidden_states_layers: Sequence[int] = (9, 18, 27)):
    import torch
    import transformers
    self.torch = torch
    path = os.fspath(path)
    self.device, self.dtype = torch.device(device), getattr(torch, dtype)
    self.max_sequence_length = int(max_sequence_length)
    self.hidden_states_layers = tuple(int(k) for k in hidden_states_layers)
    load = dict(local_files_only=True)
    sub = lambda name: _subdir(path, name, "FLUX.2-klein")  # noqa: E731
    model_type = _model_type(sub("text_encoder"), "")
    if model_type != "qwen3":
      raise ValueError(f"{path}: text_encoder model_type {model_type!r}; only FLUX.2-klein's qwen3 "
                                f"(Qwen3ForCausalLM) is supported")
    self.tokenizer = transformers.Qwen2TokenizerFast.from_pretrained(sub("tokenizer"), **load)
    lm = transformers.Qwen3ForCausalLM.from_pretrained(sub("text_encoder"), dtype=self.dtype, **load)
    self.model = lm.model.to(self.device).eval()
    n = self.model.config.num_hidden_layers
    if not self.hidden_states_layers or not all(-(n + 1) <= k <= n for k in self.hidden_states_layers):
      raise ValueError(f"hidden_states_layers {self.hidden_states_layers} out of range for {n} layers")
    self.seq_len = self.max_sequence_length
    self.embed_dim = len(self.hidden_states_layers) * self.model.config.hidden_size
    self.pooled_dim = 0
    self.source = os.path.abspath(path)

  def _input_ids(self, prompts):
    texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True, enable_thinking=False) for p in prompts]
    return self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                          max_length=self.max_sequence_length)

  def encode(self, prompts: Sequence[str]):
    """-> (prompt_embeds (B, max_sequence_length, 3 * hidden_size), pooled (B, 0)), float32 numpy."""
    torch = self.torch
    prompts = list(prompts)
    with torch.no_grad():
      tok = self._input_ids(prompts)
      out = self.model(input_ids=tok["input_ids"].to(self.device),
                       attention_mask=tok["attention_mask"].to(self.device), output_hidden_states=True,
                       use_cache=False)
      embeds = torch.cat([out.hidden_states[k] for k in self.hidden_states_layers], dim=-1)  # = stack+permute
    return embeds.float().cpu().numpy(), np.zeros((len(prompts), 0), np.float32)

  def metadata(self):
    return {"source": self.source, "max_sequence_length": self.max_sequence_length,
            "hidden_states_layers": list(self.hidden_states_layers),
            "encoder_dtype": str(self.dtype).replace("torch.", ""),
            "reference": "diffusers Flux2KleinPipeline.encode_prompt"}


ENCODERS = {"sd3": SD3TextEncoder, "flux1": FluxTextEncoder, "flux2": Flux2TextEncoder}


def encoding_metadata(encoder) -> dict:
  """The dataset-level metadata of ``encoder``'s embeddings (its settings, family, pooled kind)."""
  return dict(encoder.metadata(), family=encoder.family, pooled=encoder.pooled_kind)


def existing_dataset(out) -> Optional[dict]:
  """``text_embeddings.describe(out)`` when ``out`` holds a text-embedding dataset, None when it holds none.
  ValueError when ``out`` itself is another kind of dataset (e.g. a prompt set): nothing is written into it."""
  if not os.path.isdir(out):
    return None
  try:
    return text_embeddings.describe(out)
  except text_embeddings.NotTextEmbeddingsError as e:
    if os.path.isfile(os.path.join(out, "dataset_info.json")):
      raise ValueError(f"OUT {e}; choose another OUT") from e
    return None


def encode_to_dataset(encoder, prompts: Sequence[str], out, *, batch_size=16, split="train", log_every=0,
                      prompts_source: Optional[str] = None) -> str:
  """Encodes ``prompts`` in batches (lazily, as the writer consumes them) into ``out`` and returns the dataset
  dir: a new dataset, or, when ``out`` already holds one, a new split of it (``text_embeddings.add_split``: the
  shapes and encoder settings must match, checked before the first batch is encoded)."""
  t0 = time.perf_counter()

  def examples():
    for s in range(0, len(prompts), batch_size):
      batch = list(prompts[s:s + batch_size])
      embeds, pooled = encoder.encode(batch)
      for p, e, q in zip(batch, embeds, pooled):
        yield {"prompt": p, "prompt_embeds": e, "pooled": q}
      if log_every and (s // batch_size) % log_every == 0:
        print(f"[encode_prompts] {split}: {min(s + batch_size, len(prompts))}/{len(prompts)} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

  meta = encoding_metadata(encoder)
  split_meta = {"num_prompts": len(prompts), "prompts_source": prompts_source and os.path.abspath(prompts_source),
                "source": encoder.source, "encoder_dtype": meta.get("encoder_dtype")}
  shapes = dict(seq_len=encoder.seq_len, embed_dim=encoder.embed_dim, pooled_dim=encoder.pooled_dim)
  if existing_dataset(out) is not None:
    return text_embeddings.add_split(out, examples(), split=split, metadata=meta, split_metadata=split_meta, **shapes)
  return text_embeddings.write_text_embeddings(
      out, examples(), split=split, metadata=dict(meta, num_prompts=len(prompts)), split_metadata=split_meta,
      description=f"{FAMILY_NAMES[encoder.family]} prompt embeddings (normguard_jax.data.encode_prompts)", **shapes)


def _load_encoder(args, family, max_sequence_length):
  common = dict(device=args.device, dtype=args.dtype, max_sequence_length=max_sequence_length)
  if family == "sd3":
    return SD3TextEncoder(args.pipeline_dir, clip_skip=args.clip_skip, use_t5=not args.no_t5,
                          joint_attention_dim=args.joint_attention_dim, **common)
  if family == "flux1":
    return FluxTextEncoder(args.pipeline_dir, **common)
  layers = args.text_encoder_out_layers
  layers = (9, 18, 27) if layers is None else [int(k) for k in layers.split(",") if k.strip()]
  return Flux2TextEncoder(args.pipeline_dir, hidden_states_layers=layers, **common)


def _prepare(args, family):
  """Everything that can fail before encoding: the split name, the prompts, OUT, the encoders and their fit to
  the dataset already in OUT. -> (encoder, prompts)."""
  text_embeddings.check_split_name(args.split)
  prompts = read_prompts(args.prompts, args.prompts_split)
  max_len = args.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH[family]
  existing = existing_dataset(args.out)
  if existing is not None:  # cheap checks first: the encoders of a real snapshot take a while to load
    text_embeddings.check_compatible(args.out, metadata={"family": family, "max_sequence_length": max_len},
                                     split=args.split)
  enc = _load_encoder(args, family, max_len)
  if existing is not None:
    text_embeddings.check_compatible(args.out, seq_len=enc.seq_len, embed_dim=enc.embed_dim,
                                     pooled_dim=enc.pooled_dim, metadata=encoding_metadata(enc), split=args.split)
    old = existing["metadata"]
    for k, what in (("source", "snapshot"), ("encoder_dtype", "encoder dtype")):
      if k in old and old[k] != enc.metadata().get(k):
        print(f"[encode_prompts] note: the existing splits were encoded with {what} {old[k]!r}, split "
              f"{args.split!r} with {enc.metadata().get(k)!r} (same family, shapes and settings)", file=sys.stderr)
    print(f"[encode_prompts] adding split {args.split!r} ({len(prompts)} prompts) to {existing['dataset_dir']} "
          f"(existing splits {existing['splits']})", file=sys.stderr)
  return enc, prompts


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.data.encode_prompts", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("pipeline_dir", help="local diffusers SD3 / FLUX.1 / FLUX.2-klein pipeline dir (text encoders + "
                 "tokenizers)")
  p.add_argument("prompts", help="text file (one prompt a line), JSONL with a 'prompt' field, or a prompt-set "
                 "dataset dir (python -m normguard_jax.data.prompts)")
  p.add_argument("out", help="output data_dir (gets text_embeddings/1.0.0)")
  p.add_argument("--family", choices=sorted(ENCODERS), default=None,
                 help="model family (default: from model_index.json _class_name)")
  p.add_argument("--prompts-split", default=None, help="split of a prompt-set PROMPTS dir (default: its only one)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-sequence-length", type=int, default=None,
                 help="T5 / Qwen3 tokens (diffusers defaults: 256 for sd3, 512 for flux1 and flux2)")
  p.add_argument("--clip-skip", type=int, default=None, help="sd3 only")
  p.add_argument("--device", default="cpu")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                 help="encoder compute dtype (stored embeddings are float32 regardless)")
  p.add_argument("--split", default="train",
                 help="split to write; when OUT already holds a dataset it is added to it (e.g. test, negative)")
  p.add_argument("--no-t5", action="store_true", help="sd3 only: zeros for the T5 part (needs --joint-attention-dim)")
  p.add_argument("--joint-attention-dim", type=int, default=None, help="sd3 only, with --no-t5")
  p.add_argument("--text-encoder-out-layers", default=None,
                 help="flux2 only: comma-separated Qwen3 hidden-state indices (diffusers default 9,18,27)")
  args = p.parse_args(argv)

  def fail(e):
    print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
    raise SystemExit(2) from e

  try:
    if not os.path.isdir(args.pipeline_dir):
      raise FileNotFoundError(f"PIPELINE_DIR {args.pipeline_dir}: not a directory (expected a local diffusers "
                              f"SD3 / FLUX.1 / FLUX.2-klein pipeline snapshot)")
    family = args.family or detect_family(args.pipeline_dir)
  except (FileNotFoundError, ValueError) as e:
    fail(e)
  sd3_only = [f for f, v in (("--clip-skip", args.clip_skip is not None), ("--no-t5", args.no_t5),
                             ("--joint-attention-dim", args.joint_attention_dim is not None)) if v]
  if family != "sd3" and sd3_only:
    p.error(f"{', '.join(sd3_only)}: sd3 only (family {family})")
  if family != "flux2" and args.text_encoder_out_layers is not None:
    p.error(f"--text-encoder-out-layers: flux2 only (family {family})")
  try:
    enc, prompts = _prepare(args, family)
  except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
    fail(e)
  out = encode_to_dataset(enc, prompts, args.out, batch_size=args.batch_size, split=args.split, log_every=10,
                          prompts_source=None if os.path.isdir(args.prompts) else args.prompts)
  print(json.dumps({"out": out, "family": enc.family, "split": args.split, "num_prompts": len(prompts),
                    "prompt_embeds": [enc.seq_len, enc.embed_dim], "pooled": [enc.pooled_dim]}))
  return out


cli = command.installed(main)


if __name__ == "__main__":
  sys.exit(cli(sys.argv[1:]))
