"""Strict converter: a local transformers ``CLIPModel`` directory (config.json + model.safetensors, or a
sharded ``*.safetensors.index.json`` set) -> models/clip.py params + config.

Key map (transformers names on the left; Linear weights transposed, the patch conv OIHW -> HWIO, encoder
layers stacked on axis 0 for nn.scan):

  text_model.embeddings.token_embedding.weight      text/token_embedding/embedding
  text_model.embeddings.position_embedding.weight   text/position_embedding
  {tower}.encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}
  {tower}.encoder.layers.{i}.layer_norm{1,2}.{weight,bias}, .mlp.fc{1,2}.{weight,bias}
                                                    {text,vision}/layers/<same names>[i]
  text_model.final_layer_norm.*                     text/final_layer_norm
  text_projection.weight / visual_projection.weight text/projection, vision/projection
  vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight}
  vision_model.{pre_layrnorm, post_layernorm}.*     vision/{pre_layrnorm, post_layernorm}
  logit_scale                                       logit_scale

``*.embeddings.position_ids`` (a persistent int64 buffer in checkpoints written by transformers < 4.31, e.g.
older hub snapshots) is accepted only if it equals ``arange``; it has no target. Everything else is strict:
every key used once, every leaf set, shapes and dtypes checked, all problems raised together.
"""

import os
from typing import Optional

import jax
import numpy as np

from normguard_jax.convert.safetensors_io import ConversionError, apply_key_map, Entry, open_checkpoint, read_config
from normguard_jax.models import clip

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")
_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps")
_POSITION_IDS = {"text_model.embeddings.position_ids": "text", "vision_model.embeddings.position_ids": "vision"}


def _sub_config(config, name, cls, fields):
  sub = dict(config.get(f"{name}_config") or {})
  sub.update(config.get(f"{name}_config_dict") or {})  # legacy key; wins, as in transformers' CLIPConfig
  defaults = cls()
  return cls(**{f: sub.get(f, getattr(defaults, f)) for f in fields})


def config_from_transformers(config: dict, **overrides) -> clip.CLIPConfig:
  """Our config from a ``CLIPModel`` config.json (architecture) plus runtime ``overrides``."""
  model_type = config.get("model_type")
  if model_type not in (None, "clip"):
    raise ConversionError("config", [f"config.json describes model_type {model_type!r}, expected 'clip' (a "
                                     f"transformers CLIPModel directory)"])
  try:
    text = _sub_config(config, "text", clip.CLIPTextConfig, _TEXT_FIELDS)
    vision = _sub_config(config, "vision", clip.CLIPVisionConfig, _VISION_FIELDS)
    if isinstance(text.eos_token_id, (list, tuple)):
      raise ValueError(f"text_config.eos_token_id must be one id, got {text.eos_token_id}")
    if isinstance(vision.image_size, (list, tuple)) or isinstance(vision.patch_size, (list, tuple)):
      raise ValueError("non-square image_size / patch_size are not supported")
    return clip.CLIPConfig(text=text, vision=vision, projection_dim=int(config.get("projection_dim", 512)),
                           **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError("config", [f"unsupported CLIP config: {e}"]) from e


def _linear(src, dst, index=None, bias=True):
  out = [Entry(f"{src}.weight", dst + ("kernel",), "linear", index)]
  return out + ([Entry(f"{src}.bias", dst + ("bias",), "copy", index)] if bias else [])


def _norm(src, dst, index=None):
  return [Entry(f"{src}.weight", dst + ("scale",), "copy", index), Entry(f"{src}.bias", dst + ("bias",), "copy", index)]


def _layers(src_tower, dst_tower, n):
  out = []
  for i in range(n):
    s, d = f"{src_tower}.encoder.layers.{i}", (dst_tower, "layers")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      out += _linear(f"{s}.self_attn.{proj}", d + (proj,), i)
    out += _norm(f"{s}.layer_norm1", d + ("layer_norm1",), i) + _norm(f"{s}.layer_norm2", d + ("layer_norm2",), i)
    out += _linear(f"{s}.mlp.fc1", d + ("fc1",), i) + _linear(f"{s}.mlp.fc2", d + ("fc2",), i)
  return out


def key_map(cfg: clip.CLIPConfig):
  """Every key of a transformers CLIPModel state dict with this config -> its place in our param tree."""
  e = [Entry("text_model.embeddings.token_embedding.weight", ("text", "token_embedding", "embedding")),
       Entry("text_model.embeddings.position_embedding.weight", ("text", "position_embedding"))]
  e += _layers("text_model", "text", cfg.text.num_hidden_layers)
  e += _norm("text_model.final_layer_norm", ("text", "final_layer_norm"))
  e += _linear("text_projection", ("text", "projection"), bias=False)
  e += [Entry("vision_model.embeddings.class_embedding", ("vision", "class_embedding")),
        Entry("vision_model.embeddings.patch_embedding.weight", ("vision", "patch_embedding", "kernel"), "conv"),
        Entry("vision_model.embeddings.position_embedding.weight", ("vision", "position_embedding"))]
  e += _norm("vision_model.pre_layrnorm", ("vision", "pre_layrnorm"))
  e += _layers("vision_model", "vision", cfg.vision.num_hidden_layers)
  e += _norm("vision_model.post_layernorm", ("vision", "post_layernorm"))
  e += _linear("visual_projection", ("vision", "projection"), bias=False)
  e += [Entry("logit_scale", ("logit_scale",))]
  return e


class _WithoutPositionIds:
  """The checkpoint seen without its legacy ``position_ids`` buffers (checked separately)."""

  def __init__(self, checkpoint):
    self._ckpt = checkpoint

  def keys(self):
    return [k for k in self._ckpt.keys() if k not in _POSITION_IDS]

  def info(self, key):
    return self._ckpt.info(key)

  def load(self, key):
    return self._ckpt.load(key)


def _check_position_ids(checkpoint, cfg):
  problems = []
  for key, tower in _POSITION_IDS.items():
    if key not in checkpoint.keys():
      continue
    n = cfg.text.max_position_embeddings if tower == "text" else cfg.vision.num_positions
    ti = checkpoint.info(key)
    if ti.dtype not in ("I64", "I32") or tuple(ti.shape) != (1, n):
      problems.append(f"{key}: legacy buffer must be int64 [1, {n}], got {ti.dtype}{list(ti.shape)}")
    elif not np.array_equal(checkpoint.load(key)[0], np.arange(n)):
      problems.append(f"{key}: legacy buffer differs from arange({n})")
  return problems


def convert_checkpoint(checkpoint, cfg: clip.CLIPConfig, *, source_dtype: Optional[str] = None,
                       param_dtype=np.float32):
  """Param tree for ``cfg`` from an opened checkpoint (anything with keys / info / load)."""
  problems = _check_position_ids(checkpoint, cfg)
  try:
    params = apply_key_map("CLIP model", key_map(cfg), _WithoutPositionIds(checkpoint), clip.param_shapes(cfg),
                           source_dtype=source_dtype, param_dtype=param_dtype)
  except ConversionError as e:
    raise ConversionError("CLIP model", problems + e.problems) from None
  if problems:
    raise ConversionError("CLIP model", problems)
  return params


def resolve_model_dir(path):
  """``path`` must hold a CLIPModel config.json; a clear ConversionError otherwise."""
  path = os.fspath(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise ConversionError("config", [f"{path}: wrong directory: no config.json (expected a transformers CLIPModel "
                                     f"directory, e.g. a yuvalkirstain/PickScore_v1 snapshot)"])
  return path


def load_clip(path, *, source_dtype: Optional[str] = None, param_dtype=np.float32, as_jax=True, **overrides):
  """(cfg, params) from a local transformers CLIPModel directory. ``overrides``: runtime fields
  (attention_impl, dtype, remat). Raises ConversionError naming every problem (wrong directory; missing /
  extra / misshapen / mistyped key; truncated or corrupt file)."""
  directory = resolve_model_dir(path)
  cfg = config_from_transformers(read_config(directory), **overrides)
  try:
    checkpoint = open_checkpoint(directory)
  except ConversionError as e:
    if any(os.path.isfile(os.path.join(directory, n)) for n in ("pytorch_model.bin", "model.bin")):
      raise ConversionError("checkpoint", e.problems + [
          f"{directory}: only PyTorch .bin weights found; write model.safetensors once (e.g. "
          f"CLIPModel.from_pretrained(dir).save_pretrained(dir) with transformers)"]) from None
    raise
  params = convert_checkpoint(checkpoint, cfg, source_dtype=source_dtype, param_dtype=param_dtype)
  if as_jax:
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)
  return cfg, params
