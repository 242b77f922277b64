"""The CPU default: a tiny class-conditional flow DiT over scikit-learn's 8x8 digits (configs/tiny_digits.py).

The reference is pretrained here with flow matching and cached with orbax (train/pretrain.py); conditioning
is the class label (label ``num_classes`` is the null label for CFG); images are the samples themselves.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax import config as config_lib
from normguard_jax.analysis import quality as quality_lib
from normguard_jax.analysis import report as report_lib
from normguard_jax.data import digits
from normguard_jax.flow import schedules
from normguard_jax.models import dit
from normguard_jax.train import pretrain as pretrain_lib
from normguard_jax.train.logging import MetricWriter

QUALITY_LABELS = quality_lib.DIGIT_LABELS


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

  def latent_shape_at(self, resolution, field="eval.resolution"):
    if resolution not in (0, self.cfg.model.image_size):
      raise config_lib.ConfigError(f"config.{field}: the digits DiT samples {self.cfg.model.image_size}x"
                                   f"{self.cfg.model.image_size} images only")
    return self.latent_shape

  def sampling_grid(self, num_steps, resolution=0):
    """The sampling grid (rollouts, eval, analysis, training timesteps): ``rollout.grid`` kind, static shift."""
    del resolution
    r = self.cfg.rollout
    return np.asarray(schedules.sampling_grid(int(num_steps), float(r.shift), kind=r.get("grid", "linear")))

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

  @staticmethod
  def _proxies():
    """One fixed instrument for every run and seed (analysis/quality.py: an MLP on digits part B, never seen by the
    reward), fitted once per process."""
    return quality_lib.digit_quality(0)

  def quality(self, images, cond):
    return self._proxies()(images, cond)

  def quality_per_sample(self, images, cond):
    return self._proxies().per_sample(images, cond)

  def quality_aggregate(self, per_sample):
    return self._proxies().aggregate(per_sample)

  def quality_set_stats(self):
    return self._proxies().set_stats

  def real_quality(self, cond):
    """The proxies' level on real digits (part A, which the proxies never saw) with the eval set's classes and size."""
    return self._proxies().real_level(np.asarray(cond), draws=None)

  def sample_grid(self, images, cond, prompts, path, title):
    del prompts
    report_lib.sample_grid(images, cond, self.cfg.eval.grid_per_class, path, title)
