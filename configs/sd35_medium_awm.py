"""AWM + NormGuard on SD3.5-Medium: Flow-Factory's example (default) or the official code (:official, Euler).

Default: Flow-Factory ``examples/awm/lora/sd3_5/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 14 Euler ODE
steps on the linear grid (shift 3), CFG 1, sampled with the current policy. 48 prompts x group 16, one update per
iteration. 6 training timesteps by FF's ``discrete_wo_init`` rule: value range 0.9 without the first step, t in
[0.333, 0.975], one draw per device batch of 8. Advantages (r - group mean) / max(global std, 1e-6), then clamp(A,
+-1) (no /5). ghuber weighting (p 0.25), ratio clip 1, KL to the reference 1e-4, KL to the EMA 1. EMA decay
0.3 min(e / 1000, 1) at the 0-based epoch e (FF ``linear``, warmup 1000). lr 3e-4. LoRA r32/a64 on the reference
targets, T5 length 256. Evaluation: every 20 iterations, 40 steps under the AWM EMA, on the held-out split.

``:official``: AWM ``config/dgx_awm.py`` ``pickscore_sd3_no_cfg_1node`` at
``scxue/advantage_weighted_matching@be51372``. 14 steps on the diffusers scheduler grid. 24 prompts x group 24. 6
training timesteps by the official ``discrete`` rule: index strata of linspace(0, int(14 x 0.9) = 12, 7), t in
[0.357, 1], one draw per micro-batch of 2.
Advantages (r - prompt mean) / (global std + 1e-4), then clip(A, +-5) / 5. KL 1e-4 and EMA-KL 1, the EMA decay
min(0.001 s, 0.3) at the post-update step s. lr 3e-4, T5 length 128. Evaluation: every 50 iterations, 40 Euler steps,
under the evaluation EMA min((1 + s) / (10 + s), 0.99).

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``).
  * :official rolls out with Euler. The official code uses SA-Solver (predictor 2 / corrector 2, PEC, no noise) on
    a sigma grid with t_0 = 1 - 1e-3 and t_{K-1} = t_{K-2} / 2 (sd3_pipeline_with_logprob.py:271-297). SA-Solver is
    not implemented. The training timesteps are the scheduler's unmodified grid in both.
  * :official trains from the first iteration. The official code samples but skips training in epochs 0-1 (a
    workaround, train_sd3_awm.py:880-881), so its epoch n is our iteration n - 2. It logs the raw policy's eval reward
    too; ours scores the evaluation EMA only (set ``--config.eval.policy=raw`` for the other curve).
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters; official: fp16 AMP).
    The AWM weighting runs in f32 (both references: f64). The reward image is not rounded to uint8.
  * Evaluation scores the first ``eval.num_prompts`` (64) prompts of the test split; the references score all of it
    (FF 1024, official 2048).
  * Default: the 8 rows sharing a timestep draw are consecutive (one prompt's group), not FF's shuffled device batch.

    python -m normguard_jax.train --config configs/sd35_medium_awm.py[:official] --workdir /data/runs/awm \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` (combinable, e.g. ``:official,smoke``) is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("official", "smoke")


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/sd35_medium_awm.py")
  c = load_sibling(__file__, "_sd35_medium").base_config("awm")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/awm/lora/sd3_5/default.yaml"
  # Flow-Factory examples/awm/lora/sd3_5/default.yaml (y:NN = its line)
  c.rollout.update(num_steps=14, grid="linear", solver="euler", prompts_per_iter=48, group_size=16)  # y:70,75,77,96
  c.rl.update(lr=3e-4, num_train_timesteps=6, timestep_rule="value_range_wo_init", timestep_fraction=0.9,  # y:82,48-51
              timestep_share_rows=8, global_std=True, adv_eps=1e-6, adv_eps_kind="floor",  # y:74,76; ap:385
              adv_aggregation="sum", old_max_decay=0.3, ema_kind="linear_warmup", ema_warmup=1000,  # y:43,61-65
              ema_step="iteration", num_microbatches=24, updates_per_iter=1)  # ffawm:125; y:78
  c.awm.update(weighting="ghuber", ghuber_p=0.25, clip_range=1.0, adv_mode="clamp", adv_clip=1.0,  # y:45-46,53-54
               kl_beta=1e-4, ema_kl_beta=1.0)  # y:58,62
  c.data.max_sequence_length = 256
  c.eval.update(every=20, num_steps=40, policy="old")  # y:103-104; ffawm:186 (use_ema_parameters)
  if "official" in variants:
    # AWM config/dgx_awm.py:309-377, config/base_awm.py, scripts/train_sd3_awm.py
    c.reference = "scxue/advantage_weighted_matching@be51372 config/dgx_awm.py:pickscore_sd3_no_cfg_1node"
    c.rollout.update(num_steps=14, grid="diffusers", solver="euler", prompts_per_iter=24,
                     group_size=24)  # dgx:315,322-324
    c.rl.update(num_train_timesteps=6, timestep_rule="index_range", timestep_fraction=0.9,  # dgx:334,338,367
                timestep_share_rows=2, global_std=True, adv_eps=1e-4, adv_eps_kind="add",  # dgx:329,350; ta:1172-1180
                old_ramp=0.001, old_max_decay=0.3, ema_kind="piecewise_linear",  # dgx:344,346; ta:1413
                ema_step="update", num_microbatches=27)  # 3456 rows = 27 x 128
    c.awm.update(adv_mode="div5", adv_clip=5.0, adv_max=1.0,  # awmbase:91; dgx:336
                 kl_beta=1e-4, ema_kl_beta=1.0)  # dgx:333,345
    c.data.max_sequence_length = 128  # ta:865
    c.eval.update(every=50, num_steps=40, policy="ema", ema_kind="power", ema_max=0.99, ema_warmup=10,  # dgx:316,354
                  ema_every=1)  # dgx:370-371; ta:647,1392; ema.py:33-37
  if "smoke" in variants:
    recipe.smoke(c)
  return c
