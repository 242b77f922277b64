"""Offline SD3 prompt encoding with the real text encoders (transformers, PyTorch), cached as a tfds dataset.

  python -m normguard_jax.data.encode_prompts PIPELINE_DIR PROMPTS OUT [--batch-size 16]
      [--max-sequence-length 256] [--clip-skip N] [--device cuda] [--dtype float16] [--split train]

PIPELINE_DIR is a LOCAL diffusers SD3 pipeline layout: text_encoder, text_encoder_2
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
"""

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

import numpy as np

from normguard_jax.data import text_embeddings


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


def encode_to_dataset(encoder: SD3TextEncoder, prompts: Sequence[str], out, *, batch_size=16, split="train",
                      log_every=0) -> str:
  """Encodes ``prompts`` in batches (lazily, as the writer consumes them) into ``out``; returns the dataset dir."""
  t0 = time.perf_counter()

  def examples():
    for s in range(0, len(prompts), batch_size):
      batch = list(prompts[s:s + batch_size])
      embeds, pooled = encoder.encode(batch)
      for p, e, q in zip(batch, embeds, pooled):
        yield {"prompt": p, "prompt_embeds": e, "pooled": q}
      if log_every and (s // batch_size) % log_every == 0:
        print(f"[encode_prompts] {min(s + batch_size, len(prompts))}/{len(prompts)} "
              f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)

  meta = dict(encoder.metadata(), num_prompts=len(prompts))
  return text_embeddings.write_text_embeddings(
      out, examples(), seq_len=encoder.seq_len, embed_dim=encoder.embed_dim, pooled_dim=encoder.pooled_dim,
      split=split, metadata=meta, description="SD3 prompt embeddings (normguard_jax.data.encode_prompts)")


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.data.encode_prompts", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("pipeline_dir", help="local diffusers SD3 pipeline dir (text encoders + tokenizers)")
  p.add_argument("prompts", help="text file (one prompt a line), JSONL with a 'prompt' field, or a prompt-set "
                 "dataset dir (python -m normguard_jax.data.prompts)")
  p.add_argument("out", help="output data_dir (gets text_embeddings/1.0.0)")
  p.add_argument("--prompts-split", default=None, help="split of a prompt-set PROMPTS dir (default: its only one)")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (diffusers default 256)")
  p.add_argument("--clip-skip", type=int, default=None)
  p.add_argument("--device", default="cpu")
  p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                 help="encoder compute dtype (stored embeddings are float32 regardless)")
  p.add_argument("--split", default="train")
  p.add_argument("--no-t5", action="store_true", help="zeros for the T5 part (needs --joint-attention-dim)")
  p.add_argument("--joint-attention-dim", type=int, default=None)
  args = p.parse_args(argv)
  prompts = read_prompts(args.prompts, args.prompts_split)
  enc = SD3TextEncoder(args.pipeline_dir, device=args.device, dtype=args.dtype,
                       max_sequence_length=args.max_sequence_length, clip_skip=args.clip_skip,
                       use_t5=not args.no_t5, joint_attention_dim=args.joint_attention_dim)
  out = encode_to_dataset(enc, prompts, args.out, batch_size=args.batch_size, split=args.split, log_every=10)
  print(json.dumps({"out": out, "num_prompts": len(prompts), "prompt_embeds": [enc.seq_len, enc.embed_dim],
                    "pooled": [enc.pooled_dim]}))
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
