"""Text-to-image RL on SD3 / SD3.5 (configs/sd35_medium_*.py): the MMDiT in latent space, the VAE to pixels.

Everything comes from local files given in the config; nothing is downloaded:
  * ``model.weights_dir``: a diffusers SD3/SD3.5 pipeline snapshot (``transformer/`` and ``vae/``), converted on
    load by the strict converters (convert/sd3.py, convert/vae.py); the transformer is the frozen reference.
  * ``data.embeddings_dir``: prompt embeddings written offline by ``python -m normguard_jax.data.encode_prompts``
    (a tfds array_record dataset); the trainer never runs a text encoder. Each example carries its prompt text,
    which prompt-aware rewards (PickScore, remote judges) receive.

Conditioning is the dict {prompt_embeds (B, L, D), pooled (B, P)} of models/mmdit.py. Sampling is CFG-free, as in
the recipes of paper.md §5-7 (NFT, AWM and DPO on SD3.5-M use CFG 1.0); the config refuses cfg_scale != 1.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config as config_lib
from normguard_jax.convert import sd3 as sd3_convert, vae as vae_convert
from normguard_jax.data import text_embeddings
from normguard_jax.models import mmdit, vae as vae_lib


def _runtime(m):
  return dict(scan_layers=bool(m.scan_layers), remat=bool(m.remat), remat_policy=m.remat_policy,
              attention_impl=m.attention_impl, dtype=m.dtype)


class SD3Task:
  name = "sd3"
  quality_labels = {}  # no proxies in the trainer: held-out evaluation is normguard_jax.analysis's job
  lora_targets = mmdit.LORA_TARGETS

  def __init__(self, cfg):
    self.cfg = cfg
    m = cfg.model
    self._transformer_dir = sd3_convert.resolve_component_dir(m.weights_dir, "transformer",
                                                               sd3_convert.CLASS_NAMES)
    self.base_cfg = sd3_convert.config_from_diffusers(sd3_convert.read_config(self._transformer_dir),
                                                      **_runtime(m))
    self.vae_cfg, self._vae_params = None, None
    self._vae_dir = vae_convert.resolve_component_dir(m.weights_dir, "vae", vae_convert.CLASS_NAMES)
    self.vae_cfg = vae_convert.config_from_diffusers(vae_convert.read_config(self._vae_dir), dtype=m.dtype)
    f = self.vae_cfg.downsample_factor
    if m.resolution % (f * self.base_cfg.patch_size):
      raise config_lib.ConfigError(f"config.model.resolution: {m.resolution} is not a multiple of "
                                   f"{f * self.base_cfg.patch_size} (VAE factor x patch size)")
    if self.vae_cfg.latent_channels != self.base_cfg.in_channels:
      raise config_lib.ConfigError(f"{m.weights_dir}: the VAE has {self.vae_cfg.latent_channels} latent channels "
                                   f"but the transformer takes {self.base_cfg.in_channels}")
    self.latent_shape = (m.resolution // f, m.resolution // f, self.base_cfg.in_channels)
    self.data = text_embeddings.load_text_embeddings(cfg.data.embeddings_dir, cfg.data.split)
    self.eval_data = (text_embeddings.load_text_embeddings(cfg.data.embeddings_dir, cfg.data.eval_split)
                      if cfg.data.eval_split else self.data)
    l, d = self.data.prompt_embeds_shape
    if d != self.base_cfg.joint_attention_dim or self.data.pooled_shape != (self.base_cfg.pooled_projection_dim,):
      raise config_lib.ConfigError(
          f"config.data.embeddings_dir: embeddings {self.data.prompt_embeds_shape} / pooled {self.data.pooled_shape} "
          f"do not fit the transformer (joint_attention_dim {self.base_cfg.joint_attention_dim}, pooled "
          f"{self.base_cfg.pooled_projection_dim}); encode the prompts with this model's text encoders")
    self._decode = jax.jit(lambda params, z: vae_lib.decode(params, z, self.vae_cfg))

  def model_config(self, lora_rank=0):
    rl = self.cfg.rl
    return dataclasses.replace(self.base_cfg, lora_rank=lora_rank, lora_alpha=float(rl.lora_alpha),
                               lora_targets=tuple(config_lib.csv(rl.lora_targets)))

  @staticmethod
  def apply_fn(model_cfg):
    def apply_fn(variables, x, t, cond, gate):
      return mmdit.velocity(variables, x, t, cond, cfg=model_cfg, lora_gate=gate)
    return apply_fn

  @staticmethod
  def init_lora(model_cfg, key):
    return mmdit.init_lora(model_cfg, key)

  def reference(self, workdir, guard=None):
    """The pretrained transformer (and the VAE for decoding), converted strictly from the diffusers files."""
    del workdir, guard
    m = self.cfg.model
    dtype = np.dtype(jnp.dtype(m.param_dtype))
    _, params = sd3_convert.load_transformer(self._transformer_dir, param_dtype=dtype, **_runtime(m))
    _, self._vae_params = vae_convert.load_vae(self._vae_dir, param_dtype=dtype, dtype=m.dtype)
    n = mmdit.param_count(params)
    return params, {"weights_dir": os.path.abspath(m.weights_dir), "params": int(n), "param_dtype": m.param_dtype}

  @staticmethod
  def _stack(examples):
    cond = {"prompt_embeds": jnp.asarray(np.stack([e["prompt_embeds"] for e in examples])),
            "pooled": jnp.asarray(np.stack([e["pooled"] for e in examples]))}
    return cond, [e["prompt"] for e in examples]

  def sample_prompts(self, key, n):
    """n prompts drawn uniformly (with replacement only when the set is smaller than n), from the key alone:
    the data position is the iteration, so a resumed run draws the same prompts."""
    size = len(self.data)
    idx = np.asarray(jax.random.choice(key, size, (n,), replace=n > size))
    return self._stack(self.data.__getitems__(idx.tolist()))

  def uncond(self, cond):
    raise NotImplementedError("CFG (rollout.cfg_scale != 1) is not supported for text tasks in this release")

  def decode(self, latents):
    if self._vae_params is None:
      raise RuntimeError("decode() before reference(): the VAE params are loaded with the reference")
    return self._decode(self._vae_params, latents)

  def eval_set(self):
    n = min(int(self.cfg.eval.num_prompts), len(self.eval_data))
    return self._stack(self.eval_data.__getitems__(list(range(n))))

  @staticmethod
  def quality(images, cond):
    del images, cond
    return {}

  @staticmethod
  def real_quality(n):
    del n
    return {}

  def sample_grid(self, images, cond, prompts, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    del cond
    images = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)[: self.cfg.eval.grid_images]
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.2, rows * 2.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
      ax.axis("off")
      if i < len(images):
        ax.imshow(images[i])
        if prompts is not None:
          ax.set_title(prompts[i][:40], fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
