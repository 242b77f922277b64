"""AWM + NormGuard on FLUX.1-dev: Flow-Factory's FLUX.1 example (there is no official FLUX code).

Flow-Factory ``examples/awm/lora/flux1/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 512x512, 10 Euler ODE
steps on FluxPipeline's grid (mu 0.630 at 512^2), CFG-free with the embedded guidance 3.5, sampled with the current
policy. 48 prompts x group 16, one update per iteration. 4 training timesteps by FF's ``discrete`` rule: value range
0.7, t in [0.446, 1], one draw per device batch of 2. Advantages (r - group mean) / max(global std, 1e-6), then
clamp(A, +-1) (no /5). ghuber weighting (p 0.25), ratio clip 1, KL to the reference 0, KL to the EMA 0.1. EMA decay
0.3 min(e / 300, 1) at the 0-based epoch e (FF ``linear``, warmup 300). lr 3e-4. LoRA r64/a128 on FF's default
targets (attention + double-block FFNs), T5 length 512. Evaluation: every 20 iterations, 1024x1024, 20 steps, guidance
3.5, under the AWM EMA, on the held-out split.

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``).
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters); the AWM weighting in f32
    (FF: f64). The reward image is not rounded to uint8.
  * Evaluation scores the first ``eval.num_prompts`` (16) prompts of the test split; FF scores all of it (1024).
  * The 2 rows sharing a timestep draw are consecutive (one prompt's group), not FF's shuffled device batch.

    python -m normguard_jax.train --config configs/flux1_dev_awm.py --workdir /data/runs/flux1_dev_awm \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/flux1_dev_awm.py")
  c = load_sibling(__file__, "_flux").base_config("flux1", "awm")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/awm/lora/flux1/default.yaml"
  # Flow-Factory examples/awm/lora/flux1/default.yaml (y:NN = its line)
  c.model.update(resolution=512, guidance=3.5)  # y:68,70
  c.rollout.update(num_steps=10, cfg_scale=1.0, prompts_per_iter=48, group_size=16)  # y:69,74,76
  c.rl.update(lr=3e-4, num_train_timesteps=4, timestep_rule="value_range", timestep_fraction=0.7,  # y:81,47-50
              timestep_share_rows=2, global_std=True, adv_eps=1e-6, adv_eps_kind="floor",  # y:73,75; ap:385
              adv_aggregation="sum", old_max_decay=0.3, ema_kind="linear_warmup", ema_warmup=300,  # y:42,61-64
              ema_step="iteration", num_microbatches=16, updates_per_iter=1, train_cfg=False)  # ffawm:125; y:77
  c.awm.update(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_mode="clamp", adv_clip=1.0,  # y:44-45,52-53
               kl_beta=0.0, ema_kl_beta=0.1)  # y:57,60
  c.eval.update(every=20, resolution=1024, num_steps=20, policy="old")  # y:99-103; ffawm:186
  if "smoke" in variants:
    recipe.smoke(c)
  return c
