"""Shared FLUX settings of configs/flux1_dev_*.py and configs/flux2_klein_*.py; the table of every setting, its
source and what departs is docs/recipes.md.

The FLUX recipes follow Flow-Factory's examples (``X-GenGroup/Flow-Factory@a0b2bc5`` examples/{nft,awm}/lora/flux1 and
flux2_klein_base); the official DiffusionNFT and AWM codes ship SD3 only. Shared: ODE Euler rollouts on the
pipelines' grid, linspace(1, 1/K, K) shifted by the resolution-dependent mu (FLUX.1 ``calculate_shift``,
FLUX.2-klein ``compute_empirical_mu``, which also depends on K; ``rollout.grid`` must stay 'linear'), PickScore,
LoRA r64/a128 on Flow-Factory's default targets (attention and the double blocks' FFNs:
``flux.LORA_PRESETS[family]["reference"]``), AdamW (0.9, 0.999), eps 1e-8, weight decay 1e-4, grad clip 1.0,
constant LR, 48 prompts x group 16, text length 512 (the pipelines' default), and evaluation at 1024x1024 under the
run's EMA every 20 iterations.

FLUX.1-dev is guidance-distilled: it samples CFG-free with the embedded guidance ``model.guidance`` 3.5.
FLUX.2-klein-base samples with CFG 4.0 and, as Flow-Factory's klein adapter does (models/flux/flux2_klein.py:801-815),
applies it in the training forward too (``rl.train_cfg``), with gradients through both branches. CFG needs the
negative prompt's embeddings: encode the JSONL line {"prompt": ""} with ``--split negative`` into a directory passed
as ``--config.data.negative_dir``. Local paths are required overrides, as in configs/_sd35_medium.py:

    --config.model.weights_dir=/data/FLUX.2-klein-base-4B   # diffusers snapshot (transformer/, vae/)
    --config.data.embeddings_dir=/data/emb_flux2             # python -m normguard_jax.data.encode_prompts
    --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

import ml_collections

from normguard_jax.models import flux

REFERENCE_LORA_TARGETS = {family: ",".join(flux.LORA_PRESETS[family]["reference"]) for family in ("flux", "flux2")}


def base_config(family, method):
  if family not in ("flux1", "flux2"):
    raise ValueError(f"unknown FLUX family {family!r}; expected 'flux1' or 'flux2'")
  klein = family == "flux2"
  c = ml_collections.ConfigDict()
  c.task = "flux"
  c.seed = 0
  c.reference = ""  # the reference code this recipe reproduces (set by each recipe; recorded in report.json)
  c.model = dict(weights_dir="", resolution=384, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                 remat=True, remat_policy="full", attention_impl="auto", decode_batch=16, guidance=3.5)
  c.data = dict(embeddings_dir="", split="train", eval_embeddings_dir="", eval_split="", negative_dir="",
                negative_split="negative", max_sequence_length=512)
  c.rollout = dict(num_steps=8, shift=1.0, cfg_scale=4.0 if klein else 1.0, noise_level=0.0, prompts_per_iter=48,
                   group_size=16, track_rho=True, chunk=32, grid="linear", solver="euler")
  c.reward = dict(terms={"pickscore": 1.0}, options={"pickscore": {"model_dir": "", "processor_dir": ""}})
  c.rl = dict(methods=method, normguard="on", iterations=300, lr=1e-4, b1=0.9, b2=0.999, weight_decay=1e-4,
              grad_clip=1.0, lora_rank=64, lora_alpha=128.0,
              lora_targets=REFERENCE_LORA_TARGETS["flux2" if klein else "flux"], fusion="split",
              num_train_timesteps=2, timestep_fraction=0.7, timestep_rule="value_range", timestep_share_rows=1,
              global_std=False, adv_eps=1e-6, adv_eps_kind="floor", adv_aggregation="sum", old_ramp=0.001,
              old_max_decay=0.5, ema_kind="piecewise_linear", ema_warmup=10, ema_step="iteration",
              max_consecutive_skips=10, num_microbatches=16, updates_per_iter=1, train_cfg=klein, init_from="")
  c.nft = dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, adv_mode="clamp", adv_clip=1.0,
               kl_beta=0.0, ema_kl_beta=0.1)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0, t_clamp=0.01, t_share_pairs=6, ties="same")
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.01, noise_level=0.7)
  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="constant", value=1.0, dual_lr=10.0, target=0.0, excess="hinge", lambda_max=1e3,
                              warmup_steps=0))
  # cfg_scale 0: the rollouts' (klein 4.0); FLUX.1's embedded guidance is model.guidance in both.
  c.eval = dict(solver="", chunk=16, every=20, num_prompts=16, grid_images=16, num_steps=28, cfg_scale=0.0,
                resolution=1024, policy="old", ema_kind="power", ema_max=0.9, ema_warmup=10, ema_every=1)
  c.mesh = dict(num_devices=0, data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  c.checkpoint = dict(every=10, keep=3, async_save=True)
  return c
