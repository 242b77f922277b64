"""The embedded default: NormGuard on a tiny class-conditional flow DiT over scikit-learn's 8x8 digits.

    python -m normguard_jax.train --config configs/tiny_digits.py --workdir /tmp/ng_digits
    python -m normguard_jax.train --config configs/tiny_digits.py:smoke --workdir /tmp/ng_smoke
    # any field can be overridden, e.g. --config.rl.methods=nft,awm,dpo --config.rl.iterations=100

Phases: pretrain the reference DiT with flow matching (cached with orbax under pretrain.cache_dir), then
online RL for each method in rl.methods, without and with NormGuard, then a report (report.json with the
matched-reward comparisons, PNG plots, sample grids, JSONL and TensorBoard logs) in the workdir.

The protocol (issue 16), fixed before measuring:
  * reward: ``digit_classifier``, a small CNN trained on digits part A scoring the calibrated log p(prompted class)
    (rewards/digit_classifier.py), in the role PickScore plays for text-to-image;
  * quality proxies from models the reward never saw: an MLP trained on digits part B (class_conf, class_acc, and
    an FID in its features), nn_dist and out_of_range (analysis/quality.py);
  * NormGuard: the relative linear hinge at margin 0 with an adaptive lambda (dual ascent on the hinge's own
    excess E relu(rho - 1 - m) <= 0.01: lambda falls while the policy is at or under the reference);
  * 150 iterations, every method without and with NormGuard from the same initial rollouts; ``seeds`` repeats
    every run (e.g. --config.seeds=0,1,2) and the report gives mean +- sd.

Variants: ``:smoke`` (seconds, the tests), ``:contrast`` (the earlier pixel-std reward, hackable through the
velocity magnitude), ``:constant_lambda`` (NormGuard with a constant lambda = 1).
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = "digits"  # normguard_jax/tasks: what the RL loop trains
  c.seed = 0
  c.reference = "the CPU default (no reference code)"
  c.seeds = ""  # "0,1,2": repeat every run with these RL seeds (the reference model and the eval set stay fixed)

  c.model = dict(image_size=8, channels=1, patch_size=2, width=64, depth=4, num_heads=4, mlp_ratio=4.0,
                 num_classes=10, attention_impl="auto", dtype="float32")

  c.pretrain = dict(steps=2000, batch_size=128, lr=1e-3, warmup_steps=100, cfg_dropout=0.1,
                    t_sampler="logit_normal", cache_dir="~/.cache/normguard_jax/pretrain", log_every=500)

  # Sampling used for RL rollouts and evaluation (the reference trajectories share it).
  c.rollout = dict(num_steps=10, shift=1.0, cfg_scale=1.0, noise_level=0.0, prompts_per_iter=16,
                   group_size=8, track_rho=True, chunk=0,  # chunk: rows per rollout call (0 = all at once)
                   grid="linear", solver="euler")

  # {name: weight}; options per reward name, e.g. {"remote": {"url": "http://host:port/score"}}
  c.reward = dict(terms={"digit_classifier": 1.0},
                  options={"digit_classifier": {"cache_dir": "~/.cache/normguard_jax/reward"}})

  c.rl = dict(methods="nft,awm,dpo", normguard="off,on", iterations=150, lr=1e-4, b1=0.9, b2=0.999,
              weight_decay=1e-4, grad_clip=1.0, lora_rank=8, lora_alpha=16.0, lora_targets="qkv,proj,mlp",
              fusion="split", num_train_timesteps=4, timestep_fraction=0.9, timestep_rule="index_fraction",
              timestep_share_rows=0, global_std=True, adv_eps=1e-4, adv_eps_kind="add", adv_aggregation="sum",
              old_ramp=0.001, old_max_decay=0.5, ema_kind="piecewise_linear", ema_warmup=10, ema_step="update",
              max_consecutive_skips=10, num_microbatches=1, updates_per_iter=1, train_cfg=False, init_from="")
  c.nft = dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, adv_mode="div5", adv_clip=5.0,
               kl_beta=0.0, ema_kl_beta=0.0)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0, t_clamp=0.0, t_share_pairs=0, ties="next")
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.0, noise_level=0.7)

  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="adaptive", value=1.0, dual_lr=10.0, target=0.01, excess="hinge",
                              lambda_max=1e3, warmup_steps=0))

  # the eval protocol (train/programs.py): solver / num_steps / cfg_scale / resolution 0 = the rollouts'; policy 'raw'
  # (current), 'old' (the run's old/EMA copy) or 'ema' (a separate evaluation EMA, eval.ema_*); chunk: rows per call
  c.eval = dict(solver="", chunk=0, every=25, samples_per_class=10, grid_per_class=8, num_steps=0, cfg_scale=0.0,
                resolution=0, policy="raw", ema_kind="power", ema_max=0.9, ema_warmup=10, ema_every=1)

  # Device mesh (parallel/mesh.py): one axis -1 takes the remaining devices. On one CPU device all are 1.
  c.mesh = dict(num_devices=0, data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)

  # Per-run orbax checkpoints of the full train state; rerunning the same command on the workdir resumes.
  c.checkpoint = dict(every=25, keep=2, async_save=True)

  if arg == "smoke":
    c.pretrain.steps = 60
    c.pretrain.batch_size = 64
    c.pretrain.warmup_steps = 10
    c.pretrain.log_every = 20
    c.rollout.prompts_per_iter = 4
    c.rollout.group_size = 4
    c.rl.iterations = 3
    c.eval.every = 2
    c.eval.samples_per_class = 2
    c.eval.grid_per_class = 2
    c.checkpoint.every = 2
  elif arg == "contrast":  # the earlier default reward: the per-image pixel std (hackable by the magnitude)
    c.reward = dict(terms={"contrast": 1.0}, options={})
  elif arg == "constant_lambda":
    c.normguard.lam.kind = "constant"
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; expected '', 'smoke', 'contrast' or 'constant_lambda'")
  return c
