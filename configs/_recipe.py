"""What every text-to-image recipe shares: its variants (``path.py:a,b``) and the ``smoke`` dry run.

Variants are a comma list after the recipe path, applied in the recipe's own order whatever the order given, e.g.
``configs/sd35_medium_nft.py:official,smoke``. ``smoke`` shrinks a recipe to a one-minute run on a tiny random
snapshot (``python -m normguard_jax.tools.tiny_snapshot OUT --family sd35|flux1|flux2-klein --pickscore PS``) and
keeps the recipe's mechanisms: grid, solver, step counts, timestep rule, advantages, EMA schedules, CFG in the
training forward, updates per iteration and the evaluation policy, so the smoke runs the recipe's code paths. It still
needs the user's paths: ``model.weights_dir`` (the tiny snapshot), ``data.embeddings_dir`` (its encoded prompts;
``data.negative_dir`` too for the CFG recipes) and ``reward.options.pickscore.model_dir`` (the tiny PickScore).
"""

import math

from normguard_jax.config import ConfigError


def select_variants(arg, allowed, recipe_file):
  """The set of variant names in ``arg`` ('' / None: none). Otherwise a ConfigError (a ValueError: the CLI exits 2)
  that names the allowed ones."""
  names = [s.strip() for s in str(arg or "").split(",") if s.strip()]
  bad = [n for n in names if n not in allowed]
  if bad:
    raise ConfigError(f"unknown variant(s) {bad} for {recipe_file}; allowed: {list(allowed)} (a comma list, e.g. "
                      f"{recipe_file}:{','.join(allowed)})")
  return set(names)


def smoke(c):
  """The ``smoke`` variant, in place: 32 px float32 images without remat, 2 prompts x group 4 (DPO's group is 4),
  2 iterations, evaluation every 2 on 2 prompts at the training resolution, LoRA r4/a8, microbatches and shared
  timestep draws that divide the tiny batches, any T5 length, a checkpoint every 2 iterations, one device."""
  c.model.resolution = 32  # the tiny snapshots take multiples of 4
  c.model.dtype = c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.decode_batch = 0
  c.eval.resolution = 0
  r, rl = c.rollout, c.rl
  r.prompts_per_iter, r.group_size, r.chunk = 2, 4, 0
  rows = r.prompts_per_iter * r.group_size
  if rl.timestep_share_rows:
    rl.timestep_share_rows = math.gcd(int(rl.timestep_share_rows), rows)
  if c.dpo.t_share_pairs:
    c.dpo.t_share_pairs = math.gcd(int(c.dpo.t_share_pairs), r.prompts_per_iter * rl.num_train_timesteps)
  rl.iterations = 2
  rl.lora_rank, rl.lora_alpha = 4, 8.0
  half = (r.prompts_per_iter if rl.methods == "dpo" else rows) * rl.num_train_timesteps // rl.updates_per_iter
  rl.num_microbatches = 2 if half % 2 == 0 else 1  # train rows (per half for DPO) of one update
  c.eval.every, c.eval.num_prompts, c.eval.grid_images = 2, 2, 2
  c.eval.ema_every = min(int(c.eval.ema_every), 2)  # the evaluation EMA still updates within the 2 iterations
  c.data.max_sequence_length = 0  # the tiny snapshots' encoders use diffusers' default lengths
  c.checkpoint.every = 2
  c.mesh.num_devices = 1  # a single-device dry run on any host (--config.mesh.num_devices=0 for all)
  return c
