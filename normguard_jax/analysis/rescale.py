"""Inference-time rescaling baseline (paper.md §2.3, §3.4): sample with the policy's velocity rescaled, at every step,
to the reference's norm on the same state,

    x_{k+1} = x_k + (t_{k+1} - t_k) v_theta(x_k) ||v_ref(x_k)|| / ||v_theta(x_k)||,

with the reference run alongside on the same trajectory. The paper reports that this neither restores reward nor
fixes quality (the inflation is co-adapted into the weights); the command measures it at toy scale, comparing for
each method the plain policy, the rescaled policy and, when the workdir has it, the NormGuard policy.
"""

import logging

import numpy as np
from tqdm.auto import tqdm

from normguard_jax.analysis import common, sampling
from normguard_jax.analysis import quality as quality_lib
from normguard_jax.analysis import workdir as workdir_lib

log = logging.getLogger(__name__)

rescale_velocity = sampling.rescale_velocity


def sample_rescaled(policy_vars, ref_vars, x1, cond, grid, *, policy_apply, ref_apply, cfg_scale=1.0,
                    uncond=None):
  """The rescaled sampler as a pure function over the lax.scan sampler: ``sampling.paired_sample`` with
  ``drive="rescaled"``. ``norm_drive`` equals ``norm_ref`` at every step (what the test checks); ``norm``/``rho``
  are the raw policy's, measured on the rescaled trajectory."""
  return sampling.paired_sample(policy_vars, ref_vars, x1, cond, grid, policy_apply=policy_apply,
                                ref_apply=ref_apply, drive="rescaled", cfg_scale=cfg_scale, uncond=uncond)


def _entry(ro, task, cond, prompts, reward_fn, quality):
  out = common.score(task.decode(ro["x0"]), cond, prompts, reward_fn, quality)
  ro = common.host({k: ro[k] for k in ("rho", "norm_drive", "norm_ref", "cos")})
  out.update(rho_per_step=common.per_step(ro["rho"]), mean_rho=float(np.mean(np.asarray(ro["rho"]))),
             drive_over_ref_per_step=common.per_step(np.asarray(ro["norm_drive"]) / np.asarray(ro["norm_ref"])),
             cos_per_step=common.per_step(ro["cos"]))
  return out


def run(wd: workdir_lib.Workdir, out_dir, *, per_class=10, num_steps=None, cfg_scale=None, quality=None):
  """Command body: returns the JSON dict (also written to OUT/rescale.json) and writes rescale.png."""
  cfg, task = wd.cfg, wd.task
  num_steps = int(num_steps or cfg.rollout.num_steps)
  cfg_scale = float(cfg.rollout.cfg_scale if cfg_scale is None else cfg_scale)
  grid = sampling.grid_for_task(task, cfg, num_steps)
  x1, cond, prompts = sampling.eval_inputs(task, cfg, per_class)
  uncond = task.uncond(cond) if cfg_scale != 1.0 else None  # the task's error names a missing negative prompt
  x1, cond, uncond = wd.place(x1), wd.place(cond), wd.place(uncond)
  reward_fn = common.reward_fn_for(cfg)
  ref_apply = wd.velocity_apply(wd.ref_model_cfg)
  kw = dict(ref_apply=ref_apply, cfg_scale=cfg_scale, uncond=uncond, mesh=wd.mesh,
            solver=sampling.analysis_solver(cfg))
  score = lambda ro: _entry(ro, task, cond, prompts, reward_fn, quality)

  ro = sampling.paired_sample_jit(wd.ref_variables, wd.ref_variables, x1, cond, grid, policy_apply=ref_apply,
                                  drive="policy", **kw)
  result = {"settings": {"num_steps": num_steps, "cfg_scale": cfg_scale, "shift": float(cfg.rollout.shift),
                         "mu": sampling.task_mu(task, num_steps), "task": task.name, "samples": int(x1.shape[0]),
                         "eval_key": "seed + 777 (held out)"},
            "reference": score(ro), "runs": {}, "methods": {}}
  jobs = [(r, d) for r in wd.runs.values() for d in ("policy", "rescaled")]
  for r, drive in tqdm(jobs, desc="rescale", unit="rollout"):
    ro = sampling.paired_sample_jit(r.variables, wd.ref_variables, x1, cond, grid,
                                    policy_apply=wd.velocity_apply(r.model_cfg), drive=drive, **kw)
    e = score(ro)
    if drive == "rescaled":
      n_drive, n_ref = common.host((ro["norm_drive"], ro["norm_ref"]))
      e["max_abs_drive_rho_minus_1"] = float(np.max(np.abs(n_drive / n_ref - 1.0)))
    result["runs"].setdefault(r.name, {"normguard": r.normguard, "method": r.method})[drive] = e

  for method, pair in wd.pairs().items():
    row = {}
    if pair["base"] is not None:
      b = result["runs"][pair["base"].name]
      row["plain"], row["rescaled"] = b["policy"], b["rescaled"]
    if pair["ng"] is not None:
      row["normguard"] = result["runs"][pair["ng"].name]["policy"]
      row["normguard_rescaled"] = result["runs"][pair["ng"].name]["rescaled"]
    keys = [k for k in ("reward", *quality_lib.labels_for(task), "mean_rho") if all(k in v for v in row.values())]
    row["summary"] = {k: {v: row[v][k] for v in row} for k in keys}
    if "plain" in row:
      row["summary"]["rescaled_minus_plain"] = {k: row["rescaled"][k] - row["plain"][k] for k in keys}
    result["methods"][method] = row

  common.write_json(f"{out_dir}/rescale.json", result)
  if common.is_main():
    _plot(result, f"{out_dir}/rescale.png", [k for k in quality_lib.labels_for(task) if k != "nn_dist"][:3])
  return result


def _plot(result, path, quality_keys):
  plt = common.plt()
  methods = result["methods"]
  variants = ["plain", "rescaled", "normguard", "normguard_rescaled"]
  keys = ["reward", *[k for k in quality_keys if k in result["reference"]]]
  fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.6))
  names = list(methods)
  width = 0.8 / len(variants)
  for ax, key in zip(axes, keys):
    for j, v in enumerate(variants):
      vals = [methods[m].get(v, {}).get(key, np.nan) for m in names]
      ax.bar(np.arange(len(names)) + j * width, vals, width, label=v)
    ax.axhline(result["reference"][key], color="k", lw=0.8, ls=":", label="reference")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    ax.set_xticklabels(names)
    ax.set_title(key, fontsize=9)
  axes[0].legend(fontsize=6)
  ax = axes[-1]
  for m in names:
    for v, ls in (("plain", "--"), ("rescaled", ":"), ("normguard", "-")):
      if v in methods[m]:
        ax.plot(methods[m][v]["rho_per_step"], ls, marker="o", ms=3, label=f"{m} {v}")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xlabel("sampling step k"); ax.set_title("rho_k on each variant's trajectory", fontsize=9)
  ax.legend(fontsize=6)
  s = result["settings"]
  fig.suptitle(f"inference-time rescaling to ||v_ref|| ({s['num_steps']} steps, cfg {s['cfg_scale']}, "
               f"{s['samples']} held-out samples)", fontsize=9)
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
