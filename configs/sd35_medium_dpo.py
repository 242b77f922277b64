"""Flow Diffusion-DPO + NormGuard on SD3.5-Medium: Flow-Factory's example (flow_grpo's DPO is not reproducible here).

Flow-Factory ``examples/dpo/lora/sd3_5/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 40 Euler ODE steps on
the linear grid (shift 3), CFG 1, sampled with the current policy. 48 prompts x group 4. The pair of each group is its
best and worst sample; on a tie it is one sample twice, which gives no gradient. beta 100. One logit-normal(0, 1)
training t per pair, no shift, clamped to [0.01, 0.99], shared by the 6 pairs of a device batch (48 pairs on 8 ranks).
lr 1e-5, one update per iteration. LoRA r32/a64 on the reference targets, T5 length 256. Evaluation: every 60
iterations, 40 steps, under the evaluation EMA min((1 + s) / (10 + s), 0.99), updated every 4 iterations.

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``).
  * Training t: FF maps the clamped logit-normal sample s to sigma = 1 - 0.99 s (``timestep_range`` 0.99,
    utils/noise_schedule.py:112-154), i.e. 0.01 + 0.99 s' with s' = 1 - s. Ours clamps s' to [0.01, 0.99]. Same
    distribution up to |d sigma| <= 0.01.
  * The evaluation EMA's step index is the 1-based iteration; FF's is the 0-based epoch (one step ahead of FF in
    (1 + s) / (10 + s) until it reaches 0.99). There is no ``eval.ema_step``.
  * The 6 pairs sharing a t are consecutive groups, not FF's shuffled pair batch (the same marginal per pair).
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters). The reward image is not
    rounded to uint8. Evaluation scores the first ``eval.num_prompts`` (64) test prompts; FF scores all 1024.

Not shipped: the official flow_grpo DPO (``yifan123/flow_grpo@ac4c86e`` ``config/dpo.py`` ``pickscore_sd3``). Already
available: 40 steps, CFG 4.5 (``rollout.cfg_scale``), the SDE with a = 0.7 (``rollout.noise_level``), the diffusers
grid, group 24, 39 timesteps per pair (``rl.num_train_timesteps``), tie "swap", lr 3e-4, T5 length 128. Missing:
  * rollouts from the frozen reference adapter (``ref_update_step`` 1e7, train_sd3_dpo.py:614-618): a rollout-policy
    option. Our rollouts always use the current policy.
  * training t from the shift-3 1000-step scheduler indexed by a logit-normal u (train_sd3_dpo.py:535,890-903): a
    shift for the DPO t (mean 0.715 against 0.5).
  * its evaluation EMA (decay 0.9, updated every 8 optimizer steps, train_sd3_dpo.py:422): an update-count interval.

    python -m normguard_jax.train --config configs/sd35_medium_dpo.py --workdir /data/runs/dpo \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/sd35_medium_dpo.py")
  c = load_sibling(__file__, "_sd35_medium").base_config("dpo")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/dpo/lora/sd3_5/default.yaml"
  # Flow-Factory examples/dpo/lora/sd3_5/default.yaml (y:NN = its line)
  c.rollout.update(num_steps=40, grid="linear", solver="euler", cfg_scale=1.0, prompts_per_iter=48,  # y:95,97,106
                   group_size=4)  # y:103
  c.rl.update(lr=1e-5, num_train_timesteps=1, num_microbatches=3, updates_per_iter=1)  # y:115,81,109; 3 x 32 rows
  c.dpo.update(beta=100.0, t_mean=0.0, t_std=1.0, t_clamp=0.01, t_share_pairs=6, ties="same")  # y:71,75-77,101
  c.data.max_sequence_length = 256
  c.eval.update(every=60, num_steps=40, cfg_scale=1.0, policy="ema", ema_kind="power", ema_max=0.99,  # y:145-149
                ema_warmup=10, ema_every=4)  # y:126-127; ta_ff:239-241 (default schedule 'power'); ffdpo:113
  if "smoke" in variants:
    recipe.smoke(c)
  return c
