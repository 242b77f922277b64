"""Advantages, velocity-local base losses (NFT, AWM, DPO, GRPO) and the NormGuard hinge."""
