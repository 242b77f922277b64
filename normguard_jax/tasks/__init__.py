"""What the RL loop trains: the model, its conditioning data, the decoder to pixels and the quality proxies.

The loop (train/loop.py) is the same for every task (DESIGN.md §4: "only the config differs"); ``config.task``
picks one of :data:`TASKS`. A task provides, with conditioning ``cond`` as any pytree with a leading row axis:

  model_config(lora_rank) / apply_fn(model_cfg) / init_lora(model_cfg, key)   the velocity model
  reference(workdir, guard) -> (params, info)                                 the frozen reference params
  sample_prompts(key, n) -> (cond, prompts or None)                           n prompts (before grouping)
  uncond(cond)                                                                null conditioning for CFG
  decode(latents) -> images in [-1, 1]                                        jittable
  eval_set() -> (cond, prompts)                                               the fixed eval prompts
  quality(images, cond) -> {name: float}; quality_labels; real_quality(n)     proxies the reward does not see
  sample_grid(images, cond, prompts, path, title)                             a PNG of samples

and, for the analysis commands (normguard_jax.analysis), which read a finished workdir:

  eval_conditions() -> (cond, prompts)            the distinct held-out conditions (classes, eval prompts)
  cfg_available() -> bool                         whether uncond() can run (a negative prompt on disk)
  decoder() -> (decode_fn(params, z), params)     the decoder as a pure, differentiable function (adjoint)
  place_decoder(sharding)                         put the decoder params there (analysis on a mesh)
  use_mesh(mesh)                                  latent tasks: decode with the rows split over the mesh
"""

import importlib

TASKS = {"digits": "normguard_jax.tasks.digits:DigitsTask", "sd3": "normguard_jax.tasks.sd3:SD3Task",
         "flux": "normguard_jax.tasks.flux:FluxTask"}


def task_class(name):
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
  module, _, cls = TASKS[name].partition(":")
  return getattr(importlib.import_module(module), cls)


def make_task(cfg, text_len=None):
  """The config's task. ``text_len``: a text-to-image task without data, for ahead-of-time compilation."""
  cls = task_class(cfg.get("task", "digits"))
  return cls(cfg) if text_len is None else cls(cfg, text_len=text_len)
