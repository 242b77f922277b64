"""Shared FLUX recipes (NFT, AWM and DPO with NormGuard): configs/flux1_dev_*.py and configs/flux2_klein_*.py.

LoRA r64/a128 on the attention projections (paper.md §5.3 and §6.3, Flow-Factory's FLUX.2-klein-base-4B examples).
FLUX.2-klein-base samples with CFG 4.0 (the negative prompt's embeddings are then required: encode the JSONL line
{"prompt": ""} with ``--split negative`` into a directory passed as ``--config.data.negative_dir``); note that Flow-Factory also applies
CFG in the training forward for these models, while ours trains on the conditional velocity only. FLUX.1-dev is
guidance-distilled: it samples CFG-free with the embedded guidance scale ``model.guidance`` (3.5). Local paths are
required overrides, as in configs/_sd35_medium.py:

    --config.model.weights_dir=/data/FLUX.2-klein-base-4B   # diffusers snapshot (transformer/, vae/)
    --config.data.embeddings_dir=/data/emb_flux2             # python -m normguard_jax.data.encode_prompts
    --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...
"""

import ml_collections

FLUX_LORA_TARGETS = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out"


def base_config(family, method, arg=None):
  if family not in ("flux1", "flux2"):
    raise ValueError(f"unknown FLUX family {family!r}")
  c = ml_collections.ConfigDict()
  c.task = "flux"
  c.seed = 0
  c.model = dict(weights_dir="", resolution=512 if family == "flux1" else 384, dtype="bfloat16",
                 param_dtype="bfloat16", scan_layers=True, remat=True, remat_policy="full", attention_impl="xla",
                 decode_batch=16, guidance=3.5)
  c.data = dict(embeddings_dir="", split="train", eval_split="", negative_dir="",
                negative_split="negative")
  c.rollout = dict(num_steps=10 if family == "flux1" else 8, shift=1.0, cfg_scale=1.0 if family == "flux1" else 4.0,
                   noise_level=0.0, prompts_per_iter=48, group_size=16, track_rho=True, chunk=32)
  c.reward = dict(terms={"pickscore": 1.0}, options={"pickscore": {"model_dir": "", "processor_dir": ""}})
  c.rl = dict(methods=method, normguard="on", iterations=300, lr=1e-4, b1=0.9, b2=0.999, weight_decay=1e-4,
              grad_clip=1.0, lora_rank=64, lora_alpha=128.0, lora_targets=FLUX_LORA_TARGETS, fusion="split",
              num_train_timesteps=2, timestep_fraction=0.9, global_std=True, old_ramp=0.001, old_max_decay=0.5,
              max_consecutive_skips=10, num_microbatches=16)
  if family == "flux2":  # its single blocks fuse q, k, v and the MLP input into one projection
    c.rl.lora_targets += ",to_qkv_mlp_proj"
  c.nft = dict(beta=0.1, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, kl_beta=0.0, ema_kl_beta=0.1)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0)
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.01, noise_level=0.7)
  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="constant", value=1.0, dual_lr=10.0, target=0.0, lambda_max=1e3,
                              warmup_steps=0))
  c.eval = dict(every=25, num_prompts=16, grid_images=16)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  c.checkpoint = dict(every=10, keep=3, async_save=True)
  if method == "awm":  # FLUX.2-klein-base AWM example: 4 training timesteps over 70%, lr 3e-4
    c.rl.num_train_timesteps, c.rl.timestep_fraction, c.rl.lr = 4, 0.7, 3e-4
  elif method == "dpo":  # paper.md §7 (DPO on SD3.5-M; no FLUX example): lr 1e-5, group 4, one t per pair
    c.rl.num_train_timesteps, c.rl.lr, c.rl.global_std = 1, 1e-5, False
    c.rollout.group_size = 4
    c.rl.num_microbatches = 4
  if arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r} for the FLUX recipes (none defined)")
  return c
