"""DiffusionNFT + NormGuard on FLUX.2-klein-base (paper.md §5.3: LoRA r64/a128, nft_beta 0.1, 2 training
timesteps, 384², 8 steps with CFG 4.0, lr 1e-4).

    python -m normguard_jax.train --config configs/flux2_klein_nft.py --workdir /data/runs/flux2_klein_nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  return load_sibling(__file__, "_flux").base_config("flux2", "nft", arg)
