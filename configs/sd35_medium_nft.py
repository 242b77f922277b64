"""DiffusionNFT + NormGuard on SD3.5-Medium: Flow-Factory's example (default) or the official code (:official).

Default: Flow-Factory ``examples/nft/lora/sd3_5/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 14 Euler ODE
steps on the linear grid (linspace(1, 1/14, 14), shift 3), CFG 1, sampled with the EMA ("old") policy. 48 prompts x
group 16, one update per iteration. 4 training timesteps by FF's ``discrete`` rule: value range 0.5, t in [0.625, 1],
one draw per device batch of 8. Advantages (r - group mean) / max(group std, 1e-6), clipped at 5. NFT beta 1,
KL 0, lr 1e-4. Old/EMA decay min(0.001 e, 0.5) at the 0-based epoch e. LoRA r32/a64 on the reference targets, T5
length 256. Evaluation: every 20 iterations, 40 steps under the EMA, on the held-out split.

``:official``: DiffusionNFT ``config/nft.py`` ``sd3_pickscore`` at ``NVlabs/DiffusionNFT@24af555``. 10 steps of the
deterministic multistep DPM-Solver 2 (``dpm2``) on the diffusers scheduler grid. 48 prompts x group 24. 9 random
sampler steps of the 10 per sample (``random_subset``). Advantages (r - prompt mean) / (global std + 1e-4). KL 1e-4,
lr 3e-4. Old decay min(0.001 s, 0.5) at the post-update step s. T5 length 128. Evaluation: every 10 iterations, 40
steps, under the separate evaluation EMA min((1 + s) / (10 + s), 0.9).

Departures, both variants (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``).
  * Precision: bf16 weights and compute with f32 LoRA and Adam state. FF keeps bf16 LoRA masters; official uses fp16
    autocast with f32 masters and a f32 VAE. The reward image is not rounded to uint8 (at most 1 uint8 level).
  * Evaluation scores the first ``eval.num_prompts`` (64) prompts of the test split; both references score all of it
    (FF 1024, official 2048). The evaluator samples all eval rows in one program, so raise it as memory allows.
  * Default: the 8 samples that share a training-timestep draw are consecutive rows (one prompt's group); FF's
    device batch is a shuffled slice. The marginal per sample is the same.
  * :official: official rollouts give the transformer floor(1000 t) as the timestep (pipeline_with_logprob.py:213);
    ours give 1000 t. (Its evaluation samples with Euler at 40 steps, as ours: ``eval.solver='euler'``.)

    python -m normguard_jax.train --config configs/sd35_medium_nft.py[:official] --workdir /data/runs/nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` (combinable, e.g. ``:official,smoke``) is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("official", "smoke")


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/sd35_medium_nft.py")
  c = load_sibling(__file__, "_sd35_medium").base_config("nft")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/nft/lora/sd3_5/default.yaml"
  # Flow-Factory examples/nft/lora/sd3_5/default.yaml (y:NN = its line)
  c.rollout.update(num_steps=14, grid="linear", solver="euler", prompts_per_iter=48, group_size=16)  # y:67,72,74,93
  c.rl.update(lr=1e-4, num_train_timesteps=4, timestep_rule="value_range", timestep_fraction=0.5,  # y:79,54-57
              timestep_share_rows=8, global_std=False, adv_eps=1e-6, adv_eps_kind="floor",  # y:71,73; ap:385
              adv_aggregation="sum", old_ramp=0.001, old_max_decay=0.5, ema_kind="piecewise_linear",  # y:43,47-50
              ema_step="iteration", num_microbatches=16, updates_per_iter=1)  # ffnft:237; y:75
  c.nft.update(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)  # y:44,63,60
  c.data.max_sequence_length = 256  # the diffusers SD3 default (FF sd3_5.py:103-112)
  c.eval.update(every=20, num_steps=40, policy="old")  # y:100-101; ffnft:141 (use_ema_parameters)
  if "official" in variants:
    # DiffusionNFT config/nft.py sd3_pickscore, config/base.py, scripts/train_nft_sd3.py
    c.reference = "NVlabs/DiffusionNFT@24af555 config/nft.py:sd3_pickscore"
    c.rollout.update(num_steps=10, grid="diffusers", solver="dpm2", group_size=24)  # nft.py:20,28-29,65-66
    c.rl.update(lr=3e-4, num_train_timesteps=9, timestep_rule="random_subset", timestep_fraction=0.99,  # base:66,87
                timestep_share_rows=0, global_std=True, adv_eps=1e-4, adv_eps_kind="add",  # base:57; st_fg:26-31
                ema_step="update", num_microbatches=81)  # tn:169-189,1021-1035; 10368 rows = 81 x 128
    c.nft.kl_beta = 1e-4  # nft.py:24; tn:966-970
    c.data.max_sequence_length = 128  # tn:603
    c.eval.update(every=10, num_steps=40, solver="euler", policy="ema", ema_kind="power", ema_max=0.9,  # base:21
                  ema_warmup=10,
                  ema_every=1)  # nft.py:21; tn:567 EMAModuleWrapper(decay=0.9); ema.py:26; eval with Euler: tn:204-280
  if "smoke" in variants:
    recipe.smoke(c)
  return c
