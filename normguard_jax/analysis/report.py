"""The report folder: report.json, PNG plots (reward curve, rho per sampling step, reward vs quality
over training) and sample grids. Runs are compared at matched reward in the reward-vs-quality plot,
so an early-stopped run does not pass for a better one."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

def sample_grid(samples, cond, per_class, path, title):
  samples = np.clip(np.asarray(samples), -1, 1)
  cond = np.asarray(cond)
  classes = np.unique(cond)
  fig, axes = plt.subplots(per_class, len(classes), figsize=(len(classes) * 0.6, per_class * 0.6))
  axes = np.atleast_2d(axes)
  for j, c in enumerate(classes):
    idx = np.where(cond == c)[0][:per_class]
    for i in range(per_class):
      ax = axes[i, j]
      ax.axis("off")
      if i < len(idx):
        ax.imshow(samples[idx[i], :, :, 0], cmap="gray", vmin=-1, vmax=1)
  fig.suptitle(title, fontsize=8)
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def _summary(run, quality_keys):
  h = run["history"]
  if not h:
    return {k: run.get(k) for k in ("name", "method", "normguard", "status", "error", "traceback")}
  start, end = h[0], h[-1]
  return {
      "name": run["name"], "method": run["method"], "normguard": run["normguard"], "status": run["status"],
      "error": run["error"], "iterations": end["iteration"], "wall_s": run.get("wall_s"),
      "reward_start": start["reward"], "reward_end": end["reward"],
      "mean_rho_start": start["mean_rho"], "mean_rho_end": end["mean_rho"],
      "rho_per_step_end": end["rho_per_step"],
      "quality_start": {k: start[k] for k in quality_keys}, "quality_end": {k: end[k] for k in quality_keys},
      "history": [{k: v for k, v in e.items() if k != "norm_per_step" and k != "norm_ref_per_step"} for e in h],
  }


def write_report(workdir, cfg, task, pre_info, ref_eval, ref_images, real_quality, results, cond, prompts=None):
  """``task`` (normguard_jax/tasks) names the quality proxies (``quality_labels``) and draws the sample grids."""
  labels = dict(task.quality_labels)
  runs = [_summary(r, tuple(labels)) for r in results]
  report = {"config": json.loads(cfg.to_json_best_effort()), "pretrain": pre_info,
            "reference": {k: v for k, v in ref_eval.items()}, "real_data_quality": real_quality, "runs": runs}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)

  task.sample_grid(ref_images, cond, prompts, os.path.join(workdir, "samples_reference.png"), "reference")
  for r in results:
    if r.get("samples") is not None:
      task.sample_grid(r["samples"], cond, prompts, os.path.join(workdir, f"samples_{r['name']}.png"), r["name"])

  ok = [r for r in runs if r.get("history")]
  style = lambda r: dict(linestyle="-" if r["normguard"] else "--", marker="o", markersize=3)

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in ok:
    its = [e["iteration"] for e in r["history"]]
    ax.plot(its, [e["reward"] for e in r["history"]], label=r["name"], **style(r))
  ax.set_xlabel("RL iteration"); ax.set_ylabel("eval reward"); ax.set_title("reward on the fixed eval set")
  ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(os.path.join(workdir, "reward_curve.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in ok:
    ax.plot(np.arange(len(r["rho_per_step_end"])), r["rho_per_step_end"], label=r["name"], **style(r))
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xlabel("sampling step k (t = 1 -> 0)"); ax.set_ylabel("rho_k = ||v_theta|| / ||v_ref||")
  ax.set_title("per-step velocity-norm ratio at the end of training"); ax.legend(fontsize=7)
  fig.tight_layout(); fig.savefig(os.path.join(workdir, "rho_per_step.png"), dpi=110); plt.close(fig)

  if not labels:  # a task without quality proxies in the trainer (held-out eval: normguard_jax.analysis)
    return report
  fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), squeeze=False)
  for ax, key in zip(axes[0], labels):
    for r in ok:
      ax.plot([e["reward"] for e in r["history"]], [e[key] for e in r["history"]], label=r["name"], **style(r))
    if key in real_quality:
      ax.axhline(real_quality[key], color="g", lw=0.8, label="real data")
    ax.set_xlabel("eval reward"); ax.set_title(labels[key], fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.suptitle("quality against reward over training (compare at matched reward)", fontsize=9)
  fig.tight_layout(); fig.savefig(os.path.join(workdir, "reward_vs_quality.png"), dpi=110); plt.close(fig)
  return report
