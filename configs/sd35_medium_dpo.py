"""Flow Diffusion-DPO + NormGuard on SD3.5-Medium (paper.md §7, Flow-Factory examples/dpo).

DPO: beta 100, best/worst pair per group of 4, one logit-normal training t per pair, lr 1e-5 (1e-4 and 3e-4
collapse per Flow-Factory). Flow-Factory samples DPO rollouts with 40 steps; this recipe keeps the 10-step
rollouts of the others (--config.rollout.num_steps=40 to match it).

    python -m normguard_jax.train --config configs/sd35_medium_dpo.py --workdir /data/runs/dpo \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "_sd35_medium").base_config("dpo", arg)
  c.rl.lr = 1e-5
  c.rl.num_train_timesteps = 1
  c.rl.global_std = False
  c.rollout.group_size = 4
  c.rl.num_microbatches = 4
  return c
