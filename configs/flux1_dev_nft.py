"""DiffusionNFT + NormGuard on FLUX.1-dev (LoRA r64/a128; CFG-free with embedded guidance 3.5, 512², 10 steps;
the NFT values of the FLUX.2-klein example, paper.md §5.3).

    python -m normguard_jax.train --config configs/flux1_dev_nft.py --workdir /data/runs/flux1_dev_nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  return load_sibling(__file__, "_flux").base_config("flux1", "nft", arg)
