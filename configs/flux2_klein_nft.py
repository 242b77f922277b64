"""DiffusionNFT + NormGuard on FLUX.2-klein-base: Flow-Factory's klein example (there is no official FLUX code).

Flow-Factory ``examples/nft/lora/flux2_klein_base/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 384x384, 8
Euler ODE steps on Flux2KleinPipeline's grid (empirical mu 1.963 at 384^2 and 8 steps), CFG 4.0 in the rollouts and
in the training forward, sampled with the EMA ("old") policy. 48 prompts x group 16, one update per iteration. 2
training timesteps by FF's ``discrete`` rule: value range 0.5, t in [0.704, 1], one draw per sample. Advantages by
FF's ``gdpo``: per-group z-scores, then the batch re-standardised. Clipped at 5. NFT beta 0.1, KL 0, lr 1e-4.
Old/EMA decay min(0.001 e, 0.5) at the 0-based epoch e. LoRA r64/a128 on FF's default targets (attention,
double-block FFNs, single-block ``attn.to_qkv_mlp_proj``), Qwen3 text length 512. Evaluation: every 20 iterations,
1024x1024, 28 steps, CFG 4.0, under the EMA, on the held-out split. Needs ``data.negative_dir`` (see configs/_flux.py).

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``). NormGuard's velocity is the guided one.
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters). The reward image is not
    rounded to uint8.
  * Prompts: FF trains on ``dataset/sharegpt4o_image_mini`` (128 train, 128 test prompts); encode those to compare.
    Evaluation scores the first ``eval.num_prompts`` (16) prompts of the test split; FF scores all 128.

    python -m normguard_jax.train --config configs/flux2_klein_nft.py --workdir /data/runs/flux2_klein_nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... --config.data.negative_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/flux2_klein_nft.py")
  c = load_sibling(__file__, "_flux").base_config("flux2", "nft")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/nft/lora/flux2_klein_base/default.yaml"
  # Flow-Factory examples/nft/lora/flux2_klein_base/default.yaml (y:NN = its line)
  c.model.resolution = 384  # y:64
  c.rollout.update(num_steps=8, cfg_scale=4.0, prompts_per_iter=48, group_size=16)  # y:66-67,71,73
  c.rl.update(lr=1e-4, num_train_timesteps=2, timestep_rule="value_range", timestep_fraction=0.5,  # y:78,52-55
              timestep_share_rows=1, global_std=False, adv_eps=1e-6, adv_eps_kind="floor",  # y:70,72
              adv_aggregation="gdpo", old_ramp=0.001, old_max_decay=0.5, ema_kind="piecewise_linear",  # y:41,44-50
              ema_step="iteration", num_microbatches=16, updates_per_iter=1, train_cfg=True)  # y:74; ff klein.py:801
  c.nft.update(beta=0.1, adv_clip_max=5.0, kl_beta=0.0)  # y:42,61,58
  c.eval.update(every=20, resolution=1024, num_steps=28, cfg_scale=4.0, policy="old")  # y:101-106; ffnft:141
  if "smoke" in variants:
    recipe.smoke(c)
  return c
