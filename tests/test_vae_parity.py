"""Tier-3 parity: our AutoencoderKL (models/vae.py) against diffusers', fp32 on CPU.

A tiny random-init diffusers VAE (every weight randomised) is saved with ``save_pretrained`` and converted
by our strict converter. Decoded pixels must agree within 1e-4 (we also check 2e-5 abs / 1e-5 rel).
"""


import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax.convert import vae as convert_vae  # noqa: E402
from normguard_jax.models import vae as vae_lib  # noqa: E402
from tests.torch_helpers import errors, randomize_torch

TINY = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)




@pytest.fixture(scope="module", params=[dict(use_quant_conv=False, use_post_quant_conv=False),
                                        dict(use_quant_conv=True, use_post_quant_conv=True)],
                ids=["sd3", "quant_conv"])
def vae(request, tmp_path_factory):
  model = randomize_torch(diffusers.AutoencoderKL(**TINY, **request.param), seed=3)
  root = tmp_path_factory.mktemp("vae")
  model.save_pretrained(root / "vae")
  cfg, params = convert_vae.load_vae(root)
  return model, cfg, params


def test_decode_parity(vae):
  model, cfg, params = vae
  assert cfg.shift_factor == TINY["shift_factor"] and cfg.scaling_factor == TINY["scaling_factor"]
  latents = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)  # NHWC
  with torch.no_grad():
    z = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / model.config.scaling_factor + model.config.shift_factor
    ref = model.decode(z).sample.numpy().transpose(0, 2, 3, 1)
  ours = jax.jit(lambda p, l: vae_lib.decode(p, l, cfg))(params, latents)
  assert ours.shape == (2, 16, 16, 3)
  abs_err, rel_err = errors(ours, ref)
  print(f"[parity] vae decode (quant_conv={cfg.use_post_quant_conv}): max abs err {abs_err:.3g}, "
        f"max rel err {rel_err:.3g}")
  assert abs_err <= 1e-4
  assert abs_err <= 2e-5 and rel_err <= 1e-5


def test_encode_parity(vae):
  model, cfg, params = vae
  pixels = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean = model.encode(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).latent_dist.mean
    ref = ((mean - model.config.shift_factor) * model.config.scaling_factor).numpy().transpose(0, 2, 3, 1)
  ours = jax.jit(lambda p, x: vae_lib.encode(p, x, cfg))(params, pixels)
  abs_err, rel_err = errors(ours, ref)
  print(f"[parity] vae encode mean (quant_conv={cfg.use_quant_conv}): max abs err {abs_err:.3g}, "
        f"max rel err {rel_err:.3g}")
  assert abs_err <= 2e-5 and rel_err <= 1e-5
