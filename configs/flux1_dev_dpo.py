"""Flow Diffusion-DPO + NormGuard on FLUX.1-dev (LoRA r64/a128; DPO values of paper.md §7).

    python -m normguard_jax.train --config configs/flux1_dev_dpo.py --workdir /data/runs/flux1_dev_dpo \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  return load_sibling(__file__, "_flux").base_config("flux1", "dpo", arg)
