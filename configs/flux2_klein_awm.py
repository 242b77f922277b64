"""AWM + NormGuard on FLUX.2-klein-base: Flow-Factory's klein example (there is no official FLUX code).

Flow-Factory ``examples/awm/lora/flux2_klein_base/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 384x384, 8
Euler ODE steps on Flux2KleinPipeline's grid (empirical mu 1.963), CFG 4.0 in the rollouts and in the training
forward, sampled with the current policy. 48 prompts x group 16, 2 optimizer updates per iteration (the first
on-policy). 4 training timesteps by FF's ``discrete_wo_init`` rule: value range 0.7 without the first step, t in
[0.704, 0.980], one draw per sample. Advantages (r - group mean) / max(group std, 1e-6), then clamp(A, +-1). ghuber
weighting (p 0.25), ratio clip 1, KL to the reference 0, KL to the EMA 0.1. EMA decay min(0.9, (1 + e) / (10 + e))
at the 0-based epoch e (FF ``power``, default warmup 10). lr 3e-4. LoRA r64/a128 on FF's default targets, Qwen3 text
length 512. Evaluation: every 20 iterations, 1024x1024, 28 steps, CFG 4.0, under the AWM EMA, on the held-out split.
Needs ``data.negative_dir`` (see configs/_flux.py).

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``). NormGuard's velocity is the guided one.
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters); the AWM weighting in f32
    (FF: f64). The reward image is not rounded to uint8.
  * Prompts: FF trains on ``dataset/sharegpt4o_image_mini`` (128 train, 128 test prompts); encode those to compare.
    Evaluation scores the first ``eval.num_prompts`` (16) prompts of the test split; FF scores all 128.

    python -m normguard_jax.train --config configs/flux2_klein_awm.py --workdir /data/runs/flux2_klein_awm \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... --config.data.negative_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/flux2_klein_awm.py")
  c = load_sibling(__file__, "_flux").base_config("flux2", "awm")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/awm/lora/flux2_klein_base/default.yaml"
  # Flow-Factory examples/awm/lora/flux2_klein_base/default.yaml (y:NN = its line)
  c.model.resolution = 384  # y:67
  c.rollout.update(num_steps=8, cfg_scale=4.0, prompts_per_iter=48, group_size=16)  # y:69-70,74,76
  c.rl.update(lr=3e-4, num_train_timesteps=4, timestep_rule="value_range_wo_init", timestep_fraction=0.7,  # y:81,47-50
              timestep_share_rows=1, global_std=False, adv_eps=1e-6, adv_eps_kind="floor",  # y:73,75
              adv_aggregation="sum", old_max_decay=0.9, ema_kind="power", ema_warmup=10,  # y:42,60,62; emu:154-160
              ema_step="iteration", num_microbatches=16, updates_per_iter=2, train_cfg=True)  # y:77
  c.awm.update(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_mode="clamp", adv_clip=1.0,  # y:44-45,52-53
               kl_beta=0.0, ema_kl_beta=0.1)  # y:57,61
  c.eval.update(every=20, resolution=1024, num_steps=28, cfg_scale=4.0, policy="old")  # y:104-109; ffawm:186
  if "smoke" in variants:
    recipe.smoke(c)
  return c
