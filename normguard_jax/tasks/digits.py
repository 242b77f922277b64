"""The CPU default: a tiny class-conditional flow DiT over scikit-learn's 8x8 digits (configs/tiny_digits.py).

The reference is pretrained here with flow matching and cached with orbax (train/pretrain.py); conditioning
is the class label (label ``num_classes`` is the null label for CFG); images are the samples themselves.
"""

import os

import jax
import jax.numpy as jnp

from normguard_jax import config as config_lib
from normguard_jax.analysis import quality as quality_lib
from normguard_jax.analysis import report as report_lib
from normguard_jax.data import digits
from normguard_jax.models import dit
from normguard_jax.train import pretrain as pretrain_lib
from normguard_jax.train.logging import MetricWriter

QUALITY_LABELS = {"class_conf": "classifier confidence in prompted class (higher = better)",
                  "nn_dist": "distance to nearest real digit (lower = better)",
                  "frechet": "Fréchet distance to real digits, pixels (lower = better)",
                  "out_of_range": "fraction of pixels outside [-1, 1] (lower = better)"}


def model_config(cfg, lora_rank=0):
  rl = cfg.rl
  return dit.DiTConfig(**dict(cfg.model), lora_rank=lora_rank, lora_alpha=float(rl.lora_alpha),
                       lora_targets=tuple(config_lib.csv(rl.lora_targets)))


def apply_fn_for(model_cfg):
  def apply_fn(variables, x, t, cond, gate):
    return dit.velocity(variables, x, t, cond, cfg=model_cfg, lora_gate=gate)
  return apply_fn


class DigitsTask:
  name = "digits"
  quality_labels = QUALITY_LABELS
  lora_targets = dit.LORA_TARGETS

  def __init__(self, cfg):
    self.cfg = cfg
    self.images, self.labels = digits.load_digits()
    self._quality = None
    self.latent_shape = (cfg.model.image_size,) * 2 + (cfg.model.channels,)

  def model_config(self, lora_rank=0):
    return model_config(self.cfg, lora_rank)

  apply_fn = staticmethod(apply_fn_for)

  @staticmethod
  def init_lora(model_cfg, key):
    return dit.init(model_cfg, key)["lora"]

  def reference(self, workdir, guard=None):
    """Pretrain (or restore from the orbax cache) the reference DiT."""
    writer = MetricWriter(os.path.join(workdir, "runs", "pretrain"), enabled=jax.process_index() == 0)
    try:
      return pretrain_lib.load_or_pretrain(self.model_config(0), self.cfg.pretrain, self.images, self.labels,
                                           self.cfg.seed, writer, guard)
    finally:
      writer.close()

  def sample_prompts(self, key, n):
    return jax.random.randint(key, (n,), 0, self.cfg.model.num_classes), None

  def uncond(self, cond):
    return jnp.full_like(cond, self.cfg.model.num_classes)

  @staticmethod
  def decode(latents):
    return latents

  def eval_set(self):
    n = self.cfg.eval.samples_per_class
    return jnp.repeat(jnp.arange(self.cfg.model.num_classes, dtype=jnp.int32), n), None

  def eval_conditions(self):
    """The distinct held-out conditions (every class once) for the analysis commands; no prompt strings."""
    return jnp.arange(self.cfg.model.num_classes, dtype=jnp.int32), None

  @staticmethod
  def cfg_available():
    return True  # the null label

  @staticmethod
  def load_decoder():
    return None

  @staticmethod
  def place_decoder(sharding):
    del sharding  # no params

  @staticmethod
  def decoder():
    """Pixels are the samples: the identity as ``decode_fn(params, z)``, no params."""
    return (lambda params, z: z), None

  def quality(self, images, cond):
    if self._quality is None:
      self._quality = quality_lib.DigitQuality(seed=self.cfg.seed)
    return self._quality(images, cond)

  def real_quality(self, n):
    """The proxies' level on n real digits (the same set size as the eval set)."""
    return self.quality(self.images[:n], self.labels[:n])

  def sample_grid(self, images, cond, prompts, path, title):
    del prompts
    report_lib.sample_grid(images, cond, self.cfg.eval.grid_per_class, path, title)
