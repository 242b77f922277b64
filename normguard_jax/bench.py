"""Benchmark: the fused train step against separate forwards, side by side in one run.

    python -m normguard_jax.bench [--width 256 --depth 6 --batch 64 --lora-rank 16 --iters 20 --out bench.json]

Steps compared (same NFT + NormGuard loss, same batch, same optimizer):
  fused_split   one jitted program; reference and old branches under stop-gradient variables
  fused_concat  one jitted program; rows [policy; ref; old] in one batched forward with a per-row LoRA gate
  separate      three jitted programs: ref forward, old forward, then policy forward+backward and update
For each: median step time, and XLA-counted FLOPs (``compiled.cost_analysis()``) against the theoretical
count policy fwd+bwd (3 F) + reference fwd (F) + old fwd (F), where F is the counted FLOPs of one plain
forward of the same batch. Ratios are reported against ``separate``, measured in the same process.
"""

import argparse
import dataclasses
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from normguard_jax.models import dit
from normguard_jax.rl import normguard as ng
from normguard_jax.rl.nft import nft_loss
from normguard_jax.train import fused, state as state_lib, step as step_lib


def _flops(compiled):
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", float("nan"))) if ca else float("nan")


def _time(fn, iters):
  fn()  # warm
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--depth", type=int, default=6)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--image-size", type=int, default=16)
  p.add_argument("--patch", type=int, default=2)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--lora-rank", type=int, default=16)
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--out", default=None, help="write the results as JSON here")
  a = p.parse_args(argv)

  cfg = dit.DiTConfig(image_size=a.image_size, channels=4, patch_size=a.patch, width=a.width, depth=a.depth,
                      num_heads=a.heads, lora_rank=a.lora_rank, lora_alpha=2.0 * a.lora_rank,
                      lora_targets=("qkv", "proj", "mlp"))
  base_cfg = dataclasses.replace(cfg, lora_rank=0)
  variables = dit.init(cfg, jax.random.PRNGKey(0))
  rnd = lambda tree, s: jax.tree_util.tree_map(
      lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(s), x.shape), tree)
  base, lora = rnd(variables["params"], 1), rnd(variables["lora"], 2)
  apply_fn = lambda v, x, t, c, g: dit.velocity(v, x, t, c, cfg=cfg, lora_gate=g)
  ng_cfg = ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0))
  nft_cfg = ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0))
  tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(1.0), optax.adamw(1e-4))

  b = a.batch
  shape = (b, a.image_size, a.image_size, 4)
  x0 = jax.random.normal(jax.random.PRNGKey(3), shape)
  eps = jax.random.normal(jax.random.PRNGKey(4), shape)
  t = jax.random.uniform(jax.random.PRNGKey(5), (b,))
  batch = {"x0": x0, "eps": eps, "t": t, "x_t": (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps,
           "cond": jnp.arange(b, dtype=jnp.int32) % 10, "adv": jnp.linspace(-2, 2, b)}

  def new_state():
    st = state_lib.create(lora, base, tx, jax.random.PRNGKey(6), lora=True, with_old=True)
    return st.replace(old=rnd(st.old, 7))

  results = {}
  fwd = jax.jit(lambda v: dit.velocity(v, batch["x_t"], batch["t"], batch["cond"], cfg=base_cfg))
  f_fwd = _flops(fwd.lower({"params": base}).compile())
  theory = 5.0 * f_fwd
  for strategy in fused.STRATEGIES:
    step = jax.jit(functools.partial(step_lib.train_step, method="nft", apply_fn=apply_fn, optimizer=tx,
                                     loss_cfg=nft_cfg, ng_cfg=ng_cfg, strategy=strategy))
    st = new_state()
    compiled = step.lower(st, batch).compile()
    holder = {"st": st}
    def run_fused():
      holder["st"], m = compiled(holder["st"], batch)
      return m["loss"]
    results[f"fused_{strategy}"] = {"step_s": _time(run_fused, a.iters), "xla_flops": _flops(compiled)}

  # separate: ref and old forwards as their own programs, then the policy step consuming their outputs
  ref_fwd = jax.jit(lambda st, x, t, c: apply_fn({"params": st.frozen, "lora": st.trainable}, x, t, c,
                                                  jnp.zeros((x.shape[0], 1))))
  old_fwd = jax.jit(lambda st, x, t, c: apply_fn(st.old_variables(), x, t, c, None))

  def policy_step(st, batch, v_ref, v_old):
    lam = ng.current_lambda(st.opt_state)
    def loss_fn(tr):
      v = apply_fn(st.policy_variables(tr), batch["x_t"], batch["t"], batch["cond"], None)
      vel = fused.Velocities(v, v_ref, v_old)
      base_l, _ = nft_loss(vel, batch, nft_cfg)
      pen, m = ng.normguard_penalty(v, v_ref, ng_cfg)
      return base_l + lam * pen, m
    (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(st.trainable)
    upd, opt = tx.update(g, st.opt_state, st.trainable, ng_excess=m["ng_excess"])
    return st.replace(trainable=optax.apply_updates(st.trainable, upd), opt_state=opt), loss
  pol = jax.jit(policy_step)
  st = new_state()
  args = (batch["x_t"], batch["t"], batch["cond"])
  c_ref, c_old = ref_fwd.lower(st, *args).compile(), old_fwd.lower(st, *args).compile()
  v_ref0, v_old0 = c_ref(st, *args), c_old(st, *args)
  c_pol = pol.lower(st, batch, v_ref0, v_old0).compile()
  holder = {"st": st}
  def run_separate():
    s = holder["st"]
    holder["st"], loss = c_pol(s, batch, c_ref(s, *args), c_old(s, *args))
    return loss
  results["separate"] = {"step_s": _time(run_separate, a.iters),
                         "xla_flops": _flops(c_ref) + _flops(c_old) + _flops(c_pol)}

  sep = results["separate"]
  for name, r in results.items():
    r["flops_over_theory"] = r["xla_flops"] / theory
    r["time_over_separate"] = r["step_s"] / sep["step_s"]
  out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
         "jax": jax.__version__, "host": platform.node(), "config": vars(a),
         "forward_flops": f_fwd, "theory_flops": theory, "results": results}
  print(json.dumps(out, indent=2))
  if a.out:
    with open(a.out, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
