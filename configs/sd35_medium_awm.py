"""AWM + NormGuard on SD3.5-Medium (paper.md §6, Flow-Factory examples/awm/lora/sd3_5).

AWM: ghuber weighting (p 0.25), clip range 1, advantages clipped to [-1, 1], KL to the reference 1e-4 and to the
EMA 1.0, 6 training timesteps over 90% of the trajectory, group 16 x 48 prompts, lr 3e-4, global std.

    python -m normguard_jax.train --config configs/sd35_medium_awm.py --workdir /data/runs/awm \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "_sd35_medium").base_config("awm", arg)
  c.rl.lr = 3e-4
  c.rl.num_train_timesteps = 6
  c.rl.timestep_fraction = 0.9
  c.rl.global_std = True
  c.rl.num_microbatches = 24
  return c
