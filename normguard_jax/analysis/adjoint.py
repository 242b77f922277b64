"""Adjoint sensitivity of the reward to per-step velocity-magnitude rescaling (paper.md §2.4, §3.5).

Perturbed ODE rollout (Euler, t from 1 to 0):

    x_{k+1} = x_k + Δt_k (1 + ε_k) v(x_k, t_k, c),     Δt_k = t_{k+1} - t_k,     R = R(decode(x_K), c)

and per sample the sensitivity at ε = 0

    g_k = dR/dε_k = a_{k+1}^T Δt_k v_k,     a_{k+1} = dR/dx_{k+1}   (the adjoint, through the later steps,
                                                                     the decoder and the reward)

computed by one ``jax.vjp`` of the rollout (a lax.scan) with respect to ε of shape (K, B). Samples do not interact
in the model or the per-sample reward, so the cotangent of ones gives every sample's own dR_b/dε_{k,b} in one
backward pass (a batch-coupled reward would break this; the finite-difference check would then disagree).
``decode`` is the identity for the digits model and the task's VAE decoder for latent models (SD3, FLUX): the
adjoint then runs through the decoder too; its params are jit arguments, not constants.

Batch-level coherence per step (the paper's claim is that there is no coherent first-order signal):
mean, std, sign agreement (fraction of the batch whose sign equals the batch mean's), a one-sample t-test of
mean = 0 and an exact two-sided sign test of P(g > 0) = 1/2, each with Holm-Bonferroni correction over the K steps
(family-wise error rate alpha), and the same for the global scale s = Σ_k g_k (one scale factor on all steps).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from normguard_jax.analysis import common, sampling
from normguard_jax.analysis import workdir as workdir_lib
from normguard_jax.rewards.api import RewardBatch

log = logging.getLogger(__name__)


def identity_decode(x):
  return x


def scaled_rollout(eps, x1, grid, velocity_fn):
  """x_K of the ε-scaled Euler rollout; ``eps`` (K, B), ``velocity_fn(x, t) -> v`` with t of shape (B,)."""
  def body(x, inp):
    t, t_next, e = inp
    v = velocity_fn(x, jnp.full((x.shape[0],), t))
    scale = (1.0 + e).reshape((-1,) + (1,) * (x.ndim - 1))
    return x + (t_next - t) * scale * v, None
  x, _ = jax.lax.scan(body, x1, (grid[:-1], grid[1:], eps))
  return x


def reward_of_eps(eps, x1, cond, grid, velocity_fn, reward_fn, decode=identity_decode):
  """Per-sample total reward (B,) of the ε-scaled rollout."""
  x0 = scaled_rollout(eps, x1, grid, velocity_fn)
  total, _ = reward_fn(RewardBatch(decode(x0), cond))
  return total


def sensitivities(x1, cond, grid, velocity_fn, reward_fn, decode=identity_decode):
  """-> (R (B,), g (K, B)) with g[k, b] = dR_b / dε_{k,b} at ε = 0, by one VJP through the rollout."""
  eps0 = jnp.zeros((grid.shape[0] - 1, x1.shape[0]), jnp.float32)
  r, vjp = jax.vjp(lambda e: reward_of_eps(e, x1, cond, grid, velocity_fn, reward_fn, decode), eps0)
  (g,) = vjp(jnp.ones_like(r))
  return r, g


def finite_differences(reward_eps, num_steps, batch, *, h=1e-2, steps=None):
  """Central differences (R(ε_k = +h) - R(ε_k = -h)) / 2h per sample for the steps listed (all by default);
  ``reward_eps(eps (K, B)) -> (B,)``, e.g. a jitted :func:`reward_of_eps`. ε_k is perturbed for the whole batch
  at once, which is per sample exact because samples do not interact. Returns (len(steps), B).

  In fp32 the error is about h^2 |d^3R/dε^3| / 6 (truncation) + u |R| / h (rounding, u ~ 6e-8): when |dR/dε| is
  small (a barely trained model) a larger h is needed; the command reports several."""
  steps = list(range(num_steps)) if steps is None else list(steps)
  out = []
  for k in steps:
    e = jnp.zeros((num_steps, batch), jnp.float32)
    out.append((reward_eps(e.at[k].set(h)) - reward_eps(e.at[k].set(-h))) / (2.0 * h))
  return jnp.stack(out)


def relative_error(a, b):
  """||a - b|| / ||b|| over all entries."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def holm(pvals):
  """Holm-Bonferroni step-down adjusted p-values (controls the family-wise error rate)."""
  p = np.asarray(pvals, np.float64)
  m = len(p)
  order = np.argsort(p)
  adj = np.empty(m)
  running = 0.0
  for i, idx in enumerate(order):
    running = max(running, min(1.0, (m - i) * p[idx]))
    adj[idx] = running
  return adj


def _one(g):
  g = np.asarray(g, np.float64)
  n = g.size
  mean, std = float(g.mean()), float(g.std(ddof=1)) if n > 1 else 0.0
  sign = np.sign(mean)
  agree = float(np.mean(np.sign(g) == sign)) if sign != 0 else 0.0
  t_p = float(stats.ttest_1samp(g, 0.0).pvalue) if n > 1 and std > 0 else 1.0
  pos, nonzero = int(np.sum(g > 0)), int(np.sum(g != 0))
  s_p = float(stats.binomtest(pos, nonzero, 0.5).pvalue) if nonzero else 1.0
  return {"mean": mean, "std": std, "sem": std / np.sqrt(n) if n else 0.0,
          "t": mean / (std / np.sqrt(n)) if std > 0 else 0.0, "p_t": t_p, "sign_agreement": agree,
          "frac_positive": pos / n if n else 0.0, "p_sign": s_p,
          "mean_abs": float(np.abs(g).mean()), "coherence": abs(mean) / float(np.abs(g).mean()) if n else 0.0}


def coherence_stats(g, alpha=0.05):
  """``g`` (K, B) -> per-step stats (Holm-corrected over the K steps) and the global-scale stats.

  ``coherence`` = |mean g| / mean |g| (1: every sample agrees in sign, 0: full cancellation)."""
  g = np.asarray(g, np.float64)
  per = [_one(row) for row in g]
  for name in ("p_t", "p_sign"):
    adj = holm([s[name] for s in per])
    for s, a in zip(per, adj):
      s[name + "_holm"] = float(a)
  for s in per:
    s["coherent"] = bool(s["p_t_holm"] < alpha and s["p_sign_holm"] < alpha)
  glob = _one(g.sum(0))
  glob["coherent"] = bool(glob["p_t"] < alpha and glob["p_sign"] < alpha)
  n_coh = sum(s["coherent"] for s in per)
  return {"per_step": per, "global_scale": glob, "alpha": alpha, "correction": "Holm-Bonferroni over the K steps "
          "(per step: coherent = t-test AND sign test reject at alpha after correction)",
          "coherent_steps": n_coh, "num_steps": len(per), "batch": int(g.shape[1])}


def _compiled(apply, reward_fn, decode_fn, prompts, mesh=None):
  """Jitted (sensitivities, reward_of_eps) for one velocity function, taking the variables, the decoder params and
  the CFG input as arguments. ``prompts`` (static) reach prompt-aware rewards. With ``mesh`` (``--shard``) they are
  traced under the activation mesh (train/programs.sharded_jit)."""
  from normguard_jax.train import programs
  def vel(variables, cond, uncond, scale):
    return lambda x, t: sampling.guided(apply, variables, x, t, cond, scale, uncond)

  def reward_with_prompts(batch):
    return reward_fn(RewardBatch(batch.images, batch.cond, prompts))

  sens = programs.sharded_jit(lambda variables, dec, x1, cond, uncond, grid, scale: sensitivities(
      x1, cond, grid, vel(variables, cond, uncond, scale), reward_with_prompts, lambda z: decode_fn(dec, z)), mesh)
  rew = programs.sharded_jit(lambda variables, dec, eps, x1, cond, uncond, grid, scale: reward_of_eps(
      eps, x1, cond, grid, vel(variables, cond, uncond, scale), reward_with_prompts, lambda z: decode_fn(dec, z)),
      mesh)
  return sens, rew


def run(wd: workdir_lib.Workdir, out_dir, *, per_class=4, num_steps=None, cfg_scale=1.0, fd_steps=2,
        fd_h=(1e-1, 3e-2, 1e-2), alpha=0.05, include_reference=True):
  """Command body: sensitivities for the reference and every run on a held-out batch (key seed + 999), through the
  task's decoder and the job's reward; coherence statistics, a central finite-difference check on ``fd_steps``
  steps at each h in ``fd_h``; writes adjoint.json and adjoint.png. The reward must be differentiable (a JAX
  reward; a remote reward is not)."""
  cfg, task = wd.cfg, wd.task
  num_steps = int(num_steps or cfg.rollout.num_steps)
  grid = sampling.grid_for_task(task, cfg, num_steps)
  x1, cond, prompts = sampling.eval_inputs(task, cfg, per_class, seed_offset=999)
  uncond = task.uncond(cond) if cfg_scale != 1.0 else None
  x1, cond, uncond = wd.place(x1), wd.place(cond), wd.place(uncond)
  batch = int(x1.shape[0])
  reward_fn = common.reward_fn_for(cfg)
  decode_fn, dec_params = task.decoder()
  scale = jnp.float32(cfg_scale)
  prompts = tuple(prompts) if prompts is not None else None
  fd_h = [float(h) for h in np.atleast_1d(fd_h)]
  models = ([("reference", wd.ref_model_cfg, wd.ref_variables)] if include_reference else []) + [
      (r.name, r.model_cfg, r.variables) for r in wd.runs.values()]
  result = {"settings": {"num_steps": num_steps, "cfg_scale": float(cfg_scale), "batch": batch, "fd_h": fd_h,
                         "task": task.name, "decoder": "identity" if dec_params is None else "VAE",
                         "fd_steps": fd_steps, "alpha": alpha, "eval_key": "seed + 999 (held out)",
                         "definition": "g_k = dR/d eps_k at eps = 0 for x_{k+1} = x_k + dt_k (1 + eps_k) v_k"},
            "models": {}}
  fns = {}
  for name, mcfg, variables in tqdm(models, desc="adjoint", unit="model"):
    if mcfg not in fns:
      fns[mcfg] = _compiled(wd.velocity_apply(mcfg), reward_fn, decode_fn, prompts, wd.mesh)
    sens, rew = fns[mcfg]
    with jax.default_matmul_precision("highest"):
      r, g = common.host(sens(variables, dec_params, x1, cond, uncond, grid, scale))
      entry = {"reward": float(np.mean(r)), **coherence_stats(g, alpha)}
      if fd_steps:
        ks = np.unique(np.linspace(0, num_steps - 1, min(fd_steps, num_steps)).round().astype(int)).tolist()
        errs = {}
        for h in fd_h:
          fd = finite_differences(lambda e: rew(variables, dec_params, e, x1, cond, uncond, grid, scale), num_steps,
                                  batch, h=h, steps=ks)
          errs[f"{h:g}"] = relative_error(np.asarray(g)[ks], common.host(fd))
        entry["fd_check"] = {"steps": ks, "rel_error_by_h": errs, "rel_error": min(errs.values()),
                             "g_rms": float(np.sqrt(np.mean(np.square(np.asarray(g)[ks]))))}
    entry["g"] = np.asarray(g).tolist()
    result["models"][name] = entry
  common.write_json(f"{out_dir}/adjoint.json", result)
  if common.is_main():
    _plot(result, f"{out_dir}/adjoint.png")
  return result


def _plot(result, path):
  plt = common.plt()
  models = result["models"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for name, e in models.items():
    per = e["per_step"]
    k = np.arange(len(per))
    mean = np.array([s["mean"] for s in per]); sem = np.array([s["sem"] for s in per])
    line = axes[0].errorbar(k, mean, yerr=1.96 * sem, marker="o", ms=3, capsize=2, label=name)
    g = np.asarray(e["g"])
    axes[1].scatter(np.repeat(k, g.shape[1]) + 0.1 * np.random.RandomState(0).randn(g.size), g.reshape(-1),
                    s=3, alpha=0.4, color=line[0].get_color())
    axes[2].plot(k, [s["sign_agreement"] for s in per], marker="o", ms=3, label=name)
  axes[0].axhline(0, color="k", lw=0.8); axes[1].axhline(0, color="k", lw=0.8)
  axes[2].axhline(0.5, color="k", lw=0.8, ls=":")
  axes[0].set_title("batch mean dR/d eps_k (95% CI)", fontsize=9)
  axes[1].set_title("per-sample dR/d eps_k", fontsize=9)
  axes[2].set_title("sign agreement with the batch-mean sign", fontsize=9)
  for ax in axes:
    ax.set_xlabel("sampling step k (t = 1 -> 0)")
  axes[0].legend(fontsize=6); axes[2].set_ylim(0, 1.05)
  fig.suptitle(f"adjoint sensitivity to per-step velocity scaling (batch {result['settings']['batch']})", fontsize=9)
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
