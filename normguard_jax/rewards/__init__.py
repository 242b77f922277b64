"""Reward API: ``reward(images, cond) -> (B,) scores``, jittable; combined with weights (rewards/api.py)."""
