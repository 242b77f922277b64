"""Text-to-image RL on FLUX.1 and FLUX.2-klein (configs/flux*_*.py): the same loop, train step and NormGuard as
SD3; only the velocity model, the conditioning and the VAE differ.

* Transformer: ``FluxTransformer2DModel`` or ``Flux2Transformer2DModel`` (models/flux.py, by ``_class_name``),
  NHWC latents with in_channels / 4 channels (2x2 packing inside the model).
* Conditioning: FLUX.1 {prompt_embeds, pooled, guidance}, FLUX.2 {prompt_embeds[, guidance]}; ``guidance`` is
  ``model.guidance`` (the distilled-guidance scale) on every row, for models that embed it.
* Sampling grid: the resolution-dependent time shift mu of diffusers' ``calculate_shift`` (flow/schedules.py)
  from the number of image tokens; ``rollout.shift`` is unused.
* VAE: FLUX.1 uses the 16-channel AutoencoderKL (models/vae.py, FLUX's scaling and shift factors). FLUX.2's
  ``AutoencoderKLFlux2`` is used when models/vae.py provides it (``decode_flux2``); otherwise the task says so.
"""

import os

import jax.numpy as jnp
import numpy as np

from normguard_jax import config as config_lib
from normguard_jax.convert.safetensors_io import read_config
from normguard_jax.convert import flux as flux_convert, vae as vae_convert
from normguard_jax.flow import schedules
from normguard_jax.models import flux, vae as vae_lib
from normguard_jax.tasks.text_to_image import TextToImageTask


def _runtime(m):
  return dict(scan_layers=bool(m.scan_layers), remat=bool(m.remat), attention_impl=m.attention_impl, dtype=m.dtype)


class FluxTask(TextToImageTask):
  name = "flux"
  model_module = flux
  lora_targets = tuple(sorted(set(flux.FLUX1_LORA_TARGETS) | set(flux.FLUX2_LORA_TARGETS)))

  def __init__(self, cfg, text_len=None):
    super().__init__(cfg, text_len)
    m = cfg.model
    self._transformer_dir = self._component("transformer",
                                                                flux_convert.CLASS_NAMES)
    self.base_cfg = flux_convert.config_from_diffusers(read_config(self._transformer_dir), **_runtime(m))
    self.flux2 = isinstance(self.base_cfg, flux.Flux2Config)
    allowed = flux.FLUX2_LORA_TARGETS if self.flux2 else flux.FLUX1_LORA_TARGETS
    bad = set(config_lib.csv(cfg.rl.lora_targets)) - set(allowed)
    if bad:
      raise config_lib.ConfigError(f"config.rl.lora_targets: {sorted(bad)} are not {self.base_cfg.class_name} "
                                   f"targets; expected some of {allowed}")
    self._vae_dir = self._component("vae", vae_convert.CLASS_NAMES)
    vae_config = read_config(self._vae_dir)
    self.vae_cfg = vae_convert.config_from_diffusers(vae_config, dtype=m.dtype)
    if self.flux2 and not hasattr(vae_lib, "decode_flux2"):
      raise config_lib.ConfigError("FLUX.2's AutoencoderKLFlux2 decoder is not ported in this build")
    decode = vae_lib.decode_flux2 if self.flux2 else vae_lib.decode
    factor = self.vae_cfg.downsample_factor
    self._check_latents(factor, 2, self.base_cfg.latent_channels, getattr(
        self.vae_cfg, "transformer_latent_channels", self.vae_cfg.latent_channels))
    self._check_embeddings(self.base_cfg.joint_attention_dim, None if self.flux2 else self.base_cfg.pooled_projection_dim)
    if cfg.rollout.get("grid", "linear") != "linear":
      raise config_lib.ConfigError("config.rollout.grid: the FLUX pipelines sample on linspace(1, 1/K, K) with the "
                                   "resolution-dependent mu ('linear'); 'diffusers' is SD3's scheduler default")
    self.vae_decode = decode  # (params, z, vae_cfg) -> pixels

  def grid_mu(self, num_steps, resolution=0):
    """The time shift mu at this resolution (default: model.resolution): FLUX.1 ``calculate_shift``
    (FluxPipeline), FLUX.2-klein ``compute_empirical_mu`` (Flux2KleinPipeline), which also depends on the steps."""
    h, w = (self.latent_shape_at(resolution) if resolution else self.latent_shape)[:2]
    seq = (h // 2) * (w // 2)
    return float(schedules.flux2_empirical_mu(seq, int(num_steps)) if self.flux2 else schedules.flux_mu(seq))

  def sampling_grid(self, num_steps, resolution=0):
    """FluxPipeline / Flux2KleinPipeline's grid: linspace(1, 1/K, K) shifted by mu, then 0."""
    return np.asarray(schedules.sampling_grid(int(num_steps), mu=self.grid_mu(num_steps, resolution)))

  def reference(self, workdir, guard=None):
    del workdir, guard
    m = self.cfg.model
    dtype = np.dtype(jnp.dtype(m.param_dtype))
    _, params = flux_convert.load_transformer(self._transformer_dir, param_dtype=dtype, **_runtime(m))
    self.load_decoder()
    return params, {"weights_dir": os.path.abspath(m.weights_dir), "params": int(flux.param_count(params)),
                    "param_dtype": m.param_dtype, "family": self.base_cfg.class_name,
                   "mu": self.grid_mu(self.cfg.rollout.num_steps)}

  def abstract_example(self, text_len):
    """A zero dataset example of ``text_len`` text tokens (FLUX.2-klein: no pooled vector)."""
    c = self.base_cfg
    pooled = np.zeros((0,) if self.flux2 else (c.pooled_projection_dim,), np.float32)
    return {"prompt": "", "prompt_embeds": np.zeros((text_len, c.joint_attention_dim), np.float32), "pooled": pooled}

  def cond_from_examples(self, examples):
    cond = {"prompt_embeds": np.stack([e["prompt_embeds"] for e in examples])}
    if not self.flux2:
      cond["pooled"] = np.stack([e["pooled"] for e in examples])
    if self.base_cfg.guidance_embeds:
      cond["guidance"] = np.full((len(examples),), float(self.cfg.model.guidance), np.float32)
    return cond
