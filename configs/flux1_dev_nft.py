"""DiffusionNFT + NormGuard on FLUX.1-dev: Flow-Factory's FLUX.1 example (there is no official FLUX code).

Flow-Factory ``examples/nft/lora/flux1/default.yaml`` at ``X-GenGroup/Flow-Factory@a0b2bc5``. 384x384, 8 Euler ODE
steps on FluxPipeline's grid (mu 0.554 at 384^2), CFG-free with the embedded guidance 3.5, sampled with the EMA
("old") policy. 48 prompts x group 16, one update per iteration. 2 training timesteps by FF's ``discrete`` rule: value
range 0.7, t in [0.511, 1], one draw per device batch of 1 (per sample). Advantages (r - group mean) / max(group std,
1e-6), clipped at 5. NFT beta 1, KL 0, lr 3e-4. Old/EMA decay min(0.001 e, 0.5) at the 0-based epoch e. LoRA
r64/a128 on FF's default targets (attention + double-block FFNs), T5 length 512. Evaluation: every 20 iterations,
1024x1024, 28 steps, guidance 3.5, under the EMA, on the held-out split.

Departures (docs/recipes.md has the table with file:line on both sides):
  * NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge). A base comparison against the PyTorch
    runs needs ``--config.rl.normguard=off`` (or ``off,on``).
  * Precision: bf16 weights and compute with f32 LoRA and Adam state (FF: bf16 LoRA masters). The reward image is not
    rounded to uint8.
  * Evaluation scores the first ``eval.num_prompts`` (16) prompts of the test split; FF scores all of it (1024). The
    evaluator samples all eval rows in one program, so raise it as memory allows.

    python -m normguard_jax.train --config configs/flux1_dev_nft.py --workdir /data/runs/flux1_dev_nft \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/flux1_dev_nft.py")
  c = load_sibling(__file__, "_flux").base_config("flux1", "nft")
  c.reference = "X-GenGroup/Flow-Factory@a0b2bc5 examples/nft/lora/flux1/default.yaml"
  # Flow-Factory examples/nft/lora/flux1/default.yaml (y:NN = its line)
  c.model.update(resolution=384, guidance=3.5)  # y:65,67
  c.rollout.update(num_steps=8, cfg_scale=1.0, prompts_per_iter=48, group_size=16)  # y:66,71,73
  c.rl.update(lr=3e-4, num_train_timesteps=2, timestep_rule="value_range", timestep_fraction=0.7,  # y:78,53-56
              timestep_share_rows=1, global_std=False, adv_eps=1e-6, adv_eps_kind="floor",  # y:70,72; ap:385
              adv_aggregation="sum", old_ramp=0.001, old_max_decay=0.5, ema_kind="piecewise_linear",  # y:42,46-50
              ema_step="iteration", num_microbatches=16, updates_per_iter=1, train_cfg=False)  # ffnft:237; y:74
  c.nft.update(beta=1.0, adv_clip_max=5.0, kl_beta=0.0)  # y:43,62,59
  c.eval.update(every=20, resolution=1024, num_steps=28, policy="old")  # y:96-100; ffnft:141
  if "smoke" in variants:
    recipe.smoke(c)
  return c
