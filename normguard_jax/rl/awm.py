"""Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050; official code, paper.md §6.2).

    l = mean (v - (eps - x0))^2,  log p = -w(l, t)          (weighting: uniform, t, t2, huber, ghuber)
    ratio = exp(log p - sg(log p)),  A' = adv_transform(A)
    L = mean max(-A' ratio, -A' clip(ratio, 1 - c, 1 + c)) + kl_beta mean (v - v_ref)^2 + ema_kl_beta mean (v - v_ema)^2

The ratio is taken against the stop-gradient of the current log-prob (on-policy, one update per
rollout batch), where the clip has no effect, as the AWM README notes; its gradient is A grad(log p).
"""

import jax
import jax.numpy as jnp

WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")
ADV_MODES = ("div5", "clamp")


def adv_transform(adv, mode="div5", *, adv_clip=None, adv_max=1.0):
  """The advantage that weights the AWM policy term.

  'div5' (official AWM, train_sd3_awm.py:1293-1299): clip(A, -c, c) / c * adv_max with c = ``adv_clip``
    (the reference's ``adv_clip_max``, default 5), i.e. A / 5 for |A| <= 5 at adv_max 1.
  'clamp' (Flow-Factory, trainers/awm.py:467-469): clamp(A, -c, c) with c = ``adv_clip`` (FF's
    ``adv_clip_range``, default 1.0), no rescaling; ``adv_max`` does not apply.
  For |A| <= 1 the 'clamp' policy term is 5x the 'div5' one.
  """
  if mode == "div5":
    c = 5.0 if adv_clip is None else adv_clip
    return jnp.clip(adv, -c, c) / c * adv_max
  if mode == "clamp":
    c = 1.0 if adv_clip is None else adv_clip
    return jnp.clip(adv, -c, c)
  raise ValueError(f"unknown AWM adv_mode {mode!r}; expected one of {ADV_MODES}")


def awm_log_prob(l, t, weighting="ghuber", p=0.25):
  """The AWM surrogate log p = -w(l, t) for per-sample squared error l (computed in float32 here)."""
  if weighting == "uniform":
    return -l
  if weighting == "t":
    return -t * l
  if weighting == "t2":
    return -t * t * l
  if weighting == "huber":
    return -t * (jnp.sqrt(l + 1e-10) - 1e-5)
  if weighting == "ghuber":
    return -t * ((l + 1e-10) ** p - 1e-10 ** p) / p
  raise ValueError(f"unknown AWM weighting {weighting!r}; expected one of {WEIGHTINGS}")


def awm_loss(vel, batch, cfg):
  """``batch``: x0, eps, t, adv. ``cfg``: weighting, ghuber_p, clip_range, adv_max, kl_beta, ema_kl_beta, and
  optionally adv_mode ('div5' when absent) and adv_clip (5 for 'div5', 1 for 'clamp' when absent); see
  :func:`adv_transform`."""
  v = vel.policy.astype(jnp.float32)
  u = batch["eps"] - batch["x0"]
  axes = tuple(range(1, v.ndim))
  l = jnp.mean(jnp.square(v - u), axis=axes)
  logp = awm_log_prob(l, batch["t"], cfg.weighting, cfg.ghuber_p)
  ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
  adv = adv_transform(batch["adv"], cfg.get("adv_mode", "div5"), adv_clip=cfg.get("adv_clip", None),
                      adv_max=cfg.adv_max)
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
  policy_loss = jnp.mean(jnp.maximum(-adv * ratio, -adv * clipped))
  kl = jnp.mean(jnp.mean(jnp.square(v - vel.ref.astype(jnp.float32)), axis=axes))
  loss = policy_loss + cfg.kl_beta * kl
  metrics = {"policy_loss": policy_loss, "kl_ref": kl, "fm_error": jnp.mean(l)}
  if cfg.ema_kl_beta > 0:
    ema_kl = jnp.mean(jnp.mean(jnp.square(v - vel.old.astype(jnp.float32)), axis=axes))
    loss = loss + cfg.ema_kl_beta * ema_kl
    metrics["kl_ema"] = ema_kl
  return loss, metrics
