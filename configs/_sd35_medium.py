"""Shared SD3.5-Medium recipe (NFT, AWM and DPO with NormGuard): see configs/sd35_medium_{nft,awm,dpo}.py.

Values follow ../shared/reference/paper.md (Flow-Factory's SD3.5-M examples and the official repos): LoRA r32/a64
on all joint-attention projections, 512x512, CFG-free ODE rollouts of 10 steps with shift 3, PickScore reward,
AdamW (0.9, 0.999), weight decay 1e-4, grad clip 1.0, bf16. Local paths are required overrides:

    --config.model.weights_dir=/data/stable-diffusion-3.5-medium          # diffusers snapshot (transformer/, vae/)
    --config.data.embeddings_dir=/data/pickscore_sd35m_embeddings          # from normguard_jax.data.encode_prompts
    --config.reward.options.pickscore.model_dir=/data/PickScore_v1         # transformers CLIPModel
    --config.reward.options.pickscore.processor_dir=/data/CLIP-ViT-H-14    # its tokenizer + preprocessor config
"""

import ml_collections


def base_config(method, arg=None):
  c = ml_collections.ConfigDict()
  c.task = "sd3"
  c.seed = 0
  c.model = dict(weights_dir="", resolution=512, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                 remat=True, remat_policy="full", attention_impl="xla", decode_batch=16)
  # negative_split: the negative prompt's embeddings, needed only for CFG (rollout.cfg_scale > 1)
  c.data = dict(embeddings_dir="", split="train", eval_split="", negative_dir="",
                negative_split="negative")
  # rollout.chunk: rows per rollout call (and per VAE decode / reward call); 0 = the whole iteration at once
  c.rollout = dict(num_steps=10, shift=3.0, cfg_scale=1.0, noise_level=0.0, prompts_per_iter=48, group_size=16,
                   track_rho=True, chunk=64)
  c.reward = dict(terms={"pickscore": 1.0}, options={"pickscore": {"model_dir": "", "processor_dir": ""}})
  c.rl = dict(methods=method, normguard="on", iterations=300, lr=1e-4, b1=0.9, b2=0.999, weight_decay=1e-4,
              grad_clip=1.0, lora_rank=32, lora_alpha=64.0,
              lora_targets="to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out",
              fusion="split", num_train_timesteps=4, timestep_fraction=0.5, global_std=False,
              old_ramp=0.001, old_max_decay=0.5, max_consecutive_skips=10, num_microbatches=16)
  c.nft = dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)
  c.awm = dict(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_max=1.0, kl_beta=1e-4, ema_kl_beta=1.0)
  c.dpo = dict(beta=100.0, t_mean=0.0, t_std=1.0)
  c.grpo = dict(clip_range=1e-4, adv_clip_max=5.0, kl_beta=0.01, noise_level=0.7)
  c.normguard = dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0,
                     lam=dict(kind="constant", value=1.0, dual_lr=10.0, target=0.0, lambda_max=1e3,
                              warmup_steps=0))
  c.eval = dict(every=25, num_prompts=16, grid_images=16)
  c.mesh = dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  c.checkpoint = dict(every=10, keep=3, async_save=True)
  if arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r} for the SD3.5-Medium recipes (none defined)")
  return c
