"""Registry of velocity-local base losses: ``loss(vel, batch, cfg) -> (scalar, metrics)``."""

from normguard_jax.rl.awm import awm_loss
from normguard_jax.rl.dpo import dpo_loss
from normguard_jax.rl.grpo import grpo_loss
from normguard_jax.rl.nft import nft_loss

BASE_LOSSES = {"nft": nft_loss, "awm": awm_loss, "dpo": dpo_loss, "grpo": grpo_loss}

# Which velocity branches each loss reads (the fused forward computes only these).
NEEDS_OLD = {"nft": True, "awm": False, "dpo": False, "grpo": False}


def needs_old(method, cfg):
  if method == "awm":
    return cfg.awm.ema_kl_beta > 0
  return NEEDS_OLD[method]
