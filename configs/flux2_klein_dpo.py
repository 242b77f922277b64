"""Flow Diffusion-DPO + NormGuard on FLUX.2-klein-base. No reference exists: FF's SD3.5 DPO on FF's klein sampling.

Neither Flow-Factory nor flow_grpo ships a FLUX DPO (and the official codes are SD3 only), so no PyTorch run to
compare with exists: any comparison depends on a setup the user chooses. The values come from two Flow-Factory
examples at ``X-GenGroup/Flow-Factory@a0b2bc5``:
  * DPO, from ``examples/dpo/lora/sd3_5/default.yaml`` (as configs/sd35_medium_dpo.py): 48 prompts x group 4, the
    best and worst sample of each group (a tie gives one sample twice: no gradient), beta 100, one logit-normal(0, 1)
    training t per pair with no shift, clamped to [0.01, 0.99], shared by 6 pairs, lr 1e-5, and evaluation under the
    EMA min((1 + s) / (10 + s), 0.99) updated every 4 iterations.
  * Sampling and evaluation, from ``examples/nft/lora/flux2_klein_base/default.yaml`` (as configs/flux2_klein_nft.py):
    384x384, 8 Euler ODE steps on Flux2KleinPipeline's grid, CFG 4.0 in the rollouts and, as FF's klein adapter does
    for every trainer (models/flux/flux2_klein.py:801-815), in the training forward; LoRA r64/a128 on FF's default
    klein targets, Qwen3 text length 512, evaluation every 20 iterations at 1024x1024 with 28 steps and CFG 4.0.
Needs ``data.negative_dir`` (see configs/_flux.py).

NormGuard is on (``rl.normguard='on'``, lambda 1, relative linear hinge); ``--config.rl.normguard=off`` (or ``off,on``)
gives the base run. Precision: bf16 weights and compute with f32 LoRA and Adam state.

    python -m normguard_jax.train --config configs/flux2_klein_dpo.py --workdir /data/runs/flux2_klein_dpo \\
        --config.model.weights_dir=... --config.data.embeddings_dir=... --config.data.negative_dir=... \\
        --config.reward.options.pickscore.model_dir=... --config.reward.options.pickscore.processor_dir=...

``:smoke`` is a one-minute dry run on a tiny snapshot (configs/_recipe.py).
"""

from normguard_jax.config import load_sibling

VARIANTS = ("smoke",)


def get_config(arg=None):
  recipe = load_sibling(__file__, "_recipe")
  variants = recipe.select_variants(arg, VARIANTS, "configs/flux2_klein_dpo.py")
  c = load_sibling(__file__, "_flux").base_config("flux2", "dpo")
  c.reference = "none (no FLUX DPO reference exists; Flow-Factory SD3.5 DPO values on the FLUX.2-klein sampling)"
  c.model.resolution = 384  # FF klein NFT y:64
  c.rollout.update(num_steps=8, cfg_scale=4.0, prompts_per_iter=48, group_size=4)  # klein NFT y:66-67; FF DPO y:103,106
  c.rl.update(lr=1e-5, num_train_timesteps=1, num_microbatches=3, updates_per_iter=1, train_cfg=True)  # FF DPO y:115,81
  c.dpo.update(beta=100.0, t_mean=0.0, t_std=1.0, t_clamp=0.01, t_share_pairs=6, ties="same")  # FF DPO y:71,75-77,101
  c.eval.update(every=20, resolution=1024, num_steps=28, cfg_scale=4.0, policy="ema", ema_kind="power",  # klein NFT
                ema_max=0.99, ema_warmup=10, ema_every=4)  # y:101-106; FF DPO y:126-127
  if "smoke" in variants:
    recipe.smoke(c)
  return c
