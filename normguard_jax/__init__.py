"""normguard_jax: NormGuard (arXiv 2606.27771) for flow-matching RL post-training in JAX.

Conventions (DESIGN.md §1): t in [0, 1], t = 1 is pure noise, x_t = (1 - t) x0 + t eps,
velocity target u = eps - x0, x0_hat = x_t - t v. Velocity norms are per-sample L2 in float32.
"""

__version__ = "0.1.0"
