"""Held-out evaluation of the reference and every run of a workdir (paper.md §2.6: gains "amplify under few-step
inference"; §3.3: the norm diagnostics).

For each model and each setting (number of Euler steps: the training count, few-step 4 and 8, many-step 50; CFG
off (scale 1) and on (``--cfg-scale``)), on held-out noise and conditions (every class for digits, the eval prompts
for text tasks; noise key seed + 777, not the training loop's eval key):

* reward (total and terms) and the quality proxies of analysis/quality.py on the policy's own ODE samples, decoded
  by the task (the VAE for latent models);
* rho_k = ||v_theta(x_k)|| / ||v_ref(x_k)|| on the policy's own trajectory and on the reference's trajectory
  (the two readings of paper.md §3.3), their means, the mean inflation mean_k,b(rho) - 1, and cos(v_theta, v_ref);

plus NormGuard's hinge statistics over training from ``runs/<name>/metrics.jsonl`` (every ``train/ng_*`` key the
trainer writes: ng_active_frac, ng_lambda, ng_mean_rho, ng_penalty, ng_share, ng_excess; and rollout_mean_rho,
reward_mean): overall mean, mean over the first and last tenth of training, and the last value.
"""

import logging
import os

import numpy as np
from tqdm.auto import tqdm

from normguard_jax.analysis import common, sampling
from normguard_jax.analysis import workdir as workdir_lib

log = logging.getLogger(__name__)

HINGE_KEYS = ("ng_active_frac", "ng_lambda", "ng_mean_rho", "ng_penalty", "ng_share", "ng_excess",
              "rollout_mean_rho", "reward_mean")


def hinge_statistics(rows):
  """Summaries of the ``train/`` hinge keys in metrics.jsonl rows: {key: {mean, first_10pct, last_10pct, last,
  n}} plus the series ({key: [[step, value], ...]}) for plotting."""
  series = {}
  for row in rows:
    for k, v in row.items():
      if not k.startswith("train/") or not isinstance(v, (int, float)):
        continue
      name = k[len("train/"):]
      if name.startswith("ng_") or name in HINGE_KEYS:
        series.setdefault(name, []).append((int(row["step"]), float(v)))
  summary = {}
  for k, s in series.items():
    s.sort()
    vals = np.array([v for _, v in s])
    tenth = max(1, len(vals) // 10)
    summary[k] = {"mean": float(np.nanmean(vals)), "first_10pct": float(np.nanmean(vals[:tenth])),
                  "last_10pct": float(np.nanmean(vals[-tenth:])), "last": float(vals[-1]), "n": int(len(vals))}
  return summary, {k: [list(p) for p in s] for k, s in series.items()}


def _norm_stats(ro, prefix):
  ro = common.host({k: ro[k] for k in ("rho", "cos", "norm", "norm_ref")})
  rho = np.asarray(ro["rho"], np.float64)
  return {f"{prefix}rho_per_step": rho.mean(1).tolist(), f"{prefix}mean_rho": float(rho.mean()),
          f"{prefix}inflation": float(rho.mean() - 1.0), f"{prefix}max_step_rho": float(rho.mean(1).max()),
          f"{prefix}cos_per_step": common.per_step(ro["cos"]),
          f"{prefix}norm_per_step": common.per_step(ro["norm"]),
          f"{prefix}norm_ref_per_step": common.per_step(ro["norm_ref"])}


def save_samples(path, images, cond, prompts):
  """The headline setting's samples as .npz: ``images`` uint8 (B, H, W, C), ``prompts`` (text tasks) or ``labels``
  (digits). Every model's file holds the same held-out noise and conditions row by row, so two files are a paired
  set for the MLLM judge (``python -m normguard_jax.analysis.judge --images A.npz --pairwise B.npz``)."""
  from normguard_jax.rewards import http
  os.makedirs(os.path.dirname(path), exist_ok=True)
  extra = {"prompts": np.asarray(prompts, dtype=str)} if prompts is not None else {}
  if prompts is None and np.ndim(cond) == 1:
    extra["labels"] = common.host(cond)
  np.savez_compressed(path, images=http.to_uint8(common.host(images)), **extra)
  return path


def quality_labels(task, quality):
  """The quality-proxy names (and meanings) this evaluation reports: none without a quality function."""
  from normguard_jax.analysis import quality as quality_lib
  return quality_lib.labels_for(task) if quality is not None else {}


def settings_for(cfg, steps=None, cfg_scales=None):
  train_steps = int(cfg.rollout.num_steps)
  steps = sorted({train_steps, 4, 8, 50} if steps is None else {int(s) for s in steps})
  scales = [1.0, 3.0] if cfg_scales is None else [float(c) for c in cfg_scales]
  return [(s, c) for c in scales for s in steps], train_steps


def run(wd: workdir_lib.Workdir, out_dir, *, per_class=10, steps=None, cfg_scales=None, quality=None,
        reference_trajectory=True, require_cfg=False):
  """Command body: writes evaluate.json, evaluate.png (reward/quality against steps), evaluate_rho.png (rho_k on
  own and reference trajectories at the training step count) and evaluate_hinge.png (hinge stats over training).

  ``per_class``: samples per held-out condition. CFG-on settings need the task's unconditional input; a text task
  without the negative prompt's embeddings on disk skips them (recorded under settings.cfg_skipped) unless
  ``require_cfg``, when that is an error."""
  cfg, task = wd.cfg, wd.task
  settings, train_steps = settings_for(cfg, steps, cfg_scales)
  x1, cond, prompts = sampling.eval_inputs(task, cfg, per_class)
  x1, cond = wd.place(x1), wd.place(cond)
  uncond, skipped = None, None
  if any(c != 1.0 for _, c in settings):
    if task.cfg_available():
      uncond = wd.place(task.uncond(common.host(cond)))
    elif require_cfg:
      task.uncond(cond)  # raises the task's error, which names the missing files
    else:
      skipped = ("the negative prompt's embeddings (data.negative_dir / data.negative_split) are not on disk; "
                 "write them with encode_prompts to evaluate with CFG")
      log.warning("evaluate: CFG-on settings skipped: %s", skipped)
      settings = [(s, c) for s, c in settings if c == 1.0]
  reward_fn = common.reward_fn_for(cfg)
  ref_apply = wd.velocity_apply(wd.ref_model_cfg)
  models = [("reference", ref_apply, wd.ref_variables, None)] + [
      (r.name, wd.velocity_apply(r.model_cfg), r.variables, r) for r in wd.runs.values()]
  rows = int(x1.shape[0])
  held_out = getattr(task, "held_out", None)  # digits: None (every class); text tasks: a held-out split is in use
  if held_out is False:
    log.warning("evaluate: the eval prompts are TRAINING prompts (no held-out split); add a `test` split with "
                "encode_prompts --split test, or pass --set data.eval_embeddings_dir=DIR / data.eval_split=SPLIT")
  result = {"settings": {"steps": sorted({s for s, _ in settings}), "cfg_scales": sorted({c for _, c in settings}),
                         "train_steps": train_steps, "shift": float(cfg.rollout.shift),
                         "mu": sampling.task_mu(task, train_steps), "task": task.name, "samples": rows,
                         "per_condition": int(per_class), "eval_key": "seed + 777 (held out)",
                         "held_out_prompts": held_out,
                         "cfg_skipped": skipped, "quality_labels": quality_labels(task, quality)},
            "models": {}}
  steps_done, scales_done = result["settings"]["steps"], result["settings"]["cfg_scales"]
  headline = (min(steps_done, key=lambda s: abs(s - train_steps)),
              float(cfg.rollout.cfg_scale) if float(cfg.rollout.cfg_scale) in scales_done else 1.0)
  result["settings"]["headline"] = f"{headline[0]}steps_cfg{headline[1]:g}"
  result["settings"]["samples_dir"] = os.path.join(out_dir, "samples")
  jobs = [(m, s) for m in models for s in settings]
  for (name, apply, variables, run_model), (num_steps, scale) in tqdm(jobs, desc="evaluate", unit="setting"):
    grid = sampling.grid_for_task(task, cfg, num_steps)
    kw = dict(policy_apply=apply, ref_apply=ref_apply, cfg_scale=scale, uncond=uncond, mesh=wd.mesh,
              solver=sampling.analysis_solver(cfg))
    ro = sampling.paired_sample_jit(variables, wd.ref_variables, x1, cond, grid, drive="policy", **kw)
    images = task.decode(ro["x0"])
    e = {"num_steps": num_steps, "cfg_scale": scale, **common.score(images, cond, prompts, reward_fn, quality),
         **_norm_stats(ro, "own_")}
    if (num_steps, scale) == headline and common.is_main():
      images_host, cond_host = common.host((images, cond))
      save_samples(os.path.join(out_dir, "samples", f"{name}.npz"), images_host, cond_host, prompts)
      task.sample_grid(images_host, cond_host, prompts, os.path.join(out_dir, "samples", f"{name}.png"),
                       f"{name}: held-out samples, {num_steps} steps, cfg {scale:g}")
    if reference_trajectory and run_model is not None:
      e.update(_norm_stats(sampling.paired_sample_jit(variables, wd.ref_variables, x1, cond, grid,
                                                      drive="reference", **kw), "reftraj_"))
    entry = result["models"].setdefault(name, {"settings": []})
    entry["settings"].append(e)

  for r in wd.runs.values():
    summary, series = hinge_statistics(workdir_lib.read_metrics(os.path.join(wd.path, "runs", r.name,
                                                                             "metrics.jsonl")))
    result["models"][r.name].update(method=r.method, normguard=r.normguard, iterations=r.iteration,
                                    status=r.status, hinge=summary, hinge_series=series)

  # the table, by setting; the headline: training step count (or the closest evaluated), CFG as trained
  result["table"] = {}
  for name, entry in result["models"].items():
    for e in entry["settings"]:
      key = f"{e['num_steps']}steps_cfg{e['cfg_scale']:g}"
      result["table"].setdefault(key, {})[name] = {
          k: e.get(k) for k in ("reward", *result["settings"]["quality_labels"], "own_mean_rho", "reftraj_mean_rho")}
  common.write_json(os.path.join(out_dir, "evaluate.json"), result)
  if common.is_main():
    _plot(result, out_dir)
  return result


def _plot(result, out_dir):
  plt = common.plt()
  models = result["models"]
  keys = ["reward", *[k for k in result["settings"]["quality_labels"] if k != "nn_dist"][:3], "own_mean_rho"]
  scales = result["settings"]["cfg_scales"]
  style = lambda name, m: dict(ls="-" if m.get("normguard") else ("--" if name != "reference" else ":"),
                               marker="o", ms=3)
  fig, axes = plt.subplots(len(scales), len(keys), figsize=(3.6 * len(keys), 3.2 * len(scales)), squeeze=False)
  for i, c in enumerate(scales):
    for j, key in enumerate(keys):
      ax = axes[i, j]
      for name, m in models.items():
        pts = sorted((e["num_steps"], e[key]) for e in m["settings"] if e["cfg_scale"] == c)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style(name, m))
      ax.set_xscale("log"); ax.minorticks_off(); ax.set_xlabel("Euler steps")
      ax.set_xticks(result["settings"]["steps"]); ax.set_xticklabels([str(s) for s in result["settings"]["steps"]]); ax.set_title(f"{key} (cfg {c:g})", fontsize=9)
  axes[0, 0].legend(fontsize=6)
  fig.suptitle(f"held-out eval ({result['settings']['samples']} samples)", fontsize=9)
  fig.tight_layout(); fig.savefig(os.path.join(out_dir, "evaluate.png"), dpi=100); plt.close(fig)

  train_steps = result["settings"]["train_steps"]
  if train_steps not in result["settings"]["steps"]:  # the closest step count evaluated
    train_steps = min(result["settings"]["steps"], key=lambda s: abs(s - train_steps))
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
  for name, m in models.items():
    if name == "reference":
      continue
    e = next((e for e in m["settings"] if e["num_steps"] == train_steps and e["cfg_scale"] == scales[0]), None)
    if e is None:
      continue
    axes[0].plot(e["own_rho_per_step"], label=name, **style(name, m))
    if "reftraj_rho_per_step" in e:
      axes[1].plot(e["reftraj_rho_per_step"], label=name, **style(name, m))
  for ax, t in zip(axes, ("on the policy's own trajectory", "on the reference trajectory")):
    ax.axhline(1.0, color="k", lw=0.8); ax.set_xlabel("sampling step k (t = 1 -> 0)")
    ax.set_title(f"rho_k {t} ({train_steps} steps, cfg {scales[0]:g})", fontsize=9)
  axes[0].set_ylabel("||v_theta|| / ||v_ref||"); axes[0].legend(fontsize=6)
  fig.tight_layout(); fig.savefig(os.path.join(out_dir, "evaluate_rho.png"), dpi=110); plt.close(fig)

  keys = ["ng_active_frac", "ng_mean_rho", "ng_lambda", "ng_share", "rollout_mean_rho", "reward_mean"]
  fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2))
  for ax, key in zip(axes, keys):
    for name, m in models.items():
      s = m.get("hinge_series", {}).get(key)
      if s:
        ax.plot([p[0] for p in s], [p[1] for p in s], label=name, lw=1, **{k: v for k, v in style(name, m).items()
                                                                         if k == "ls"})
    ax.set_title(key, fontsize=9); ax.set_xlabel("RL iteration")
  axes[0].legend(fontsize=6)
  fig.suptitle("NormGuard hinge statistics over training (runs/<name>/metrics.jsonl)", fontsize=9)
  fig.tight_layout(); fig.savefig(os.path.join(out_dir, "evaluate_hinge.png"), dpi=100); plt.close(fig)
