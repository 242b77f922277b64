"""DiffusionNFT + NormGuard on SD3.5-Medium (paper.md §5.3, Flow-Factory examples/nft/lora/sd3_5).

NFT: beta 1, old policy = EMA (ramp 0.001, max 0.5) used for sampling, 4 training timesteps in the noisier half
(timestep_fraction 0.5), group 16 x 48 prompts, lr 1e-4, per-group std (global_std False).

    python -m normguard_jax.train --config configs/sd35_medium_nft.py --workdir /data/runs/nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "_sd35_medium").base_config("nft", arg)
  c.rl.lr = 1e-4
  c.rl.num_train_timesteps = 4
  c.rl.timestep_fraction = 0.5
  c.rl.global_std = False
  return c
