"""AWM + NormGuard on FLUX.2-klein-base (paper.md §6.3: LoRA r64, 4 training timesteps over 70%, EMA KL 0.1,
8 steps with CFG 4.0, 384², lr 3e-4).

    python -m normguard_jax.train --config configs/flux2_klein_awm.py --workdir /data/runs/flux2_klein_awm \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

from normguard_jax.config import load_sibling


def get_config(arg=None):
  return load_sibling(__file__, "_flux").base_config("flux2", "awm", arg)
