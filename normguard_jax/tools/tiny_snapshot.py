"""Tiny random diffusers pipelines (SD3.5, FLUX.1-dev, FLUX.2-klein) and a tiny PickScore, for dry runs and tests.

  python -m normguard_jax.tools.tiny_snapshot OUT [--family sd35|flux1|flux2-klein] [--seed N] [--pickscore DIR]

OUT receives a complete diffusers pipeline directory, written by the pipeline's own ``save_pretrained``:
``model_index.json``, ``scheduler/``, ``transformer/``, ``vae/``, the text encoders and their tokenizers, plus
``tiny_snapshot.json`` (what was built). It loads with ``StableDiffusion3Pipeline`` / ``FluxPipeline`` /
``Flux2KleinPipeline.from_pretrained(OUT)``, converts with our strict converters (``normguard_jax.convert``:
sd3 / flux / vae) and encodes prompts with ``python -m normguard_jax.data.encode_prompts OUT PROMPTS EMB``.
Every weight is random: the images are noise, but every shape, file and code path is the real one.

- ``sd35``: ``SD3Transformer2DModel`` with SD3.5's qk RMSNorm and dual attention (blocks 0-1), ``AutoencoderKL``
  (16 latent channels, SD3's scaling / shift factors, no quant convs), CLIP-L + CLIP-G
  (``CLIPTextModelWithProjection``) and T5 (``T5EncoderModel``) with their tokenizers, the shift-3 scheduler.
- ``flux1``: ``FluxTransformer2DModel`` with the guidance embedding (FLUX.1-dev), ``AutoencoderKL`` (4 latent
  channels: in_channels 16 = 4 x 2x2 packing), CLIP-L (``CLIPTextModel``) + T5, the dynamic-shift scheduler.
- ``flux2-klein``: ``Flux2Transformer2DModel`` (no guidance embedding: klein-base), ``AutoencoderKLFlux2`` (4
  latent channels, random BatchNorm running stats), a 28-layer Qwen3 (``Qwen3ForCausalLM``, so that diffusers'
  default hidden states 9 / 18 / 27 exist) with a chat-template tokenizer.

Sizes: transformers of 2-4 blocks of width 16-32, a 2-level VAE (downsampling 2): any resolution that is a multiple
of 4 works, e.g. 16x16 or 32x32 pixels (SD3.5: at most 64, ``pos_embed_max_size`` 16 patches). The text
dimensions match the transformers' (``joint_attention_dim``, ``pooled_projection_dim``) with diffusers' default
sequence lengths (CLIP 77, T5 256 / 512, Qwen 512), so the defaults of ``encode_prompts`` fit.

Tokenizers are built here, offline (nothing is downloaded): CLIP's byte-level BPE over all 256 byte symbols (plus
their ``</w>`` forms and a few merges; ``<|endoftext|>`` the largest id, as in CLIP), a T5 unigram vocabulary over
printable ASCII, a byte-level BPE with Qwen's special tokens and Qwen3's chat template. Any prompt tokenizes.

``--pickscore DIR`` also writes a tiny PickScore: a transformers ``CLIPModel`` (32x32 images) with its tokenizer
and ``preprocessor_config.json`` in the same DIR, which the ``pickscore`` reward loads with ``model_dir=DIR``
(``processor_dir`` defaults to it).

The builders are public (:func:`clip_tokenizer`, :func:`t5_tokenizer`, :func:`qwen_tokenizer`,
:func:`pipeline`, :func:`build`, :func:`build_pickscore`): the tests use them, so the user's path is the tested one.
Needs torch, transformers and diffusers (``requirements-encode.txt``).
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from normguard_jax.tools import command

FAMILIES = ("sd35", "flux1", "flux2-klein")
PIPELINE_CLASS = {"sd35": "StableDiffusion3Pipeline", "flux1": "FluxPipeline", "flux2-klein": "Flux2KleinPipeline"}
CLIP_MAX_LENGTH = 77  # CLIP tokenizer.model_max_length (diffusers' tokenizer_max_length)

# Text encoders: widths chosen so that the transformers below take their outputs unchanged.
SD35_CLIP_L = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, projection_dim=8,
                   hidden_act="quick_gelu")
SD35_CLIP_G = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, projection_dim=12,
                   hidden_act="gelu")
SD35_T5 = dict(d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
               feed_forward_proj="gated-gelu")
FLUX1_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=8,
                  hidden_act="quick_gelu")
FLUX1_T5 = dict(SD35_T5, d_model=24)
KLEIN_QWEN3 = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
                   initializer_range=0.2)

# Transformers. SD3.5: tests/test_mmdit_parity.py SD35_TINY with the text widths above (T5 48, pooled 8 + 12).
SD35_TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8,
                        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16,
                        pooled_projection_dim=20, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
                        dual_attention_layers=(0, 1))
# FLUX.1-dev: tests/test_flux_parity.py _F1 with guidance, T5 24 wide, CLIP-L pooled 16.
FLUX1_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
                         guidance_embeds=True, axes_dims_rope=(4, 6, 6))
# FLUX.2-klein: tests/test_flux_parity.py _F2 with joint_attention_dim = 3 Qwen3 layers x 16.
KLEIN_TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
                         axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)

_VAE_BLOCKS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                   norm_num_groups=4, sample_size=32)
SD35_VAE = dict(_VAE_BLOCKS, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)
FLUX1_VAE = dict(_VAE_BLOCKS, latent_channels=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False)
KLEIN_VAE = dict(_VAE_BLOCKS, latent_channels=4, batch_norm_eps=1e-4)

SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)

# PickScore (a CLIP-H/14 in reality): tests/test_clip_parity.py's tiny CLIPModel.
PICKSCORE_IMAGE_SIZE = 32
PICKSCORE_TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="gelu")
PICKSCORE_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                        image_size=PICKSCORE_IMAGE_SIZE, patch_size=8, hidden_act="gelu")
PICKSCORE_PROJECTION_DIM = 16
PICKSCORE_LOGIT_SCALE = 100.0  # exp(logit_scale) of the released PickScore_v1

CLIP_MERGES = (("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("a", "n"),
               ("an", "d</w>"), ("o", "f</w>"))


# ------------------------------------------------------------------------------------------------ tokenizers


def clip_vocab():
  """CLIP's byte-level BPE vocabulary in miniature: the 256 byte symbols, their ``</w>`` forms, the merges, then
  ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id, as in CLIP). Returns (vocab, merges)."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  syms = list(bytes_to_unicode().values())
  vocab = {}
  for tok in syms + [s + "</w>" for s in syms] + [a + b for a, b in CLIP_MERGES] + ["<|startoftext|>",
                                                                                     "<|endoftext|>"]:
    vocab.setdefault(tok, len(vocab))
  return vocab, [tuple(m) for m in CLIP_MERGES]


def clip_tokenizer(model_max_length=CLIP_MAX_LENGTH):
  """A ``CLIPTokenizer`` (lower-cased byte-level BPE, BOS/EOS, pad = EOS) over :func:`clip_vocab`."""
  import transformers
  vocab, merges = clip_vocab()
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer():
  """A T5 unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, metaspace) over printable ASCII and a few
  whole words; no sentinel tokens."""
  import string
  import transformers
  chars = [c for c in string.printable if not c.isspace()]
  pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
            + [("\u2581" + w, -1.0) for w in ("the", "cat", "dog", "a", "of", "and")])
  return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


# Qwen3's chat template, reduced to what Flux2KleinPipeline uses (user turns, generation prompt, thinking off)
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")


def qwen_tokenizer():
  """A byte-level BPE ``Qwen2Tokenizer`` (all 256 byte symbols, a few merges) with Qwen's special tokens
  (pad ``<|endoftext|>``, eos ``<|im_end|>``) and :data:`QWEN3_CHAT_TEMPLATE`."""
  import transformers
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  vocab = {}
  for tok in list(bytes_to_unicode().values()) + ["th", "the", "\u0120c", "\u0120ca", "\u0120cat", "\u010a\u010a"]:
    vocab.setdefault(tok, len(vocab))
  merges = [tuple(m.split()) for m in ("t h", "th e", "\u0120 c", "\u0120c a", "\u0120ca t", "\u010a \u010a")]
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
  tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                                    pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
  tok.add_special_tokens({"additional_special_tokens": specials[1:]})
  tok.chat_template = QWEN3_CHAT_TEMPLATE
  return tok


# ------------------------------------------------------------------------------------------------ models


def randomize(model, seed=0):
  """Every parameter random: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2), biases ~ N(0, 0.2).
  (diffusers zero-initialises the adaLN-zero and output layers: such a model's velocity would be 0.)"""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim >= 2:
        p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model.eval()


def _seeded(seed):
  import torch
  torch.manual_seed(seed)


def clip_text_encoder(tokenizer, spec, *, with_projection, seed):
  """A ``CLIPTextModel[WithProjection]`` of ``spec``'s size for ``tokenizer`` (transformers' own random init)."""
  import transformers
  cfg = transformers.CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                                    eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                    pad_token_id=tokenizer.pad_token_id, **spec)
  _seeded(seed)
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  return cls(cfg).eval()


def t5_encoder(tokenizer, spec, *, seed):
  import transformers
  _seeded(seed)
  return transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(tokenizer), **spec)).eval()


def qwen3_encoder(tokenizer, spec, *, seed):
  import transformers
  _seeded(seed)
  cfg = transformers.Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **spec)
  return transformers.Qwen3ForCausalLM(cfg).eval()


def _flux2_vae(seed):
  import diffusers
  import torch
  vae = randomize(diffusers.AutoencoderKLFlux2(**KLEIN_VAE), seed=seed)
  with torch.no_grad():  # non-trivial running stats, so that the pipelines' de-normalisation matters
    g = torch.Generator().manual_seed(seed + 1)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features, generator=g))
    vae.bn.running_var.copy_(0.1 + 3 * torch.rand(vae.bn.num_features, generator=g))
    vae.bn.num_batches_tracked.fill_(1000)
  return vae


def pipeline(family: str, seed: int = 0):
  """The tiny random diffusers pipeline object of ``family`` (one of :data:`FAMILIES`), in memory."""
  import diffusers
  if family not in FAMILIES:
    raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
  if family == "sd35":
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    return diffusers.StableDiffusion3Pipeline(
        transformer=randomize(diffusers.SD3Transformer2DModel(**SD35_TRANSFORMER), seed=seed),
        vae=randomize(diffusers.AutoencoderKL(**SD35_VAE), seed=seed + 1),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER),
        text_encoder=clip_text_encoder(clip, SD35_CLIP_L, with_projection=True, seed=seed + 2), tokenizer=clip,
        text_encoder_2=clip_text_encoder(clip, SD35_CLIP_G, with_projection=True, seed=seed + 3), tokenizer_2=clip,
        text_encoder_3=t5_encoder(t5, SD35_T5, seed=seed + 4), tokenizer_3=t5)
  if family == "flux1":
    clip = clip_tokenizer()
    t5 = t5_tokenizer()
    return diffusers.FluxPipeline(
        transformer=randomize(diffusers.FluxTransformer2DModel(**FLUX1_TRANSFORMER), seed=seed),
        vae=randomize(diffusers.AutoencoderKL(**FLUX1_VAE), seed=seed + 1),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        text_encoder=clip_text_encoder(clip, FLUX1_CLIP, with_projection=False, seed=seed + 2), tokenizer=clip,
        text_encoder_2=t5_encoder(t5, FLUX1_T5, seed=seed + 4), tokenizer_2=t5)
  qwen = qwen_tokenizer()
  return diffusers.Flux2KleinPipeline(
      transformer=randomize(diffusers.Flux2Transformer2DModel(**KLEIN_TRANSFORMER), seed=seed),
      vae=_flux2_vae(seed + 1), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
      text_encoder=qwen3_encoder(qwen, KLEIN_QWEN3, seed=seed + 2), tokenizer=qwen, is_distilled=False)


def _fresh_target(out):
  """``out`` as an absolute path; refuses a non-empty existing directory (or a file)."""
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"{out}: exists and is not an empty directory; choose a new OUT")
  return out


def _write_atomically(out, write):
  """``write(tmp_dir)`` into a hidden temp dir beside ``out``, then renamed to ``out``: nothing partial is left."""
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    write(tmp)
    if os.path.isdir(out):
      os.rmdir(out)  # empty, checked by _fresh_target
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def build(out, family: str = "sd35", seed: int = 0) -> str:
  """Writes the tiny ``family`` pipeline to ``out`` (a new or empty dir) with ``save_pretrained``; returns ``out``."""
  out = _fresh_target(out)
  pipe = pipeline(family, seed)

  def write(tmp):
    pipe.save_pretrained(tmp, safe_serialization=True)
    info = {"family": family, "pipeline": PIPELINE_CLASS[family], "seed": seed, "random_weights": True,
            "built_by": "python -m normguard_jax.tools.tiny_snapshot",
            "transformer": dict(pipe.transformer.config), "vae": dict(pipe.vae.config)}
    with open(os.path.join(tmp, "tiny_snapshot.json"), "w", encoding="utf-8") as f:
      json.dump(info, f, indent=2, default=list)

  return _write_atomically(out, write)


def pickscore_model(seed: int = 0):
  """(CLIPModel, CLIPTokenizer, image processor) of the tiny PickScore."""
  import torch
  import transformers
  tok = clip_tokenizer()
  cfg = transformers.CLIPConfig(
      text_config=dict(PICKSCORE_TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
      vision_config=PICKSCORE_VISION, projection_dim=PICKSCORE_PROJECTION_DIM)
  model = randomize(transformers.CLIPModel(cfg), seed=seed)
  with torch.no_grad():
    model.logit_scale.fill_(math.log(PICKSCORE_LOGIT_SCALE))
  size = PICKSCORE_IMAGE_SIZE
  try:  # transformers 5 without torchvision: the PIL image processor (same preprocessor_config.json fields)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
  except ImportError:
    Processor = transformers.CLIPImageProcessor
  proc = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  return model, tok, proc


def build_pickscore(out, seed: int = 0) -> str:
  """Writes a tiny PickScore to ``out``: ``CLIPModel`` (model.safetensors + config.json), the tokenizer files and
  ``preprocessor_config.json``, all in one dir (the reward's ``model_dir``; ``processor_dir`` may be the same)."""
  out = _fresh_target(out)
  model, tok, proc = pickscore_model(seed)

  def write(tmp):
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    proc.save_pretrained(tmp)

  return _write_atomically(out, write)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.tools.tiny_snapshot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out", help="new (or empty) directory for the diffusers pipeline")
  p.add_argument("--family", choices=FAMILIES, default="sd35")
  p.add_argument("--seed", type=int, default=0, help="seed of every random weight")
  p.add_argument("--pickscore", metavar="DIR", default=None,
                 help="also write a tiny PickScore (CLIPModel + tokenizer + preprocessor_config.json) to DIR")
  args = p.parse_args(argv)
  t0 = time.perf_counter()
  try:
    if args.pickscore is not None:
      _fresh_target(args.pickscore)  # both targets checked before anything is written
    out = build(args.out, args.family, args.seed)
    result = {"out": out, "family": args.family, "pipeline": PIPELINE_CLASS[args.family]}
    if args.pickscore is not None:
      result["pickscore"] = build_pickscore(args.pickscore, args.seed)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  result["seconds"] = round(time.perf_counter() - t0, 2)
  print(json.dumps(result))
  return result


cli = command.installed(main)


if __name__ == "__main__":
  sys.exit(cli(sys.argv[1:]))
