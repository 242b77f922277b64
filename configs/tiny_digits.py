"""The embedded default: NormGuard on a tiny class-conditional flow DiT over scikit-learn's 8x8 digits.

    python -m normguard_jax.train --config configs/tiny_digits.py --workdir /tmp/ng_digits
    python -m normguard_jax.train --config configs/tiny_digits.py:smoke --workdir /tmp/ng_smoke
    # any field can be overridden, e.g. --config.rl.methods=nft,awm,dpo --config.rl.iterations=100

Phases: pretrain the reference DiT with flow matching (cached with orbax under pretrain.cache_dir), then
online RL with a hackable reward for each method in rl.methods, without and with NormGuard, then a
report (report.json, PNG plots, sample grids, JSONL and TensorBoard logs) in the workdir.
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = "digits"  # normguard_jax/tasks: what the RL loop trains
  c.seed = 0

  c.model = dict(image_size=8, channels=1, patch_size=2, width=64, depth=4, num_heads=4, mlp_ratio=4.0,
                 num_classes=10, attention_impl="xla", dtype="float32")

  c.pretrain = dict(steps=2000, batch_size=128, lr=1e-3, warmup_steps=100, cfg_dropout=0.1,
                    t_sampler="logit_normal", cache_dir="~/.cache/normguard_jax/pretrain", log_every=500)

  # Sampling used for RL rollouts and evaluation (the reference trajectories share it).
  c.rollout = dict(num_steps=10, shift=1.0, cfg_scale=1.0, noise_level=0.0, prompts_per_iter=16,
                   group_size=8, track_rho=True, chunk=0)  # chunk: rows per rollout call (0 = all at once)

  # {name: weight}; options per reward name, e.g. {"remote": {"url": "http://host:port/score"}}
  c.reward = dict(terms={"contrast": 1.0}, options={})

  c.rl = dict(methods="nft,awm,dpo", normguard="off,on", iterations=150, lr=1e-4, b1=0.9, b2=0.999,
              weight_decay=1e-4, grad_clip=1.0, lora_rank=8, lora_alpha=16.0, lora_targets="qkv,proj,mlp",
              fusion="split", num_train_timesteps=4, timestep_fraction=0.9, global_std=True,
              old_ramp=0.001, old_max_decay=0.5, max_consecutive_skips=10, num_microbatches=1)
  c.nft = dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, kl_beta=0.0, ema_kl_beta=0.0)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0)
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.0, noise_level=0.7)

  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="constant", value=1.0, dual_lr=10.0, target=0.0, lambda_max=1e3,
                              warmup_steps=0))

  c.eval = dict(every=25, samples_per_class=10, grid_per_class=8)

  # Device mesh (parallel/mesh.py): one axis -1 takes the remaining devices. On one CPU device all are 1.
  c.mesh = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)

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
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; expected '' or 'smoke'")
  return c
