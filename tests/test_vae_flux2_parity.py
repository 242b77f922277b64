"""Tier-3 parity: FLUX.2's VAE (models/vae.py, ``latent_batch_norm``) against diffusers' ``AutoencoderKLFlux2``
and ``Flux2Pipeline``'s latent <-> pixel code, fp32 on CPU.

A tiny random diffusers AutoencoderKLFlux2 (every weight AND the BatchNorm running stats randomised, separate
decoder widths, quant convs) is saved with ``save_pretrained`` and converted by our strict converter. The
reference decode is the pipeline's own path, run through its static helpers: ``_pack_latents`` ->
``_unpack_latents_with_ids`` -> z * sqrt(running_var + eps) + running_mean -> ``_unpatchify_latents`` ->
``vae.decode``. Ours takes the NHWC latents our FLUX.2 transformer sees (``flux.unpack`` of the same tokens).
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline  # noqa: E402

from normguard_jax.convert import vae as convert_vae  # noqa: E402
from normguard_jax.convert.safetensors_io import ConversionError  # noqa: E402
from normguard_jax.models import flux as flux_lib  # noqa: E402
from normguard_jax.models import vae as vae_lib  # noqa: E402
from tests.torch_helpers import errors, randomize_torch  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), decoder_block_out_channels=(12, 24),
            layers_per_block=1, latent_channels=32, norm_num_groups=4, sample_size=16, batch_norm_eps=1e-4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def flux2_vae(tmp_path_factory):
  model = randomize_torch(diffusers.AutoencoderKLFlux2(**TINY), seed=5)
  with torch.no_grad():  # non-trivial running stats, so the de-normalisation (and its channel order) matters
    g = torch.Generator().manual_seed(11)
    model.bn.running_mean.copy_(torch.randn(model.bn.num_features, generator=g))
    model.bn.running_var.copy_(0.1 + 3 * torch.rand(model.bn.num_features, generator=g))
    model.bn.num_batches_tracked.fill_(1234)
  root = tmp_path_factory.mktemp("flux2_vae")
  model.save_pretrained(root / "vae")
  cfg, params = convert_vae.load_vae(root)
  return model, cfg, params, root


def test_config(flux2_vae):
  _, cfg, params, _ = flux2_vae
  assert cfg.latent_batch_norm and cfg.latent_channels == 32 and cfg.batch_norm_eps == 1e-4
  assert cfg.decoder_channels == (12, 24) and cfg.block_out_channels == (8, 16)
  assert cfg.use_quant_conv and cfg.use_post_quant_conv
  assert params["bn"]["running_mean"].shape == (128,)
  with pytest.raises(ValueError, match="decode_flux2"):
    vae_lib.decode(params, np.zeros((1, 2, 2, 32), np.float32), cfg)


def test_patchify_matches_pipeline():
  x = np.random.default_rng(2).standard_normal((2, 6, 4, 5)).astype(np.float32)  # NHWC
  ref = Flux2Pipeline._patchify_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(vae_lib.patchify(x))
  np.testing.assert_array_equal(ours, ref.transpose(0, 2, 3, 1))
  back = Flux2Pipeline._unpatchify_latents(torch.from_numpy(ref)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(vae_lib.unpatchify(ours)), back)


def test_decode_parity(flux2_vae):
  model, cfg, params, _ = flux2_vae
  b, h, w = 2, 3, 4  # transformer (patchified) grid; pixels are 2 * 2 * (h, w) with this 2-level VAE
  with torch.no_grad():
    patched = torch.from_numpy(np.random.default_rng(0).standard_normal((b, 128, h, w)).astype(np.float32))
    tokens = Flux2Pipeline._pack_latents(patched)  # what the transformer denoises, (B, h * w, 128)
    ids = Flux2Pipeline._prepare_latent_ids(patched)
    lat = Flux2Pipeline._unpack_latents_with_ids(tokens, ids)  # Flux2Pipeline.__call__, output_type != "latent"
    mean = model.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
    lat = Flux2Pipeline._unpatchify_latents(lat * std + mean)
    ref = model.decode(lat, return_dict=False)[0].numpy().transpose(0, 2, 3, 1)
  ours_latents = flux_lib.unpack(tokens.numpy(), 2 * h, 2 * w)  # our FLUX.2 velocity's NHWC latent space
  assert ours_latents.shape == (b, 2 * h, 2 * w, 32)
  ours = jax.jit(lambda p, l: vae_lib.decode_flux2(p, l, cfg))(params, ours_latents)
  assert ours.shape == ref.shape == (b, 4 * h, 4 * w, 3)
  abs_err, rel_err = errors(ours, ref)
  print(f"[parity] flux2 vae decode: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}, "
        f"max |ref| {np.abs(ref).max():.3g}")
  assert abs_err <= 1e-4


def test_encode_parity(flux2_vae):
  model, cfg, params, _ = flux2_vae
  pixels = np.random.default_rng(1).uniform(-1, 1, (2, 8, 12, 3)).astype(np.float32)
  fake_pipe = types.SimpleNamespace(vae=model, _patchify_latents=Flux2Pipeline._patchify_latents)
  with torch.no_grad():
    ref = Flux2Pipeline._encode_vae_image(fake_pipe, torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), None)
    ref_tokens = Flux2Pipeline._pack_latents(ref).numpy()
  ours = jax.jit(lambda p, x: vae_lib.encode_flux2(p, x, cfg))(params, pixels)
  assert ours.shape == (2, 4, 6, 32)
  abs_err, rel_err = errors(flux_lib.pack(ours), ref_tokens)
  print(f"[parity] flux2 vae encode (argmax): max abs err {abs_err:.3g}, max rel err {rel_err:.3g}")
  assert abs_err <= 1e-4


# ----------------------------------------------------------------------------------------------- faults

def _corrupt(src_root, dst, edit):
  """Copy of the saved vae dir with its tensors edited by ``edit(dict)``."""
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src_root / "vae", dst)
  tensors = load_file(os.path.join(dst, WEIGHTS))
  edit(tensors)
  save_file(tensors, os.path.join(dst, WEIGHTS))
  return dst


@pytest.mark.parametrize("name,edit,pattern", [
    ("missing", lambda t: t.pop("bn.running_var"), r"missing key 'bn.running_var'"),
    ("missing_nbt", lambda t: t.pop("bn.num_batches_tracked"), r"missing key 'bn.num_batches_tracked'"),
    ("extra", lambda t: t.__setitem__("bn.weight", np.ones(128, np.float32)), r"extra key 'bn.weight'"),
    ("shape", lambda t: t.__setitem__("bn.running_mean", np.zeros(64, np.float32)),
     r"wrong shape for 'bn.running_mean': \[64\], expected \[128\]"),
    ("shape_decoder", lambda t: t.__setitem__("decoder.conv_in.weight", np.zeros((24, 16, 3, 3), np.float32)),
     r"wrong shape for 'decoder.conv_in.weight'"),
    ("nbt_dtype", lambda t: t.__setitem__("bn.num_batches_tracked", np.zeros((), np.float32)),
     r"wrong dtype for 'bn.num_batches_tracked': F32"),
    ("nbt_shape", lambda t: t.__setitem__("bn.num_batches_tracked", np.zeros((1,), np.int64)),
     r"wrong shape for 'bn.num_batches_tracked'"),
    ("neg_var", lambda t: t.__setitem__("bn.running_var", -np.ones(128, np.float32)), r"bn.running_var"),
])
def test_converter_faults(flux2_vae, tmp_path, name, edit, pattern):
  _, _, _, root = flux2_vae
  bad = _corrupt(root, tmp_path / name, edit)
  with pytest.raises(ConversionError, match=pattern) as info:
    convert_vae.load_vae(bad)
  print(f"[fault {name}] {str(info.value).splitlines()[1].strip()}")


def test_config_faults(flux2_vae, tmp_path):
  _, _, _, root = flux2_vae
  for key, value, pattern in (("patch_size", [1, 1], "patch_size"),
                              ("up_block_types", ["UpDecoderBlock2D"] * 3, "up_block_types")):
    d = tmp_path / key
    shutil.copytree(root / "vae", d)
    with open(d / "config.json") as f:
      config = json.load(f)
    config[key] = value
    with open(d / "config.json", "w") as f:
      json.dump(config, f)
    with pytest.raises(ConversionError, match=pattern):
      convert_vae.load_vae(d)
