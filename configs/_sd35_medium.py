"""Shared SD3.5-Medium settings of configs/sd35_medium_{nft,awm,dpo}.py; the table of every setting, its source and
what departs is docs/recipes.md.

What all SD3.5 references share (Flow-Factory ``X-GenGroup/Flow-Factory@a0b2bc5`` examples/{nft,awm,dpo}/lora/sd3_5,
official DiffusionNFT ``NVlabs/DiffusionNFT@24af555``, official AWM ``scxue/advantage_weighted_matching@be51372``):
512x512, CFG-free ODE rollouts (cfg 1, noise 0) with shift 3, PickScore, LoRA r32/a64 (gaussian A, B = 0) on the joint
attention projections only (``mmdit.LORA_PRESETS["reference"]``: ``attn.*``, no ``attn2``; 191 modules), AdamW (0.9,
0.999), eps 1e-8, weight decay 1e-4, grad clip 1.0, constant LR. The defaults below are Flow-Factory's (the linear
grid, Euler, T5 length 256); each recipe sets its method's values and variants. Local paths are required overrides:

    --config.model.weights_dir=/data/stable-diffusion-3.5-medium          # diffusers snapshot (transformer/, vae/)
    --config.data.embeddings_dir=/data/pickscore_sd35m_embeddings          # from normguard_jax.data.encode_prompts
    --config.reward.options.pickscore.model_dir=/data/PickScore_v1         # transformers CLIPModel
    --config.reward.options.pickscore.processor_dir=/data/CLIP-ViT-H-14    # its tokenizer + preprocessor config

Encode the prompts with the recipe's T5 length (``data.max_sequence_length``: 256 Flow-Factory, 128 official), and
a held-out ``test`` split beside ``train`` (used for evaluation automatically).
"""

import ml_collections

from normguard_jax.models import mmdit

REFERENCE_LORA_TARGETS = ",".join(mmdit.LORA_PRESETS["reference"])


def base_config(method):
  c = ml_collections.ConfigDict()
  c.task = "sd3"
  c.seed = 0
  c.reference = ""  # the reference code this recipe reproduces (set by each recipe; recorded in report.json)
  c.model = dict(weights_dir="", resolution=512, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                 remat=True, remat_policy="full", attention_impl="auto", decode_batch=16)
  # negative_split: the negative prompt's embeddings, needed only for CFG (rollout.cfg_scale > 1).
  # max_sequence_length: the T5 length the reference encodes with; embeddings of another length are refused (0: any).
  c.data = dict(embeddings_dir="", split="train", eval_embeddings_dir="", eval_split="", negative_dir="",
                negative_split="negative", max_sequence_length=256)
  # chunk: rows per rollout call (and per VAE decode / reward call); 0 = the whole iteration at once
  c.rollout = dict(num_steps=14, shift=3.0, cfg_scale=1.0, noise_level=0.0, prompts_per_iter=48, group_size=16,
                   track_rho=True, chunk=64, grid="linear", solver="euler")
  c.reward = dict(terms={"pickscore": 1.0}, options={"pickscore": {"model_dir": "", "processor_dir": ""}})
  c.rl = dict(methods=method, normguard="on", iterations=300, lr=1e-4, b1=0.9, b2=0.999, weight_decay=1e-4,
              grad_clip=1.0, lora_rank=32, lora_alpha=64.0, lora_targets=REFERENCE_LORA_TARGETS, fusion="split",
              num_train_timesteps=4, timestep_fraction=0.5, timestep_rule="value_range", timestep_share_rows=8,
              global_std=False, adv_eps=1e-6, adv_eps_kind="floor", adv_aggregation="sum", old_ramp=0.001,
              old_max_decay=0.5, ema_kind="piecewise_linear", ema_warmup=10, ema_step="iteration",
              max_consecutive_skips=10, num_microbatches=16, updates_per_iter=1, train_cfg=False, init_from="")
  c.nft = dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, adv_mode="clamp", adv_clip=1.0,
               kl_beta=1e-4, ema_kl_beta=1.0)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0, t_clamp=0.01, t_share_pairs=6, ties="same")
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.01, noise_level=0.7)
  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="constant", value=1.0, dual_lr=10.0, target=0.0, excess="hinge", lambda_max=1e3,
                              warmup_steps=0))
  # policy: 'raw' (current), 'old' (the run's old/EMA copy) or 'ema' (a separate evaluation EMA, eval.ema_*).
  # num_prompts: the first N prompts of the held-out split (the references score all of it; see docs/recipes.md).
  # chunk: eval rows per sampler call (memory; 0 = all at once)
  c.eval = dict(solver="", chunk=16, every=20, num_prompts=64, grid_images=16, num_steps=40, cfg_scale=0.0,
                resolution=0, policy="old", ema_kind="power", ema_max=0.9, ema_warmup=10, ema_every=1)
  c.mesh = dict(num_devices=0, data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  c.checkpoint = dict(every=10, keep=3, async_save=True)
  return c
