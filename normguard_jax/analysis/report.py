"""The report folder: report.json, PNG plots (reward curve, rho per sampling step, reward vs quality
over training) and sample grids. Runs are compared at matched reward in the reward-vs-quality plot,
so an early-stopped run does not pass for a better one."""

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def image_grid(images, max_images=64, cols=None):
  """Images (N, H, W, C) in [-1, 1] -> one (rows*H, cols*W, 3) float image in [0, 1] (a tiled grid, no figure):
  cheap enough to write at every evaluation (TensorBoard image and PNG)."""
  x = np.clip((np.asarray(images, np.float32)[:max_images] + 1.0) / 2.0, 0.0, 1.0)
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  n, h, w, c = x.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c), np.float32)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = x[i]
  return grid


def save_image(image, path):
  """An (H, W, 3) float image in [0, 1] as a PNG."""
  plt.imsave(path, np.clip(image, 0.0, 1.0))


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
  out = {
      "name": run["name"], "method": run["method"], "normguard": run["normguard"], "seed": run.get("seed"),
      "status": run["status"], "error": run["error"], "iterations": end["iteration"], "wall_s": run.get("wall_s"),
      "reward_start": start["reward"], "reward_end": end["reward"],
      "mean_rho_start": start["mean_rho"], "mean_rho_end": end["mean_rho"],
      "rho_per_step_end": end["rho_per_step"],
      "history": [{k: v for k, v in e.items() if k != "norm_per_step" and k != "norm_ref_per_step"} for e in h],
  }
  if quality_keys:  # text tasks have no proxies in the trainer (normguard_jax.analysis measures them)
    out.update(quality_start={k: start[k] for k in quality_keys}, quality_end={k: end[k] for k in quality_keys})
  return out


def load_eval_samples(workdir, run):
  """The per-sample eval arrays a run saved at each iteration of its history (runs/<name>/eval/<it>.npz; stale files
  from a resume are ignored), as dicts {reward, mean_rho (per sample), <proxy>: ...}; None when any is missing."""
  out = []
  for e in run["history"]:
    path = os.path.join(workdir, "runs", run["name"], "eval", f"{int(e['iteration']):06d}.npz")
    if not os.path.exists(path):
      return None
    with np.load(path) as d:
      out.append({"reward": d["reward"], "mean_rho": d["rho"].mean(0),
                  **{k[2:]: d[k] for k in d.files if k.startswith("q_")}})
  return out


def matched_comparisons(workdir, cfg, task, runs, cond):
  """Issue 16, the paper's "not explained by early stopping" check: each NormGuard run's final eval against the base
  run of the same method (and seed) at the same eval reward, interpolated along the base run's eval history, with
  a paired bootstrap 95% interval over eval samples (analysis/matched.py)."""
  from normguard_jax.analysis import matched
  by_name = {r["name"]: r for r in runs}
  out = {}
  for r in runs:
    if not r.get("normguard") or r.get("status") != "ok":
      continue
    base = by_name.get(r["name"].replace("_ng", "_base", 1))
    if base is None or base.get("status") != "ok":
      continue
    ng_evals, base_evals = load_eval_samples(workdir, r), load_eval_samples(workdir, base)
    if not ng_evals or not base_evals or len(base_evals) < 2:
      continue
    strata = np.asarray(cond) if task.name == "digits" else None
    res = matched.matched_reward(ng_evals[-1], base_evals, [e["iteration"] for e in base["history"]],
                                 set_stats=task.quality_set_stats(), strata=strata, n_boot=1000, seed=int(cfg.seed))
    out[r["name"]] = dict(res, base_run=base["name"])
  return out


def seed_summaries(runs, matched_results):
  """Mean +- sd over seeds of every run's end metrics (per method and NormGuard setting) and of the matched
  differences, when the job ran several seeds (``config.seeds``)."""
  from normguard_jax.analysis import matched
  groups = {}
  for r in runs:
    if r.get("status") == "ok" and r.get("seed") is not None:
      key = f"{r['method']}_{'ng' if r['normguard'] else 'base'}"
      groups.setdefault(key, []).append(r)
  if all(len(g) < 2 for g in groups.values()):
    return None
  out = {}
  for key, rs in groups.items():
    ends = [dict(reward_end=r["reward_end"], mean_rho_end=r["mean_rho_end"], **r.get("quality_end", {})) for r in rs]
    out[key] = {"seeds": [r["seed"] for r in rs], "end": matched.seed_summary(ends)}
    diffs = [matched_results[r["name"]]["diff"] for r in rs
             if r["name"] in matched_results and matched_results[r["name"]].get("diff") is not None]
    if diffs:
      out[key]["matched_diff"] = matched.seed_summary(diffs)
  return out


def write_report(workdir, cfg, task, pre_info, ref_eval, ref_images, real_quality, results, cond, prompts=None,
                 reference_error=None):
  """``task`` (normguard_jax/tasks) names the quality proxies (``quality_labels``) and draws the sample grids.
  ``reference_error``: the reference evaluation failed (e.g. a remote reward was down); the report says so."""
  labels = dict(task.quality_labels)
  runs = [_summary(r, tuple(labels)) for r in results]
  report = {"config": json.loads(cfg.to_json_best_effort()),
            # digits pretrains its reference; text tasks load it from a diffusers snapshot
            ("pretrain" if task.name == "digits" else "reference_model"): pre_info,
            "reference": {k: v for k, v in ref_eval.items()}, "runs": runs}
  if real_quality:
    report["real_data_quality"] = real_quality
  from normguard_jax.train import programs
  report["recipe"] = programs.recipe_record(cfg, task)
  held_out = getattr(task, "held_out", None)
  if held_out is not None:
    report["eval_prompts_held_out"] = bool(held_out)
    if not held_out:
      report["eval_prompts_warning"] = ("eval prompts are training prompts: the eval reward measures fitting, not "
                                        "generalisation (add a `test` split with encode_prompts --split test)")
  if reference_error is not None:
    report["reference_error"] = reference_error
  try:
    report["matched_reward"] = matched_comparisons(workdir, cfg, task, runs, cond)
    seeds = seed_summaries(runs, report["matched_reward"])
    if seeds:
      report["seeds"] = seeds
  except Exception as e:  # noqa: BLE001 - statistics must never cost the report
    report["matched_reward_error"] = f"{type(e).__name__}: {e}"
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2, default=_json_default)

  if ref_images is not None:
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
