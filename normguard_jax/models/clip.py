"""CLIP text and vision towers (transformers ``CLIPModel``) as pure Flax functions.

Reference behaviour (transformers 5.x ``modeling_clip.py``):
- Text: token + absolute position embeddings; pre-LN encoder layers (LN1 -> self-attention -> residual,
  LN2 -> MLP -> residual) under a causal mask combined with the padding mask; ``final_layer_norm``; the
  pooled state is taken at the EOS token: when the config's ``eos_token_id == 2`` (configs written before
  transformers PR #24773) at ``argmax(input_ids)`` (the EOS id is the largest one in the CLIP vocab),
  otherwise at the first position equal to ``eos_token_id``; then ``text_projection`` (no bias).
- Vision: patch conv (stride = patch, no bias) -> [class_embedding; patches] + position embeddings ->
  ``pre_layrnorm`` -> encoder (no mask) -> ``post_layernorm`` on the CLS token -> ``visual_projection``.
- MLP activation from ``hidden_act``: ``quick_gelu`` = x * sigmoid(1.702 x) (OpenAI CLIP), ``gelu`` = exact erf
  GELU (OpenCLIP / LAION ViT-H, PickScore), ``gelu_new`` / ``gelu_pytorch_tanh`` = tanh approximation.

Layers run under ``nn.scan`` with params stacked on axis 0. Params are a plain dict
``{"text": ..., "vision": ..., "logit_scale": ()}``; see :func:`param_shapes`.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from normguard_jax.models import attention as attention_lib

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Mirrors transformers' ``CLIPTextConfig`` (architecture fields only)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Mirrors transformers' ``CLIPVisionConfig`` (architecture fields only)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_positions(self):
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text: CLIPTextConfig = CLIPTextConfig()
  vision: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  # runtime
  attention_impl: str = "xla"
  dtype: str = "float32"          # compute dtype of the Dense / conv layers; LayerNorm and outputs in float32
  remat: bool = False

  def __post_init__(self):
    for name, tower in (("text", self.text), ("vision", self.vision)):
      if tower.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported {name} hidden_act {tower.hidden_act!r}; expected one of {ACTIVATIONS}")
      if tower.hidden_size % tower.num_attention_heads:
        raise ValueError(f"{name} hidden_size {tower.hidden_size} is not a multiple of num_attention_heads "
                         f"{tower.num_attention_heads}")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}")
    if self.attention_impl not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"unknown attention_impl {self.attention_impl!r}")


def activation(name, x):
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported hidden_act {name!r}")


def _layer_norm(eps, name):
  # two-pass variance, as torch.nn.LayerNorm
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
  """``CLIPEncoderLayer``: carry h -> (h, None) for nn.scan; ``mask`` broadcast over layers."""
  tower: object
  attention_impl: str
  dtype: str

  @nn.compact
  def __call__(self, h, mask):
    t, dtype = self.tower, jnp.dtype(self.dtype)
    b, n, d = h.shape
    heads = t.num_attention_heads
    x = _layer_norm(t.layer_norm_eps, "layer_norm1")(h).astype(dtype)
    q, k, v = (nn.Dense(d, dtype=dtype, name=p)(x).reshape(b, n, heads, d // heads)
               for p in ("q_proj", "k_proj", "v_proj"))
    o = attention_lib.dot_product_attention(q, k, v, impl=self.attention_impl, mask=mask).reshape(b, n, d)
    h = h + nn.Dense(d, dtype=dtype, name="out_proj")(o).astype(jnp.float32)
    x = _layer_norm(t.layer_norm_eps, "layer_norm2")(h).astype(dtype)
    x = activation(t.hidden_act, nn.Dense(t.intermediate_size, dtype=dtype, name="fc1")(x))
    h = h + nn.Dense(d, dtype=dtype, name="fc2")(x).astype(jnp.float32)
    return h, None


def _encoder(cfg: CLIPConfig, tower, h, mask):
  layer = nn.remat(EncoderLayer) if cfg.remat else EncoderLayer
  layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                   length=tower.num_hidden_layers)
  h, _ = layers(tower, cfg.attention_impl, cfg.dtype, name="layers")(h, mask)
  return h


class TextTower(nn.Module):
  cfg: CLIPConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    cfg, t = self.cfg, self.cfg.text
    b, n = input_ids.shape
    if n > t.max_position_embeddings:
      raise ValueError(f"sequence length {n} exceeds max_position_embeddings {t.max_position_embeddings}")
    tok = nn.Embed(t.vocab_size, t.hidden_size, name="token_embedding")(input_ids)
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (t.max_position_embeddings, t.hidden_size))
    h = (tok + pos[None, :n]).astype(jnp.float32)
    causal = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None]
    mask = causal if attention_mask is None else causal & (attention_mask[:, None, None, :] > 0)
    h = _encoder(cfg, t, h, mask)
    h = _layer_norm(t.layer_norm_eps, "final_layer_norm")(h)
    if t.eos_token_id == 2:  # legacy configs: EOS is the largest id in the sequence
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:                    # first EOS (pad may equal EOS)
      eos_pos = jnp.argmax(input_ids == t.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(h, eos_pos[:, None, None], axis=1)[:, 0]
    out = nn.Dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype), name="projection")(pooled)
    return out.astype(jnp.float32)


class VisionTower(nn.Module):
  cfg: CLIPConfig

  @nn.compact
  def __call__(self, pixel_values):
    cfg, v = self.cfg, self.cfg.vision
    b, hgt, wid, c = pixel_values.shape
    if (hgt, wid, c) != (v.image_size, v.image_size, v.num_channels):
      raise ValueError(f"pixel_values must be (B, {v.image_size}, {v.image_size}, {v.num_channels}) NHWC, "
                       f"got {pixel_values.shape}")
    p, d = v.patch_size, v.hidden_size
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=jnp.dtype(cfg.dtype),
                name="patch_embedding")(pixel_values.astype(jnp.dtype(cfg.dtype)))
    x = x.reshape(b, -1, d).astype(jnp.float32)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (d,))
    pos = self.param("position_embedding", nn.initializers.normal(0.02), (v.num_positions, d))
    h = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos[None]
    h = _layer_norm(v.layer_norm_eps, "pre_layrnorm")(h)
    h = _encoder(cfg, v, h, None)
    pooled = _layer_norm(v.layer_norm_eps, "post_layernorm")(h[:, 0])
    out = nn.Dense(cfg.projection_dim, use_bias=False, dtype=jnp.dtype(cfg.dtype), name="projection")(pooled)
    return out.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _text_module(cfg):
  return TextTower(cfg)


@functools.lru_cache(maxsize=None)
def _vision_module(cfg):
  return VisionTower(cfg)


def init(cfg: CLIPConfig, key):
  """Fresh random params ``{"text", "vision", "logit_scale"}`` (for shapes and tests)."""
  kt, kv = jax.random.split(key)
  ids = jnp.zeros((1, cfg.text.max_position_embeddings), jnp.int32)
  text = _text_module(cfg).init({"params": kt}, ids, None)["params"]
  s = cfg.vision.image_size
  vision = _vision_module(cfg).init({"params": kv}, jnp.zeros((1, s, s, cfg.vision.num_channels)))["params"]
  return {"text": text, "vision": vision, "logit_scale": jnp.asarray(2.6592, jnp.float32)}


def param_shapes(cfg: CLIPConfig):
  """Abstract params (ShapeDtypeStructs) without allocating anything."""
  return jax.eval_shape(functools.partial(init, cfg), jax.random.PRNGKey(0))


def text_embeds(params, input_ids, attention_mask, cfg: CLIPConfig):
  """``CLIPModel.get_text_features``: (B, L) int ids (+ (B, L) mask or None) -> (B, projection_dim), unnormalised."""
  return _text_module(cfg).apply({"params": params["text"]}, jnp.asarray(input_ids, jnp.int32),
                                 None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32))


def image_embeds(params, pixel_values_nhwc, cfg: CLIPConfig):
  """``CLIPModel.get_image_features``: preprocessed (B, S, S, C) pixels -> (B, projection_dim), unnormalised."""
  return _vision_module(cfg).apply({"params": params["vision"]}, pixel_values_nhwc)


def normalize(x, eps=0.0):
  """x / ||x||_2 over the last axis (as ``x / x.norm(dim=-1, keepdim=True)``)."""
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + eps)
