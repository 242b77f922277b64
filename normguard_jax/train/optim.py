"""The optax chain: [NormGuard lambda] -> clip_by_global_norm -> AdamW."""

import optax

from normguard_jax.rl import normguard as ng


def normguard_transform(lam_cfg):
  schedule = None
  if lam_cfg.kind == "schedule":
    schedule = optax.linear_schedule(0.0, lam_cfg.value, max(int(lam_cfg.warmup_steps), 1))
  return ng.normguard_lambda(lam_cfg.kind, lam_cfg.value, schedule=schedule, dual_lr=lam_cfg.dual_lr,
                             target=lam_cfg.target, lambda_max=lam_cfg.lambda_max,
                             excess=lam_cfg.get("excess", "hinge"))


def make_optimizer(rl_cfg, ng_cfg=None):
  """``ng_cfg`` None: no NormGuard (lambda reads 0). Otherwise its ``lam`` group configures lambda."""
  parts = [] if ng_cfg is None else [normguard_transform(ng_cfg.lam)]
  parts += [optax.clip_by_global_norm(rl_cfg.grad_clip),
            optax.adamw(rl_cfg.lr, b1=rl_cfg.b1, b2=rl_cfg.b2, weight_decay=rl_cfg.weight_decay)]
  return optax.chain(*parts)
