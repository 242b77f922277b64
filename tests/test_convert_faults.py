"""Tier-2 converter checks: strict failure modes on synthetic safetensors with the real diffusers key layout.

The synthetic checkpoints are written from our declarative key maps (numpy + safetensors, no torch); one
test checks those key sets against diffusers' own state_dict names.
"""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from normguard_jax.convert import ConversionError, safetensors_io
from normguard_jax.convert import sd3 as convert_sd3
from normguard_jax.convert import vae as convert_vae
from normguard_jax.models import mmdit
from normguard_jax.models import vae as vae_lib

SD35_TINY = dict(_class_name="SD3Transformer2DModel", sample_size=16, patch_size=2, in_channels=16, num_layers=4,
                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm",
                 dual_attention_layers=[0, 1])
VAE_TINY = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, block_out_channels=[8, 16],
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def synthetic_tensors(entries, targets, seed=0):
  """{diffusers key: float32 array} in the source layout, for every entry of a key map."""
  rng = np.random.default_rng(seed)
  leaves = safetensors_io._leaf_paths(targets)
  out = {}
  for e in entries:
    if e.layout == "check":
      out[e.src] = np.asarray(e.expected, np.float32)
      continue
    shape = tuple(leaves[e.dst].shape)
    shape = safetensors_io._source_shape(e.layout, shape[1:] if e.index is not None else shape)
    out[e.src] = rng.standard_normal(shape).astype(np.float32)
  return out


def write_model(directory, config, tensors):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(tensors, os.path.join(directory, WEIGHTS))


def sd3_tensors():
  cfg = convert_sd3.config_from_diffusers(SD35_TINY, scan_layers=False)
  return synthetic_tensors(convert_sd3.key_map(cfg), mmdit.param_shapes(cfg)["params"])


@pytest.fixture
def sd3_dir(tmp_path):
  tensors = sd3_tensors()
  write_model(tmp_path / "transformer", SD35_TINY, tensors)
  return tmp_path, tensors


def rewrite(root, tensors):
  save_file(tensors, os.path.join(root, "transformer", WEIGHTS))


def raises(root, *needles, **kwargs):
  with pytest.raises(ConversionError) as info:
    convert_sd3.load_transformer(root, **kwargs)
  msg = str(info.value)
  for needle in needles:
    assert needle in msg, msg
  return info.value


def test_clean_checkpoint_converts_scanned_and_not(sd3_dir):
  root, tensors = sd3_dir
  for scan in (False, True):
    cfg, params = convert_sd3.load_transformer(root, scan_layers=scan)
    assert mmdit.param_count(params) == sum(v.size for k, v in tensors.items() if k != "pos_embed.pos_embed")
  # the transformer dir itself is accepted too, and values land where the map says (Linear transposed)
  _, params = convert_sd3.load_transformer(root / "transformer", scan_layers=True)
  np.testing.assert_array_equal(params["blocks_0"]["attn2"]["to_q"]["kernel"][1],
                                tensors["transformer_blocks.1.attn2.to_q.weight"].T)
  np.testing.assert_array_equal(params["pos_embed"]["proj"]["kernel"],
                                tensors["pos_embed.proj.weight"].transpose(2, 3, 1, 0))


def test_missing_key(sd3_dir):
  root, tensors = sd3_dir
  del tensors["transformer_blocks.1.attn.to_q.weight"]
  rewrite(root, tensors)
  raises(root, "missing key 'transformer_blocks.1.attn.to_q.weight'")


def test_extra_key(sd3_dir):
  root, tensors = sd3_dir
  tensors["transformer_blocks.0.attn.to_bogus.weight"] = np.zeros((4, 4), np.float32)
  rewrite(root, tensors)
  raises(root, "extra key 'transformer_blocks.0.attn.to_bogus.weight'")


def test_wrong_shape(sd3_dir):
  root, tensors = sd3_dir
  tensors["context_embedder.weight"] = tensors["context_embedder.weight"].T.copy()
  rewrite(root, tensors)
  raises(root, "wrong shape for 'context_embedder.weight': [32, 16], expected [16, 32]")


@pytest.mark.parametrize("dtype,label", [(np.float64, "F64"), (np.int32, "I32")])
def test_wrong_dtype(sd3_dir, dtype, label):
  root, tensors = sd3_dir
  tensors["proj_out.bias"] = tensors["proj_out.bias"].astype(dtype)
  rewrite(root, tensors)
  raises(root, f"wrong dtype for 'proj_out.bias': {label}")


def test_required_source_dtype(sd3_dir):
  root, _ = sd3_dir
  err = raises(root, "wrong dtype for", "expected F16", source_dtype="F16")
  assert len(err.problems) == len(sd3_tensors())  # every key named
  assert "wrong dtype for 'proj_out.bias': F32, expected F16" in err.problems


def test_all_problems_reported_at_once(sd3_dir):
  root, tensors = sd3_dir
  del tensors["norm_out.linear.bias"]
  tensors["unexpected.weight"] = np.zeros(3, np.float32)
  tensors["transformer_blocks.2.ff.net.2.weight"] = np.zeros((3, 3), np.float32)
  rewrite(root, tensors)
  err = raises(root, "missing key 'norm_out.linear.bias'", "extra key 'unexpected.weight'",
               "wrong shape for 'transformer_blocks.2.ff.net.2.weight'")
  assert len(err.problems) == 3


def test_truncated_file(sd3_dir):
  root, _ = sd3_dir
  path = root / "transformer" / WEIGHTS
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  raises(root, "truncated")
  path.write_bytes(data[:5])
  raises(root, "truncated")


def test_corrupt_header(sd3_dir):
  root, _ = sd3_dir
  path = root / "transformer" / WEIGHTS
  data = bytearray(path.read_bytes())
  data[8:20] = b"not json!!!!"
  path.write_bytes(bytes(data))
  raises(root, "corrupt header")


def test_wrong_directory(tmp_path, sd3_dir):
  raises(tmp_path / "empty_nonexistent", "wrong directory", "no config.json")
  os.makedirs(tmp_path / "empty")
  raises(tmp_path / "empty", "wrong directory")
  root, _ = sd3_dir
  os.remove(root / "transformer" / WEIGHTS)
  raises(root, "no *.safetensors")
  vae_dir = tmp_path / "pipe" / "vae"
  os.makedirs(vae_dir)
  (vae_dir / "config.json").write_text(json.dumps(VAE_TINY))
  raises(vae_dir, "describes 'AutoencoderKL'")


def test_config_mismatch_caught_by_position_buffer(sd3_dir):
  root, tensors = sd3_dir
  config = dict(SD35_TINY, sample_size=32)  # changes the sin-cos table (base_size) but no weight shape
  (root / "transformer" / "config.json").write_text(json.dumps(config))
  raises(root, "pos_embed.pos_embed: constant differs")


def test_sharded_checkpoint(sd3_dir):
  root, tensors = sd3_dir
  shard_dir = root / "sharded"
  shutil.copytree(root / "transformer", shard_dir)
  os.remove(shard_dir / WEIGHTS)
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
  weight_map = {}
  for name, ks in shards.items():
    save_file({k: tensors[k] for k in ks}, str(shard_dir / name))
    weight_map.update({k: name for k in ks})
  index = shard_dir / (WEIGHTS + ".index.json")
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, single = convert_sd3.load_transformer(root, scan_layers=True)
  _, sharded = convert_sd3.load_transformer(shard_dir, scan_layers=True)
  np.testing.assert_array_equal(single["blocks_0"]["ff"]["fc1"]["kernel"], sharded["blocks_0"]["ff"]["fc1"]["kernel"])
  # a shard that the index names is missing
  os.remove(shard_dir / "model-00002-of-00002.safetensors")
  raises(shard_dir, "shard 'model-00002-of-00002.safetensors' is missing")


def test_vae_faults(tmp_path):
  cfg = convert_vae.config_from_diffusers(VAE_TINY)
  tensors = synthetic_tensors(convert_vae.key_map(cfg), vae_lib.param_shapes(cfg)["params"])
  write_model(tmp_path / "vae", VAE_TINY, tensors)
  _, params = convert_vae.load_vae(tmp_path)
  assert set(params) == {"encoder", "decoder"}
  del tensors["decoder.mid_block.attentions.0.to_q.weight"]
  tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"][:, :, :2]
  save_file(tensors, str(tmp_path / "vae" / WEIGHTS))
  with pytest.raises(ConversionError) as info:
    convert_vae.load_vae(tmp_path)
  msg = str(info.value)
  assert "missing key 'decoder.mid_block.attentions.0.to_q.weight'" in msg
  assert "wrong shape for 'decoder.conv_out.weight'" in msg


def test_key_maps_match_diffusers_state_dicts():
  """Our declarative maps name exactly diffusers' keys (the real layout), with the right shapes."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  del torch
  kwargs = {k: v for k, v in SD35_TINY.items() if not k.startswith("_")}
  ref = {k: tuple(v.shape) for k, v in diffusers.SD3Transformer2DModel(**kwargs).state_dict().items()}
  assert {k: v.shape for k, v in sd3_tensors().items()} == ref
  kwargs = {k: v for k, v in VAE_TINY.items() if not k.startswith("_")}
  for quant in (False, True):
    kwargs.update(use_quant_conv=quant, use_post_quant_conv=quant)
    ref = {k: tuple(v.shape) for k, v in diffusers.AutoencoderKL(**kwargs).state_dict().items()}
    cfg = convert_vae.config_from_diffusers(kwargs)
    ours = synthetic_tensors(convert_vae.key_map(cfg), vae_lib.param_shapes(cfg)["params"])
    assert {k: v.shape for k, v in ours.items()} == ref
