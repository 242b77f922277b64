"""CLIP-family rewards in JAX: PickScore, CLIP score and the LAION aesthetic predictor.

Builders (``builder(options) -> reward``, see rewards/api.py); register them as
``"normguard_jax.rewards.clip_rewards:build_pickscore"``, ``...:build_clip_score``, ``...:build_aesthetic``.

- **PickScore** (Flow-Factory ``rewards/pick_score.py``): ``logit_scale.exp() * cos(text, image) / 26`` with the
  PickScore_v1 CLIPModel (ViT-H/14) and the processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
- **CLIP score** (Flow-Factory ``rewards/clip.py``): ``scale * cos(text, image)``, ``scale`` = 1 by default as
  there (torchmetrics' CLIPScore would be ``scale=100`` with ``clamp_min=0``).
- **Aesthetic** (christophschuhmann/improved-aesthetic-predictor ``simple_inference.py``): an MLP on the
  L2-normalised CLIP ViT-L/14 image embedding (a zero embedding is left as is). See :func:`load_aesthetic_head`.

Images are preprocessed in JAX as ``CLIPImageProcessor`` does on uint8 PIL images (the input Flow-Factory
feeds it), from ``preprocessor_config.json``: [-1, 1] -> [0, 1] (clipped), resize (shortest edge to
``size``; bicubic Keys a=-0.5 with the kernel widened by the downscale factor, i.e. PIL's antialiased
resampling, via ``jax.image.resize``; horizontal then vertical pass, each clamped to [0, 1] as PIL's uint8
passes are), center crop (top = (h - crop_h) // 2), (x - mean) / std.
Known difference: PIL rounds to uint8 after each of its two passes (and uses 22-bit fixed-point weights); we
stay in float32 and do not round (rounding would zero the gradient). That is at most about one uint8 level in
all, ~0.015 in normalised units (1/255/std). ``preprocess(..., quantize=True)`` rounds as PIL does and then
matches it exactly on >99% of pixels (the rest: one level, from rounding ties); tests/test_clip_parity.py.

Prompts are tokenised on the host with the HF ``tokenizers`` package from the processor's ``tokenizer.json``
(or, failing that, ``vocab.json`` + ``merges.txt`` with CLIPTokenizer's normaliser / pre-tokeniser), then
truncated and padded to 77 as ``CLIPTokenizer(padding="max_length", max_length=77, truncation=True)``.
Both towers and the preprocessing run as one jitted program (:func:`embed_pair`; params are arguments, not
constants), the score from the embeddings as a second, tiny one.
"""

import dataclasses
import functools
import json
import os
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.convert import clip as convert_clip
from normguard_jax.convert.safetensors_io import ConversionError, Entry, Checkpoint, SafetensorsFile, apply_key_map
from normguard_jax.models import clip

PICKSCORE_DIVISOR = 26.0  # Flow-Factory: "norm to 0-1"
_RESAMPLE = {2: "linear", 3: "cubic"}  # PIL BILINEAR / BICUBIC -> jax.image (both antialiased when shrinking)

# ----------------------------------------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What ``preprocessor_config.json`` says; hashable (a static argument of the jitted score)."""
  do_resize: bool = True
  shortest_edge: Optional[int] = 224       # resize the shortest edge to this ...
  resize_hw: Optional[Tuple[int, int]] = None  # ... or to exactly (h, w)
  resample: int = 3
  do_center_crop: bool = True
  crop_hw: Tuple[int, int] = (224, 224)
  do_normalize: bool = True
  mean: Tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  std: Tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)


def _hw(value, what):
  if isinstance(value, int):
    return (value, value)
  if isinstance(value, dict) and "height" in value and "width" in value:
    return (int(value["height"]), int(value["width"]))
  raise ValueError(f"unsupported {what} {value!r}")


def load_image_spec(processor_dir) -> ImageSpec:
  """Reads ``<processor_dir>/preprocessor_config.json`` (both the legacy int form and the dict form)."""
  path = os.path.join(os.fspath(processor_dir), "preprocessor_config.json")
  try:
    with open(path) as f:
      c = json.load(f)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{processor_dir}: no preprocessor_config.json (pass processor_dir=, e.g. a "
                            f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K snapshot)") from e
  if not c.get("do_rescale", True) or abs(float(c.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
    raise ValueError(f"{path}: only do_rescale=true with rescale_factor=1/255 is supported")
  resample = int(c.get("resample", 3))
  if resample not in _RESAMPLE:
    raise ValueError(f"{path}: resample={resample} unsupported (2 bilinear or 3 bicubic)")
  size = c.get("size", 224)
  shortest, resize_hw = None, None
  if isinstance(size, int):
    shortest = size
  elif isinstance(size, dict) and "shortest_edge" in size and not size.get("longest_edge"):
    shortest = int(size["shortest_edge"])
  else:
    resize_hw = _hw(size, f"{path}: size")
  mean, std = c.get("image_mean", ImageSpec.mean), c.get("image_std", ImageSpec.std)
  mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
  std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
  return ImageSpec(do_resize=bool(c.get("do_resize", True)), shortest_edge=shortest, resize_hw=resize_hw,
                   resample=resample, do_center_crop=bool(c.get("do_center_crop", True)),
                   crop_hw=_hw(c.get("crop_size", 224), f"{path}: crop_size"),
                   do_normalize=bool(c.get("do_normalize", True)), mean=mean, std=std)


def resized_hw(h, w, spec: ImageSpec):
  """Output size of the resize step (transformers ``get_resize_output_image_size``, default_to_square=False)."""
  if not spec.do_resize:
    return h, w
  if spec.resize_hw is not None:
    return spec.resize_hw
  s = spec.shortest_edge
  return (int(s * h / w), s) if w <= h else (s, int(s * w / h))


def preprocess(images, spec: ImageSpec, *, quantize=False):
  """(B, H, W, C) images in [-1, 1] -> CLIP pixel values (B, crop_h, crop_w, 3), float32 NHWC.

  ``quantize``: also round to uint8 levels at the input and after each resize pass, as PIL does on uint8
  images (exact reference reproduction for evaluation; its gradient is zero, so never for training).
  """
  x = jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
  q = (lambda a: jnp.round(a * 255.0) / 255.0) if quantize else (lambda a: a)
  x = q(x)
  b, h, w, c = x.shape
  if c == 1:
    x = jnp.broadcast_to(x, (b, h, w, 3))
  elif c != 3:
    raise ValueError(f"images must have 1 or 3 channels, got shape {x.shape}")
  nh, nw = resized_hw(h, w, spec)
  # PIL order: horizontal pass, then vertical; each pass writes uint8, so cubic overshoot is clamped to the
  # range after each (we clamp; rounding only with ``quantize``).
  method = _RESAMPLE[spec.resample]
  if nw != w:
    x = q(jnp.clip(jax.image.resize(x, (b, h, nw, 3), method=method, antialias=True,
                                    precision=jax.lax.Precision.HIGHEST), 0.0, 1.0))
  if nh != h:
    x = q(jnp.clip(jax.image.resize(x, (b, nh, nw, 3), method=method, antialias=True,
                                    precision=jax.lax.Precision.HIGHEST), 0.0, 1.0))
  if spec.do_center_crop:
    ch, cw = spec.crop_hw
    if ch > nh or cw > nw:
      raise ValueError(f"center crop {spec.crop_hw} is larger than the resized image {(nh, nw)}")
    top, left = (nh - ch) // 2, (nw - cw) // 2
    x = x[:, top:top + ch, left:left + cw]
  if spec.do_normalize:
    x = (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)
  return x


# ----------------------------------------------------------------------------------------------- text

_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_name(value):
  return value.get("content") if isinstance(value, dict) else value


def _read_json(path):
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


class ClipTokenizer:
  """Host tokeniser: prompts -> (input_ids, attention_mask), int32 (B, max_length), as ``CLIPTokenizer`` with
  ``padding="max_length", truncation=True``: BOS + tokens (cut to max_length - 2) + EOS, then pad tokens."""

  def __init__(self, processor_dir, max_length=77):
    import tokenizers
    d = os.fspath(processor_dir)
    special = {**_read_json(os.path.join(d, "special_tokens_map.json")),
               **_read_json(os.path.join(d, "tokenizer_config.json"))}
    bos = _token_name(special.get("bos_token")) or "<|startoftext|>"
    eos = _token_name(special.get("eos_token")) or "<|endoftext|>"
    pad = _token_name(special.get("pad_token")) or "<|endoftext|>"
    if os.path.isfile(os.path.join(d, "tokenizer.json")):
      tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    elif os.path.isfile(os.path.join(d, "vocab.json")) and os.path.isfile(os.path.join(d, "merges.txt")):
      tok = self._from_vocab(d, eos)
    else:
      raise FileNotFoundError(f"{d}: no tokenizer.json (nor vocab.json + merges.txt)")
    ids = {name: tok.token_to_id(name) for name in (bos, eos, pad)}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
      raise ValueError(f"{d}: special token(s) {missing} are not in the vocabulary")
    if tok.post_processor is None:  # vocab/merges path, or a bare tokenizer.json
      tok.post_processor = tokenizers.processors.TemplateProcessing(
          single=f"{bos} $A {eos}", special_tokens=[(bos, ids[bos]), (eos, ids[eos])])
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(length=max_length, pad_id=ids[pad], pad_token=pad, direction="right")
    self.tokenizer, self.max_length, self.vocab_size = tok, max_length, tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = ids[bos], ids[eos], ids[pad]

  @staticmethod
  def _from_vocab(d, unk):
    """CLIPTokenizer's pipeline (transformers tokenization_clip.py) from vocab.json + merges.txt."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    with open(os.path.join(d, "vocab.json")) as f:
      vocab = json.load(f)
    with open(os.path.join(d, "merges.txt"), encoding="utf-8") as f:
      merges = [tuple(line.split()) for line in f.read().split("\n")
                if line.strip() and not line.startswith("#version")]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=unk))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok

  def __call__(self, prompts: Sequence[str]):
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
      raise TypeError("prompts must be a sequence of str")
    enc = self.tokenizer.encode_batch(list(prompts))
    ids = np.asarray([e.ids for e in enc], np.int32).reshape(len(enc), self.max_length)
    mask = np.asarray([e.attention_mask for e in enc], np.int32).reshape(len(enc), self.max_length)
    return ids, mask


# ----------------------------------------------------------------------------------------------- scorers


@dataclasses.dataclass(frozen=True)
class ClipScorer:
  """A converted CLIPModel with its tokeniser and image spec."""
  cfg: clip.CLIPConfig
  params: dict
  tokenizer: Optional[ClipTokenizer]
  spec: ImageSpec


@functools.lru_cache(maxsize=4)
def load_scorer(model_dir, processor_dir=None, attention_impl="xla", dtype="float32", need_text=True) -> ClipScorer:
  """Loads (once per argument set) a CLIPModel dir with the strict converter, and the processor files."""
  processor_dir = processor_dir or model_dir
  cfg, params = convert_clip.load_clip(model_dir, attention_impl=attention_impl, dtype=dtype)
  spec = load_image_spec(processor_dir)
  if spec.crop_hw != (cfg.vision.image_size, cfg.vision.image_size) and spec.do_center_crop:
    raise ValueError(f"{processor_dir}: crop_size {spec.crop_hw} does not match the model's image_size "
                     f"{cfg.vision.image_size}")
  tokenizer = ClipTokenizer(processor_dir, cfg.text.max_position_embeddings) if need_text else None
  if tokenizer is not None and tokenizer.vocab_size > cfg.text.vocab_size:
    raise ValueError(f"{processor_dir}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                     f"{cfg.text.vocab_size} (mismatched processor_dir?)")
  return ClipScorer(cfg, params, tokenizer, spec)


def _options(name, options, required, optional):
  options = dict(options or {})
  unknown = sorted(set(options) - set(required) - set(optional))
  missing = sorted(set(required) - set(options))
  if unknown or missing:
    raise ValueError(f"reward {name!r}: unknown option(s) {unknown}, missing option(s) {missing}; "
                     f"required {sorted(required)}, optional {sorted(optional)}")
  return {**optional, **options}


def _prompts(name, batch):
  prompts = batch.prompts
  if prompts is None:
    raise ValueError(f"reward {name!r} scores images against their prompts: RewardBatch.prompts is None")
  if len(prompts) != batch.images.shape[0]:
    raise ValueError(f"reward {name!r}: {len(prompts)} prompts for {batch.images.shape[0]} images")
  return list(prompts)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def embed_pair(params, images, input_ids, attention_mask, *, cfg, spec):
  """The heavy part, one jitted program: (text_embeds, image_embeds), unnormalised, for images in [-1, 1]
  (preprocessed here) and host-tokenised prompts."""
  return (clip.text_embeds(params, input_ids, attention_mask, cfg),
          clip.image_embeds(params, preprocess(images, spec), cfg))


@jax.jit
def cosine(text_embeds, image_embeds):
  """Row-wise cos(text, image), each side divided by its L2 norm (as ``x / x.norm(dim=-1, keepdim=True)``)."""
  return jnp.sum(clip.normalize(text_embeds) * clip.normalize(image_embeds), axis=-1)


@jax.jit
def pickscore(logit_scale, text_embeds, image_embeds):
  """Flow-Factory's PickScore: ``exp(logit_scale) * cos(text, image) / 26``."""
  return jnp.exp(logit_scale) * cosine(text_embeds, image_embeds) / PICKSCORE_DIVISOR


@functools.partial(jax.jit, static_argnames=("scale", "clamp_min"))
def clip_score(text_embeds, image_embeds, *, scale=1.0, clamp_min=None):
  """``scale * cos(text, image)``, optionally clamped below at ``clamp_min``."""
  s = scale * cosine(text_embeds, image_embeds)
  return s if clamp_min is None else jnp.maximum(s, clamp_min)


def _text_image_reward(name, options, extra, score):
  opts = _options(name, options, {"model_dir"},
                  {"processor_dir": None, "attention_impl": "xla", "dtype": "float32", **extra})
  for key in ("model_dir", "processor_dir"):
    d = opts[key]
    if key == "model_dir" or d:
      d = os.path.expanduser(os.fspath(d or ""))
      if not d or not os.path.isdir(d):
        what = ("a local transformers CLIPModel dir: config.json + model.safetensors" if key == "model_dir"
                else "its tokenizer.json + preprocessor_config.json")
        raise ValueError(f"{key} {opts[key]!r} is not a directory: pass --config.reward.options.{name}.{key}=DIR "
                         f"({what})")
      need = ("config.json",) if key == "model_dir" else ("preprocessor_config.json",)
      missing = [f for f in need if not os.path.isfile(os.path.join(d, f))]
      if missing:
        raise ValueError(f"{key} {d!r} has no {missing[0]}: is it the right directory? ({name} needs a "
                         f"{'transformers CLIPModel' if key == 'model_dir' else 'CLIP processor'} dir)")
      opts[key] = d
  scorer = load_scorer(os.fspath(opts["model_dir"]), opts["processor_dir"] and os.fspath(opts["processor_dir"]),
                       opts["attention_impl"], opts["dtype"])

  def reward(batch):
    ids, mask = scorer.tokenizer(_prompts(name, batch))
    text, image = embed_pair(scorer.params, batch.images, ids, mask, cfg=scorer.cfg, spec=scorer.spec)
    return score(scorer.params, text, image, opts)

  reward.scorer = scorer
  return reward


def build_pickscore(options):
  """PickScore (Flow-Factory ``rewards/pick_score.py``): ``exp(logit_scale) * cos(text, image) / 26``.

  options: ``model_dir`` (local CLIPModel dir, e.g. a yuvalkirstain/PickScore_v1 snapshot with
  model.safetensors), ``processor_dir`` (tokenizer.json + preprocessor_config.json, e.g.
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K; default model_dir), ``attention_impl``, ``dtype``.
  Needs ``batch.prompts``.
  """
  return _text_image_reward("pickscore", options, {},
                            lambda params, text, image, o: pickscore(params["logit_scale"], text, image))


def build_clip_score(options):
  """CLIP score (Flow-Factory ``rewards/clip.py``): ``scale * cos(text, image)``, scale 1 by default as there;
  ``clamp_min`` (default None) clamps below (torchmetrics' CLIPScore is scale=100, clamp_min=0).

  options: ``model_dir`` (e.g. an openai/clip-vit-large-patch14 snapshot), ``processor_dir``, ``scale``,
  ``clamp_min``, ``attention_impl``, ``dtype``. Needs ``batch.prompts``.
  """
  opts = dict(options or {})
  for k in ("scale", "clamp_min"):
    if opts.get(k) is not None:
      opts[k] = float(opts[k])
  return _text_image_reward("clip_score", opts, {"scale": 1.0, "clamp_min": None},
                            lambda params, text, image, o: clip_score(text, image, scale=o["scale"],
                                                                      clamp_min=o["clamp_min"]))


# ----------------------------------------------------------------------------------------------- aesthetic

AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
# Sequential indices of the Linear layers: the released linear heads (sac+logos+ava1-l14-linearMSE) and the
# variant with a ReLU after each of the first four Linears (ava+logos-l14-reluMSE).
AESTHETIC_LAYOUTS = {"linear": (0, 2, 4, 6, 7), "relu": (0, 3, 6, 9, 11)}


def aesthetic_key_map(layout):
  return [Entry(f"layers.{i}.{w}", (f"dense_{j}", "kernel" if w == "weight" else "bias"),
                "linear" if w == "weight" else "copy")
          for j, i in enumerate(AESTHETIC_LAYOUTS[layout]) for w in ("weight", "bias")]


def load_aesthetic_head(path, input_dim=768, *, layout=None):
  """Strict loader of the improved-aesthetic-predictor MLP from a ``.safetensors`` file.

  Expected keys (torch ``state_dict`` of its ``MLP``, ``self.layers = nn.Sequential(Linear(in, 1024),
  Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
  Linear(16, 1))``): ``layers.{0,2,4,6,7}.weight`` (out, in) and ``.bias`` (out,). With ReLUs after the first
  four Linears (layout "relu"): ``layers.{0,3,6,9,11}``. The layout is detected from the keys unless given.
  The released ``.pth`` files must be re-saved once as safetensors (``safetensors.torch.save_file(
  torch.load(pth), out)``). Returns ``(layout, params)``; raises ConversionError naming every problem.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConversionError("aesthetic head", [f"{path}: no such file (expected a .safetensors state dict)"])
  ckpt = Checkpoint([SafetensorsFile(path)], path)
  if layout is None:
    layout = "relu" if {"layers.9.weight", "layers.11.weight"} & set(ckpt.keys()) else "linear"
  if layout not in AESTHETIC_LAYOUTS:
    raise ValueError(f"unknown aesthetic layout {layout!r}; expected one of {sorted(AESTHETIC_LAYOUTS)}")
  dims = (input_dim,) + AESTHETIC_WIDTHS
  targets = {f"dense_{j}": {"kernel": jax.ShapeDtypeStruct((dims[j], dims[j + 1]), jnp.float32),
                            "bias": jax.ShapeDtypeStruct((dims[j + 1],), jnp.float32)}
             for j in range(len(AESTHETIC_WIDTHS))}
  params = apply_key_map("aesthetic head", aesthetic_key_map(layout), ckpt, targets)
  return layout, jax.tree_util.tree_map(jnp.asarray, params)


def aesthetic_head(params, embeds, layout="linear"):
  """The MLP on L2-normalised embeddings (norm 0 -> left as is, as the reference ``normalized``)."""
  n = jnp.linalg.norm(embeds, axis=-1, keepdims=True)
  x = embeds / jnp.where(n == 0, 1.0, n)
  last = len(AESTHETIC_WIDTHS) - 1
  for j in range(len(AESTHETIC_WIDTHS)):
    p = params[f"dense_{j}"]
    x = jnp.dot(x, p["kernel"], precision=jax.lax.Precision.HIGHEST) + p["bias"]
    if layout == "relu" and j < last:
      x = jax.nn.relu(x)
  return x[..., 0]


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "layout"))
def _aesthetic_score(clip_params, head_params, images, *, cfg, spec, layout):
  return aesthetic_head(head_params, clip.image_embeds(clip_params, preprocess(images, spec), cfg), layout)


def build_aesthetic(options):
  """LAION aesthetic predictor: the improved-aesthetic-predictor MLP on CLIP image embeddings.

  options: ``model_dir`` (CLIPModel dir, e.g. an openai/clip-vit-large-patch14 snapshot: the heads were
  trained on ViT-L/14 embeddings), ``head_path`` (the MLP as .safetensors, see :func:`load_aesthetic_head`),
  ``processor_dir`` (default model_dir), ``layout`` (None: detected), ``attention_impl``, ``dtype``.
  Prompts are not used.
  """
  opts = _options("aesthetic", options, {"model_dir", "head_path"},
                  {"processor_dir": None, "layout": None, "attention_impl": "xla", "dtype": "float32"})
  scorer = load_scorer(os.fspath(opts["model_dir"]), opts["processor_dir"] and os.fspath(opts["processor_dir"]),
                       opts["attention_impl"], opts["dtype"], need_text=False)
  layout, head = load_aesthetic_head(opts["head_path"], scorer.cfg.projection_dim, layout=opts["layout"])

  def reward(batch):
    return _aesthetic_score(scorer.params, head, batch.images, cfg=scorer.cfg, spec=scorer.spec, layout=layout)

  reward.scorer, reward.head = scorer, head
  return reward
