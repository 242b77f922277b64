"""Text-to-image RL on SD3 / SD3.5 (configs/sd35_medium_*.py): the MMDiT in latent space, the VAE to pixels.

Conditioning is the dict {prompt_embeds (B, L, D), pooled (B, P)} of models/mmdit.py; the rest (data, CFG, decode
chunks, grids) is tasks/text_to_image.py. The recipes of paper.md §5-7 sample CFG-free (cfg_scale 1).
"""

import os

import jax.numpy as jnp
import numpy as np

from normguard_jax.convert.safetensors_io import read_config
from normguard_jax.convert import sd3 as sd3_convert, vae as vae_convert
from normguard_jax.models import mmdit, vae as vae_lib
from normguard_jax.tasks.text_to_image import TextToImageTask


def _runtime(m):
  return dict(scan_layers=bool(m.scan_layers), remat=bool(m.remat), remat_policy=m.remat_policy,
              attention_impl=m.attention_impl, dtype=m.dtype)


class SD3Task(TextToImageTask):
  name = "sd3"
  lora_targets = mmdit.LORA_TARGETS
  model_module = mmdit

  def __init__(self, cfg, text_len=None):
    super().__init__(cfg, text_len)
    m = cfg.model
    self._transformer_dir = self._component("transformer",
                                                               sd3_convert.CLASS_NAMES)
    self.base_cfg = sd3_convert.config_from_diffusers(read_config(self._transformer_dir),
                                                      **_runtime(m))
    self._vae_dir = self._component("vae", vae_convert.CLASS_NAMES)
    self.vae_cfg = vae_convert.config_from_diffusers(read_config(self._vae_dir), dtype=m.dtype)
    self._check_latents(self.vae_cfg.downsample_factor, self.base_cfg.patch_size, self.base_cfg.in_channels,
                        self.vae_cfg.latent_channels, max_grid=self.base_cfg.pos_embed_max_size)
    self._check_embeddings(self.base_cfg.joint_attention_dim, self.base_cfg.pooled_projection_dim)
    self.vae_decode = vae_lib.decode  # (params, z, vae_cfg) -> pixels

  def reference(self, workdir, guard=None):
    """The pretrained transformer (and the VAE for decoding), converted strictly from the diffusers files."""
    del workdir, guard
    m = self.cfg.model
    dtype = np.dtype(jnp.dtype(m.param_dtype))
    _, params = sd3_convert.load_transformer(self._transformer_dir, param_dtype=dtype, **_runtime(m))
    self.load_decoder()
    return params, {"weights_dir": os.path.abspath(m.weights_dir), "params": int(mmdit.param_count(params)),
                    "param_dtype": m.param_dtype}

  def abstract_example(self, text_len):
    """A zero dataset example of ``text_len`` tokens (77 CLIP + the T5 tokens in the SD3 layout)."""
    c = self.base_cfg
    return {"prompt": "", "prompt_embeds": np.zeros((text_len, c.joint_attention_dim), np.float32),
            "pooled": np.zeros((c.pooled_projection_dim,), np.float32)}

  def cond_from_examples(self, examples):
    return {"prompt_embeds": np.stack([e["prompt_embeds"] for e in examples]),
            "pooled": np.stack([e["pooled"] for e in examples])}
