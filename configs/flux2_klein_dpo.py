"""Flow Diffusion-DPO + NormGuard on FLUX.2-klein-base (DPO values of paper.md §7, which has no FLUX example:
beta 100, group 4, lr 1e-5; sampling as the other klein recipes).

    python -m normguard_jax.train --config configs/flux2_klein_dpo.py --workdir /data/runs/flux2_klein_dpo \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  return load_sibling(__file__, "_flux").base_config("flux2", "dpo", arg)
