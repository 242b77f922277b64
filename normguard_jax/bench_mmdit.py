"""Benchmark: one LoRA training step of an SD3.5-Medium-shaped MMDiT, JAX against diffusers PyTorch.

    python -m normguard_jax.bench_mmdit [--preset small|sd35-medium] [--layers N --heads H --head-dim D ...]
        [--batch 2 --lora-rank 16 --iters 5] [--bf16] [--peak-tflops 989] [--no-torch] [--out bench.json]

The step, identical in both frameworks (same random weights, same LoRA, same batch):
  policy forward with the LoRA (adapter on every attention projection) + backward to the LoRA params, and the
  reference forward (adapter off) without gradients. In JAX it is one jitted program
  (``train.fused.fused_velocities(strategy='split')``: the reference under stop-gradient); in PyTorch it is
  diffusers' ``SD3Transformer2DModel`` with a peft LoRA (exported from our tree by ``convert.export``), the
  reference under ``torch.no_grad()`` with ``disable_lora()``, then the policy forward + ``backward()``.
  Loss: mse(v, target) + mean(relu(||v|| - ||v_ref||)) (a NormGuard-like hinge, so the reference is used).
Reported: median step time of each and the ratio torch / jax, XLA-counted FLOPs of the step
(``compiled.cost_analysis()``), achieved TFLOP/s (both, on the XLA count) and MFU with --peak-tflops, and the
rel-L2 of the JAX vs PyTorch policy velocity (in bf16 with --bf16: both frameworks then compute in bf16).
The preset ``sd35-medium`` has SD3.5 Medium's shapes (24 layers, 24 x 64 heads, dual attention on 0..12,
qk RMSNorm, 128 x 128 latents, 333 text tokens); ``small`` (the default) shrinks width, depth and tokens so
that a CPU run takes a minute or two. Weights are random: nothing is downloaded.
"""

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the accelerator in this run
# torch's OpenMP workers spin-wait by default; next to XLA's CPU thread pool (or any other load) that makes CPU
# step times erratic (measured: 0.16-6 s for a 0.11 s step on 2 cores). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from normguard_jax.convert import export  # noqa: E402
from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.convert.safetensors_io import TensorInfo  # noqa: E402
from normguard_jax.models import mmdit  # noqa: E402
from normguard_jax.train import fused  # noqa: E402

PRESETS = {
    "small": dict(layers=4, dual_layers=2, heads=4, head_dim=32, latent=32, text_len=64, joint_dim=128,
                  pooled_dim=64, batch=2, lora_rank=8),
    "sd35-medium": dict(layers=24, dual_layers=13, heads=24, head_dim=64, latent=128, text_len=333, joint_dim=4096,
                        pooled_dim=2048, batch=2, lora_rank=32),
}


def _diffusers_kwargs(a):
  inner = a.heads * a.head_dim
  return dict(sample_size=a.latent, patch_size=2, in_channels=16, num_layers=a.layers, attention_head_dim=a.head_dim,
              num_attention_heads=a.heads, joint_attention_dim=a.joint_dim, caption_projection_dim=inner,
              pooled_projection_dim=a.pooled_dim, out_channels=16, pos_embed_max_size=max(96, a.latent // 2),
              dual_attention_layers=tuple(range(a.dual_layers)), qk_norm="rms_norm")


class _TorchCheckpoint:
  """A torch state dict seen through the converter's checkpoint interface (keys / info / load)."""

  def __init__(self, state_dict):
    self.sd = state_dict

  def keys(self):
    return self.sd.keys()

  def info(self, key):
    t = self.sd[key]
    return TensorInfo("F32", tuple(t.shape), 0, 4 * t.numel())

  def load(self, key):
    return self.sd[key].detach().float().cpu().numpy()


def _rel_l2(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _median_time(fn, iters, sync, warmup=2):
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _loss_jax(v, v_ref, target):
  norm = lambda u: jnp.sqrt(jnp.sum(jnp.square(u.astype(jnp.float32)), axis=(1, 2, 3)))
  return jnp.mean(jnp.square(v - target)) + jnp.mean(jax.nn.relu(norm(v) - norm(v_ref)))


def run(a):
  import torch
  import diffusers

  torch.manual_seed(a.seed)
  kwargs = _diffusers_kwargs(a)
  on_gpu = jax.default_backend() == "gpu"
  tdev = torch.device("cuda" if on_gpu and torch.cuda.is_available() else "cpu")
  t0 = time.perf_counter()
  tmodel = diffusers.SD3Transformer2DModel(**kwargs)
  with torch.no_grad():  # every weight random (the zero-initialised adaLN / out projections too)
    for name, p in tmodel.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.02)
  cfg = convert_sd3.config_from_diffusers(kwargs, scan_layers=True, lora_rank=a.lora_rank, lora_alpha=a.lora_rank,
                                          dtype="bfloat16" if a.bf16 else "float32", remat=a.remat)
  params = convert_sd3.convert_checkpoint(_TorchCheckpoint(tmodel.state_dict()), cfg)
  lora = mmdit.init_lora(cfg, jax.random.PRNGKey(a.seed))
  leaves, treedef = jax.tree_util.tree_flatten(lora)
  keys = jax.random.split(jax.random.PRNGKey(a.seed + 1), len(leaves))
  lora = jax.tree_util.tree_unflatten(treedef, [0.02 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  setup_s = time.perf_counter() - t0

  rng = np.random.default_rng(a.seed)
  b, s = a.batch, a.latent
  x = rng.standard_normal((b, s, s, 16)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (b,)).astype(np.float32)
  cond = dict(prompt_embeds=rng.standard_normal((b, a.text_len, a.joint_dim)).astype(np.float32),
              pooled=rng.standard_normal((b, a.pooled_dim)).astype(np.float32))
  target = rng.standard_normal((b, s, s, 16)).astype(np.float32)

  # ---------------------------------------------------------------- JAX
  apply_fn = lambda v, x_, t_, c_, g: mmdit.velocity(v, x_, t_, c_, cfg=cfg, lora_gate=g)
  params_j = jax.device_put(params)

  def step(lora_, params_, x_, t_, c_, tgt):
    def loss_fn(tr):
      vel = fused.fused_velocities(apply_fn, tr, params_, None, x_, t_, c_, lora=True, strategy="split")
      return _loss_jax(vel.policy, vel.ref, tgt), vel.policy
    (loss, v), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora_)
    return loss, v, grads

  jstep = jax.jit(step)
  args = (lora, params_j, x, t, cond, target)
  tc = time.perf_counter()
  compiled = jstep.lower(*args).compile()
  compile_s = time.perf_counter() - tc
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  flops = float(ca.get("flops", float("nan"))) if ca else float("nan")
  out = {}
  jax_s, jax_times = _median_time(lambda: out.__setitem__("r", compiled(*args)), a.iters,
                                  lambda: jax.block_until_ready(out["r"]), warmup=a.warmup)
  j_loss, j_v, _ = out["r"]
  fwd_flops = float("nan")
  try:  # one plain forward, for context (policy fwd+bwd + ref fwd ~ 4 forwards)
    fca = jax.jit(lambda v: mmdit.velocity(v, x, t, cond, cfg=cfg)).lower({"params": params_j, "lora": lora}).compile()
    fca = fca.cost_analysis()
    fca = fca[0] if isinstance(fca, (list, tuple)) else fca
    fwd_flops = float(fca.get("flops", float("nan")))
  except Exception:  # cost analysis is best effort on some backends
    pass

  res = {
      "config": dict(vars(a), diffusers_config={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}),
      "device": {"jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0].device_kind),
                 "torch_device": str(tdev), "cpu": platform.processor() or platform.machine(),
                 "cpu_count": os.cpu_count(), "jax": jax.__version__,
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
      "params": {"base": int(mmdit.param_count(params)), "lora": int(mmdit.param_count(lora))},
      "tokens": {"image": (s // 2) ** 2, "text": a.text_len},
      "jax": {"step_s": jax_s, "times_s": jax_times, "compile_s": compile_s, "loss": float(j_loss)},
      "xla_flops_step": flops, "xla_flops_forward": fwd_flops,
      "setup_s": setup_s,
  }
  res["jax"]["tflops_per_s"] = flops / jax_s / 1e12
  if a.peak_tflops:
    res["jax"]["mfu"] = res["jax"]["tflops_per_s"] / a.peak_tflops

  if a.no_torch:
    return res
  # ---------------------------------------------------------------- PyTorch (diffusers + peft)
  tdtype = torch.bfloat16 if a.bf16 else torch.float32
  sd, _ = export.lora_state_dict(cfg, lora, fold_alpha=True)
  tmodel.load_lora_adapter({k: torch.from_numpy(v) for k, v in sd.items()}, adapter_name="bench", prefix="transformer")
  tmodel = tmodel.to(tdev, tdtype).train()
  for n, p in tmodel.named_parameters():
    p.requires_grad_("lora_" in n)
  lora_params = [p for p in tmodel.parameters() if p.requires_grad]
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)
  tt = torch.from_numpy(t * np.float32(1000.0)).to(tdev)
  tp = torch.from_numpy(cond["prompt_embeds"]).to(tdev, tdtype)
  tpool = torch.from_numpy(cond["pooled"]).to(tdev, tdtype)
  ttgt = torch.from_numpy(target.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)
  fwd = lambda: tmodel(hidden_states=tx, encoder_hidden_states=tp, pooled_projections=tpool, timestep=tt,
                       return_dict=False)[0]
  norm = lambda u: u.float().square().sum(dim=(1, 2, 3)).sqrt()
  tout = {}

  def tstep():
    for p in lora_params:
      p.grad = None
    with torch.no_grad():
      tmodel.disable_lora()
      v_ref = fwd()
      tmodel.enable_lora()
    v = fwd()
    loss = (v.float() - ttgt.float()).square().mean() + torch.relu(norm(v) - norm(v_ref)).mean()
    loss.backward()
    tout.update(loss=loss.detach(), v=v.detach())

  sync = (lambda: torch.cuda.synchronize()) if tdev.type == "cuda" else (lambda: None)
  torch_s, torch_times = _median_time(tstep, a.iters, sync, warmup=a.warmup)
  t_v = tout["v"].float().cpu().numpy().transpose(0, 2, 3, 1)
  res["torch"] = {"step_s": torch_s, "times_s": torch_times, "loss": float(tout["loss"]),
                  "tflops_per_s": flops / torch_s / 1e12, "dtype": str(tdtype), "torch": torch.__version__,
                  "lora": "peft (diffusers load_lora_adapter of our export)"}
  if a.peak_tflops:
    res["torch"]["mfu"] = res["torch"]["tflops_per_s"] / a.peak_tflops
  res["ratio_torch_over_jax"] = torch_s / jax_s
  res["velocity_rel_l2_jax_vs_torch"] = _rel_l2(np.asarray(j_v), t_v)
  res["loss_abs_diff"] = abs(float(j_loss) - float(tout["loss"]))
  return res


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.bench_mmdit", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small", choices=sorted(PRESETS))
  p.add_argument("--layers", type=int, help="number of joint blocks")
  p.add_argument("--dual-layers", type=int, help="the first N blocks have dual attention (SD3.5: 13 of 24)")
  p.add_argument("--heads", type=int)
  p.add_argument("--head-dim", type=int)
  p.add_argument("--latent", type=int, help="latent side (128 for 1024 px)")
  p.add_argument("--text-len", type=int, help="text tokens (SD3: 77 CLIP + 256 T5 = 333)")
  p.add_argument("--joint-dim", type=int, help="text embedding width (4096)")
  p.add_argument("--pooled-dim", type=int, help="pooled width (2048)")
  p.add_argument("--batch", type=int)
  p.add_argument("--lora-rank", type=int)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (each framework)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--remat", action="store_true", help="rematerialise each block in JAX")
  p.add_argument("--bf16", action="store_true", help="compute in bf16 in both (JAX: bf16 compute, f32 params; "
                 "torch: model cast to bf16)")
  p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for MFU (e.g. H100 SXM bf16 989)")
  p.add_argument("--no-torch", action="store_true", help="JAX only")
  p.add_argument("--out", default=None, help="also write the JSON here")
  a = p.parse_args(argv)
  for k, v in PRESETS[a.preset].items():
    if getattr(a, k) is None:
      setattr(a, k, v)
  if not 0 <= a.dual_layers <= a.layers:
    p.error("--dual-layers must be in [0, --layers]")
  res = run(a)
  text = json.dumps(res, indent=2)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text + "\n")
  return res


if __name__ == "__main__":
  main()
