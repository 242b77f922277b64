"""The accelerator benchmark: SD3.5-Medium-shaped MMDiT, JAX against diffusers PyTorch, one process, one device.

    python -m normguard_jax.bench_suite [--preset small|sd35-medium] [--out FILE.json] [--attention auto]
        [--iters 5 --warmup 2] [--remat] [--peak-tflops T] [--no-torch] [--seed 0]
    launch/bench_accelerator.sh [--out FILE.json]        # the real preset, bf16

Random weights of the preset's shape (nothing is downloaded): diffusers' ``SD3Transformer2DModel`` is built and
randomised in PyTorch and converted by our strict converter, so both frameworks hold the same weights; the LoRA
(every joint-attention projection, as the recipes) is made in JAX and exported to PEFT. Everything computes in
bf16: JAX with bf16 frozen params and f32 LoRA / Adam state (as the recipes), PyTorch with the model cast to bf16
(as diffusers' LoRA scripts do for bf16).

(a) Train step: the NFT + NormGuard LoRA step. JAX: ``train.step.train_step`` (fused policy forward+backward, ref
    and old forwards under stop-gradient; NFT loss + NormGuard hinge; clip + AdamW), jitted with the state donated,
    ``model.attention_impl`` = ``--attention``. PyTorch: the same step, written as a diffusers user would: ref
    forward with ``disable_lora()``, old forward with the "old" PEFT adapter, both under ``no_grad``; policy
    forward, the same loss, ``backward()``, clip, ``torch.optim.AdamW``; attention is diffusers' SDPA. Reported:
    median step time, the PyTorch/JAX ratio, model TFLOP/s and MFU (counted model FLOPs, :func:`step_flops`,
    over the device's peak, ``PEAK_BF16_TFLOPS``), and XLA's own FLOP count for context.
(b) Rollout: 10 Euler steps (SD3's scheduler grid, shift 3), CFG-free, policy LoRA on, at the preset's rollout
    size (512^2, 16 rows). JAX: ``train.rollout.rollout`` (``lax.scan``, ``track_rho=False``: one forward per step
    like the pipeline). PyTorch: ``StableDiffusion3Pipeline``'s transformer loop with ``FlowMatchEulerDiscrete-
    Scheduler``, embeddings given, from the same initial noise. Images/s counts latents (no VAE decode in either).
(c) The bf16 rel-L2 between the JAX and PyTorch policy velocities at the train batch, and between the two
    rollouts' final latents.
One JSON (``--out``) and a printed table. Never part of CI; ``tests/test_bench_suite.py`` runs ``--preset small``.
"""

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the accelerator in this run
# torch's OpenMP workers spin-wait by default; next to XLA's CPU thread pool that makes CPU step times erratic
# (measured: 0.16-6 s for a 0.11 s step on 2 cores). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from normguard_jax.convert import export  # noqa: E402
from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.convert.safetensors_io import TensorInfo  # noqa: E402
from normguard_jax.flow import schedules  # noqa: E402
from normguard_jax.models import attention as attention_lib  # noqa: E402
from normguard_jax.models import mmdit  # noqa: E402
from normguard_jax.rl import normguard as ng  # noqa: E402
from normguard_jax.train import rollout as rollout_lib  # noqa: E402
from normguard_jax.train import state as state_lib  # noqa: E402
from normguard_jax.train import step as step_lib  # noqa: E402

PRESETS = {
    # SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium transformer/config.json); 512^2 = 64^2 latents,
    # 333 text tokens (77 CLIP + 256 T5); the recipes' LoRA r32 / alpha 64.
    "sd35-medium": dict(layers=24, dual_layers=13, heads=24, head_dim=64, joint_dim=4096, pooled_dim=2048,
                        pos_embed_max_size=384, text_len=333, latent=64, batch=8, lora_rank=32,
                        rollout_rows=16, rollout_steps=10),
    # seconds on a CPU: the test's preset
    "small": dict(layers=1, dual_layers=1, heads=2, head_dim=16, joint_dim=32, pooled_dim=32, pos_embed_max_size=16,
                  text_len=12, latent=16, batch=2, lora_rank=4, rollout_rows=2, rollout_steps=2),
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SHIFT = 3.0  # SD3's scheduler shift (the recipes' rollout.shift)

# Dense (no sparsity) bf16 peak TFLOP/s by device kind, first match on the lower-cased kind wins. Sources:
# NVIDIA H100 Tensor Core GPU datasheet (SXM 989, PCIe 756; the table's "1979" is with sparsity);
# NVIDIA H200 datasheet (989, as H100 SXM); NVIDIA A100 datasheet (312);
# cloud.google.com/tpu/docs/v4 (275), /v5e (197), /v5p (459), /v6e (918).
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
    ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v6 lite", 918.0), ("tpu v6e", 918.0), ("tpu v5p", 459.0),
    ("tpu v5", 459.0), ("tpu v4", 275.0),
)


def peak_tflops(device_kind):
  kind = device_kind.lower()
  return next((v for k, v in PEAK_BF16_TFLOPS if k in kind), None)


# ----------------------------------------------------------------------------------------------- FLOP count

def forward_flops(cfg, batch, image_tokens, text_tokens, lora=True):
  """Counted model FLOPs of one MMDiT forward (2 per multiply-add), split into dense / attention / lora.

  Per joint block, D = inner width, N image and T text tokens, S = N + T: q, k, v, out projections of both
  streams 8 D^2 (N + T) (the last block has no text out projection), joint attention 4 S^2 D (QK^T and PV), tanh
  MLPs 16 D^2 (N + T) (none for the last block's text), adaLN; dual blocks add attn2 on the image tokens
  (4 N D^2 + 4 N^2 D); LoRA r on every adapted projection 4 r D per token. Embeddings and the output projection
  are counted; norms, softmax and elementwise work are not.
  """
  d, n, t, s = cfg.inner_dim, image_tokens, text_tokens, image_tokens + text_tokens
  p2c = cfg.patch_size ** 2
  dense = 2 * n * p2c * cfg.in_channels * d + 2 * t * cfg.joint_attention_dim * d  # patch + context embedders
  dense += 2 * n * d * p2c * cfg.out_channels + 2 * d * 2 * d                       # proj_out, norm_out adaLN
  dense += 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d)     # timestep + pooled MLPs
  attn = lora_f = 0
  for i in range(cfg.num_layers):
    last, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
    ctx_out = 0 if last else 1
    dense += 2 * d * d * (3 * n + 3 * t + n + ctx_out * t)              # q, k, v of both streams; out projections
    dense += 2 * d * 4 * d * 2 * (n + ctx_out * t)                       # MLPs (4x hidden)
    dense += 2 * d * d * ((9 if dual else 6) + (2 if last else 6))      # adaLN of both streams (per row)
    attn += 4 * s * s * d
    tokens = {"to_q": n, "to_k": n, "to_v": n, "to_out": n, "add_q_proj": t, "add_k_proj": t, "add_v_proj": t,
              "to_add_out": ctx_out * t}
    if dual:
      dense += 2 * d * d * 4 * n
      attn += 4 * n * n * d
      tokens.update({k: tokens[k] + n for k in ("to_q", "to_k", "to_v", "to_out")})
    if lora:
      lora_f += sum(4 * cfg.lora_rank_for(k) * d * tok for k, tok in tokens.items())
  return {"dense": batch * dense, "attention": batch * attn, "lora": batch * lora_f}


def step_flops(cfg, batch, image_tokens, text_tokens):
  """Model FLOPs of the NFT LoRA step: ref forward (adapter off) + old forward + policy forward + policy backward.

  The backward of frozen base weights needs input gradients only (1x their forward), attention's backward is 2x
  its forward (dQ, dK, dV, dP), the LoRA backward 2x (input and weight gradients). Rematerialisation is not
  counted (model FLOPs, not hardware FLOPs).
  """
  f = forward_flops(cfg, batch, image_tokens, text_tokens)
  fwd = f["dense"] + f["attention"] + f["lora"]
  return (f["dense"] + f["attention"]) + 2 * fwd + (f["dense"] + 2 * f["attention"] + 2 * f["lora"])


# ----------------------------------------------------------------------------------------------- helpers

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


def _median_time(fn, iters, sync, warmup):
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


def _diffusers_kwargs(a):
  inner = a.heads * a.head_dim
  return dict(sample_size=128, patch_size=2, in_channels=16, num_layers=a.layers, attention_head_dim=a.head_dim,
              num_attention_heads=a.heads, joint_attention_dim=a.joint_dim, caption_projection_dim=inner,
              pooled_projection_dim=a.pooled_dim, out_channels=16, pos_embed_max_size=a.pos_embed_max_size,
              dual_attention_layers=tuple(range(a.dual_layers)), qk_norm="rms_norm")


def _random_lora(cfg, seed, scale):
  """Both LoRA factors ~ N(0, scale^2) (a trained-looking adapter, not the zero-B init), built on the host."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
                                mmdit.param_shapes(cfg)["lora"])


@dataclasses.dataclass
class _Setup:
  cfg: object
  params: object          # JAX frozen params (bf16)
  lora: object            # policy adapter (f32)
  old: object             # old adapter (f32)
  tmodel: object          # torch model (bf16) with adapters "policy" and "old", or None
  tdev: object
  batch: dict             # numpy train batch (NHWC)
  rollout_cond: dict      # numpy embeddings for the rollout rows


def _setup(a, with_torch):
  import torch
  import diffusers
  torch.manual_seed(a.seed)
  kwargs = _diffusers_kwargs(a)
  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  tdev = torch.device("cuda" if on_gpu else "cpu")
  with torch.device(tdev):
    tmodel = diffusers.SD3Transformer2DModel(**kwargs)
  with torch.no_grad():  # every weight random (the zero-initialised adaLN / out projections too)
    for name, p in tmodel.named_parameters():
      if p.ndim >= 2:
        p.normal_(0.0, 1.0 / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.02)
  cfg = convert_sd3.config_from_diffusers(kwargs, scan_layers=True, lora_rank=a.lora_rank,
                                          lora_alpha=2.0 * a.lora_rank, lora_targets=LORA_TARGETS, dtype="bfloat16",
                                          remat=a.remat, attention_impl=a.attention)
  params = convert_sd3.convert_checkpoint(_TorchCheckpoint(tmodel.state_dict()), cfg,
                                          param_dtype=np.dtype(jnp.bfloat16))
  params = jax.device_put(params)
  lora = _random_lora(cfg, a.seed, 0.02)
  old = jax.tree_util.tree_map(lambda p, q: p + 0.1 * q, lora, _random_lora(cfg, a.seed + 7, 0.02))
  if with_torch:
    for name, tree in (("policy", lora), ("old", old)):
      sd, _ = export.lora_state_dict(cfg, tree, fold_alpha=True)
      tmodel.load_lora_adapter({k: torch.from_numpy(v) for k, v in sd.items()}, adapter_name=name,
                               prefix="transformer")
    tmodel = tmodel.to(tdev, torch.bfloat16)
    tmodel.set_adapters("policy")
  else:
    del tmodel
    tmodel = None

  rng = np.random.default_rng(a.seed)
  b, s = a.batch, a.latent
  x0 = rng.standard_normal((b, s, s, 16)).astype(np.float32)
  eps = rng.standard_normal((b, s, s, 16)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (b,)).astype(np.float32)
  cond = dict(prompt_embeds=rng.standard_normal((b, a.text_len, a.joint_dim)).astype(np.float32),
              pooled=rng.standard_normal((b, a.pooled_dim)).astype(np.float32))
  batch = dict(x0=x0, eps=eps, x_t=(1.0 - t[:, None, None, None]) * x0 + t[:, None, None, None] * eps, t=t,
               adv=rng.standard_normal(b).astype(np.float32), cond=cond)
  r = a.rollout_rows
  rollout_cond = dict(prompt_embeds=rng.standard_normal((r, a.text_len, a.joint_dim)).astype(np.float32),
                      pooled=rng.standard_normal((r, a.pooled_dim)).astype(np.float32))
  return _Setup(cfg, params, lora, old, tmodel, tdev, batch, rollout_cond)


# ----------------------------------------------------------------------------------------------- JAX side

LOSS_CFG = ml_collections.ConfigDict(dict(beta=1.0, adv_clip_max=5.0, kl_beta=0.0))
NG_CFG = ml_collections.ConfigDict(dict(mode="relative", hinge="linear", margin=0.0, t_min=0.0))
LR, CLIP = 1e-4, 1.0


def _jax_train(su, a):
  cfg = su.cfg
  apply_fn = lambda v, x, t, c, g: mmdit.velocity(v, x, t, c, cfg=cfg, lora_gate=g)
  tx = optax.chain(ng.normguard_lambda("constant", 1.0), optax.clip_by_global_norm(CLIP), optax.adamw(LR))
  state = state_lib.create(su.lora, su.params, tx, jax.random.PRNGKey(a.seed), lora=True, with_old=True)
  state = state.replace(old=jax.tree_util.tree_map(jnp.array, su.old))
  batch = jax.device_put(su.batch)
  jstep = step_lib.make_train_step(method="nft", apply_fn=apply_fn, optimizer=tx, loss_cfg=LOSS_CFG,
                                   ng_cfg=NG_CFG)
  t0 = time.perf_counter()
  compiled = jstep.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  xla_flops = float(ca.get("flops", float("nan"))) if ca else float("nan")
  box = {"state": state, "loss": None}

  def run():
    box["state"], metrics = compiled(box["state"], batch)
    box["metrics"] = metrics
    if box["loss"] is None:
      box["loss"] = float(metrics["loss"])  # the first step: the initial weights, as PyTorch's first step
  step_s, times = _median_time(run, a.iters, lambda: jax.block_until_ready(box["state"]), a.warmup)
  return {"step_s": step_s, "times_s": times, "compile_s": compile_s, "xla_flops": xla_flops,
          "first_loss": box["loss"]}


def _jax_velocity(su):
  f = jax.jit(lambda p, l, x, t, c: mmdit.velocity({"params": p, "lora": l}, x, t, c, cfg=su.cfg))
  return np.asarray(f(su.params, su.lora, su.batch["x_t"], su.batch["t"], su.batch["cond"]), np.float32)


def _rollout_noise(key, rows, shape):
  """The initial noise ``train.rollout.rollout`` draws from ``key`` (its first split), for PyTorch to share."""
  return np.asarray(jax.random.normal(jax.random.split(key)[0], (rows,) + tuple(shape), jnp.float32))


def _jax_rollout(su, a, grid, key):
  cfg = su.cfg
  apply_fn = lambda v, x, t, c, g: mmdit.velocity(v, x, t, c, cfg=cfg, lora_gate=g)
  variables = {"params": su.params, "lora": su.lora}
  cond = jax.device_put(su.rollout_cond)
  fn = jax.jit(functools.partial(rollout_lib.rollout, apply_fn=apply_fn, image_shape=(a.latent, a.latent, 16),
                                 grid=grid, cfg_scale=1.0, noise_level=0.0, lora=True, track_rho=False))
  t0 = time.perf_counter()
  compiled = fn.lower(variables, variables, cond, cond, key).compile()
  compile_s = time.perf_counter() - t0
  out = {}
  run = lambda: out.__setitem__("r", compiled(variables, variables, cond, cond, key))
  s, times = _median_time(run, a.rollout_iters, lambda: jax.block_until_ready(out["r"]), 1)
  return {"rollout_s": s, "times_s": times, "compile_s": compile_s, "images_per_s": a.rollout_rows / s}, \
      np.asarray(out["r"]["x0"], np.float32)


# ----------------------------------------------------------------------------------------------- PyTorch side

def _torch_tensors(su, torch):
  nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(su.tdev)
  b = su.batch
  return dict(x0=nchw(b["x0"]), x_t=nchw(b["x_t"]), t=torch.from_numpy(b["t"]).to(su.tdev),
              adv=torch.from_numpy(b["adv"]).to(su.tdev),
              pe=torch.from_numpy(b["cond"]["prompt_embeds"]).to(su.tdev, torch.bfloat16),
              pooled=torch.from_numpy(b["cond"]["pooled"]).to(su.tdev, torch.bfloat16))


def _torch_forward(su, tb, torch):
  return lambda: su.tmodel(hidden_states=tb["x_t"].to(torch.bfloat16), encoder_hidden_states=tb["pe"],
                           pooled_projections=tb["pooled"], timestep=tb["t"] * 1000.0, return_dict=False)[0]


def _torch_nft_normguard(v, v_old, v_ref, tb, torch):
  """``rl/nft.py`` nft_loss (kl_beta 0) + ``rl/normguard.py`` relative linear hinge (margin 0), lambda 1."""
  c, beta = LOSS_CFG.adv_clip_max, LOSS_CFG.beta
  mean_nb = lambda x: x.flatten(1).mean(1)
  r = (torch.clamp(tb["adv"], -c, c) / c / 2.0 + 0.5).clamp(0.0, 1.0)
  v, v_old = v.float(), v_old.float()
  t = tb["t"].view(-1, 1, 1, 1)

  def x0_loss(vv):
    x0_hat = tb["x_t"] - t * vv
    w = torch.clamp(mean_nb((x0_hat - tb["x0"]).abs()).detach(), min=1e-5)
    return mean_nb((x0_hat - tb["x0"]).square()) / w
  l_pos = x0_loss(beta * v + (1.0 - beta) * v_old)
  l_neg = x0_loss((1.0 + beta) * v_old - beta * v)
  policy = ((r * l_pos + (1.0 - r) * l_neg) / beta).mean() * c
  norm = lambda u: u.float().flatten(1).norm(dim=1)
  penalty = torch.relu(norm(v) / norm(v_ref).detach().clamp(min=1e-12) - 1.0).sum() / v.shape[0]
  return policy + penalty


def _torch_train(su, a, torch):
  tb = _torch_tensors(su, torch)
  fwd = _torch_forward(su, tb, torch)
  if a.remat:
    su.tmodel.enable_gradient_checkpointing()
  su.tmodel.train()
  policy_params = [p for n, p in su.tmodel.named_parameters() if ".policy." in n]
  for n, p in su.tmodel.named_parameters():
    p.requires_grad_(".policy." in n)
  opt = torch.optim.AdamW(policy_params, lr=LR, weight_decay=1e-4)
  box = {"loss": None}

  def step():
    with torch.no_grad():
      su.tmodel.disable_lora()
      v_ref = fwd()
      su.tmodel.enable_lora()
      su.tmodel.set_adapters("old")
      v_old = fwd()
      su.tmodel.set_adapters("policy")
    for p in su.tmodel.parameters():  # set_adapters makes the active adapter trainable: keep only the policy's
      p.requires_grad_(False)
    for p in policy_params:
      p.requires_grad_(True)
    v = fwd()
    loss = _torch_nft_normguard(v, v_old, v_ref, tb, torch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy_params, CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if box["loss"] is None:
      box["loss"] = float(loss.detach())

  sync = (lambda: torch.cuda.synchronize()) if su.tdev.type == "cuda" else (lambda: None)
  step_s, times = _median_time(step, a.iters, sync, a.warmup)
  return {"step_s": step_s, "times_s": times, "first_loss": box["loss"]}


def _torch_velocity(su, torch):
  tb = _torch_tensors(su, torch)
  su.tmodel.eval()
  with torch.no_grad():
    v = _torch_forward(su, tb, torch)()
  return v.float().cpu().numpy().transpose(0, 2, 3, 1)


def _torch_rollout(su, a, x1, torch):
  """``StableDiffusion3Pipeline.__call__``'s denoising loop without CFG (guidance_scale <= 1), embeddings given."""
  import diffusers
  sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)
  pe = torch.from_numpy(su.rollout_cond["prompt_embeds"]).to(su.tdev, torch.bfloat16)
  pooled = torch.from_numpy(su.rollout_cond["pooled"]).to(su.tdev, torch.bfloat16)
  noise = torch.from_numpy(np.ascontiguousarray(x1.transpose(0, 3, 1, 2))).to(su.tdev, torch.bfloat16)
  out = {}
  su.tmodel.eval()

  def loop():
    sched.set_timesteps(a.rollout_steps, device=su.tdev)
    latents = noise.clone()
    with torch.no_grad():
      for t in sched.timesteps:
        v = su.tmodel(hidden_states=latents, timestep=t.expand(latents.shape[0]), encoder_hidden_states=pe,
                      pooled_projections=pooled, return_dict=False)[0]
        latents = sched.step(v, t, latents, return_dict=False)[0]
    out["x0"] = latents

  sync = (lambda: torch.cuda.synchronize()) if su.tdev.type == "cuda" else (lambda: None)
  s, times = _median_time(loop, a.rollout_iters, sync, 1)
  return ({"rollout_s": s, "times_s": times, "images_per_s": a.rollout_rows / s},
          out["x0"].float().cpu().numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------- the suite

def _torch_skip_reason(a):
  """Why PyTorch is not timed here (None: it is): asked, or no PyTorch device next to JAX's (a TPU host, or a
  CPU-only torch build on a GPU host), where a comparison would time different devices."""
  if a.no_torch:
    return "--no-torch"
  backend = jax.default_backend()
  if backend == "cpu":
    return None
  import torch
  if backend == "gpu" and torch.cuda.is_available():
    return None
  return f"PyTorch has no {backend} device here"


def run(a):
  skip = _torch_skip_reason(a)
  with_torch = skip is None
  import torch  # builds the random weights in any case
  t0 = time.perf_counter()
  su = _setup(a, with_torch)
  setup_s = time.perf_counter() - t0
  cfg = su.cfg
  dev = jax.devices()[0]
  image_tokens = (a.latent // 2) ** 2
  flops = step_flops(cfg, a.batch, image_tokens, a.text_len)
  peak = a.peak_tflops or peak_tflops(str(dev.device_kind))
  q_abs = jax.ShapeDtypeStruct((a.batch, image_tokens + a.text_len, a.heads, a.head_dim), jnp.bfloat16)
  res = {
      "preset": a.preset, "config": {k: v for k, v in vars(a).items() if k != "out"},
      "device": {"jax_backend": jax.default_backend(), "jax_device": str(dev.device_kind), "jax": jax.__version__,
                 "torch_device": str(su.tdev) if with_torch else None, "torch": torch.__version__,
                 "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                 "peak_bf16_tflops": peak},
      "attention": {"asked": a.attention, "resolved": attention_lib.resolve(a.attention, q_abs, q_abs)},
      "params": {"base": int(mmdit.param_count(su.params)), "lora": int(mmdit.param_count(su.lora))},
      "tokens": {"image": image_tokens, "text": a.text_len},
      "model_flops_step": flops, "setup_s": setup_s, "torch_skipped": skip,
  }

  # (c) velocities at the train batch, before any update
  v_jax = _jax_velocity(su)
  if with_torch:
    res["velocity_rel_l2_bf16"] = _rel_l2(v_jax, _torch_velocity(su, torch))

  # (b) rollouts from the same noise, initial weights
  grid = schedules.sampling_grid(a.rollout_steps, shift=SHIFT, kind="diffusers")
  key = jax.random.PRNGKey(a.seed + 11)
  res["rollout"] = {"rows": a.rollout_rows, "steps": a.rollout_steps, "resolution": 8 * a.latent}
  res["rollout"]["jax"], x0_jax = _jax_rollout(su, a, grid, key)
  if with_torch:
    x1 = _rollout_noise(key, a.rollout_rows, (a.latent, a.latent, 16))
    res["rollout"]["torch"], x0_torch = _torch_rollout(su, a, x1, torch)
    res["rollout"]["speedup_jax_over_torch"] = res["rollout"]["torch"]["rollout_s"] / res["rollout"]["jax"][
        "rollout_s"]
    res["rollout"]["final_latent_rel_l2_bf16"] = _rel_l2(x0_jax, x0_torch)

  # (a) the train step
  res["train"] = {"jax": _jax_train(su, a)}
  if with_torch:
    res["train"]["torch"] = _torch_train(su, a, torch)
    res["train"]["ratio_torch_over_jax"] = res["train"]["torch"]["step_s"] / res["train"]["jax"]["step_s"]
    res["train"]["first_loss_abs_diff"] = abs(res["train"]["jax"]["first_loss"] - res["train"]["torch"]["first_loss"])
  for side in res["train"].values():
    if isinstance(side, dict):
      side["model_tflops_per_s"] = flops / side["step_s"] / 1e12
      side["mfu"] = side["model_tflops_per_s"] / peak if peak else None
  res["total_s"] = time.perf_counter() - t0
  return res


def table(res):
  """The printed summary."""
  f = lambda x, spec: "n/a" if x is None else format(x, spec)
  tr, ro = res["train"], res["rollout"]
  j, t = tr["jax"], tr.get("torch")
  torch_on = (f"PyTorch on {res['device']['torch_device']}" if res["torch_skipped"] is None else
              f"PyTorch not timed: {res['torch_skipped']}")
  lines = [f"device: {res['device']['jax_device']} (JAX {res['device']['jax']}, backend {res['device']['jax_backend']}"
           f"; {torch_on}); preset {res['preset']}; attention {res['attention']['asked']} -> "
           f"{res['attention']['resolved']}",
           "| measure | JAX | PyTorch | PyTorch / JAX |", "|---|---|---|---|",
           f"| train step (s) | {j['step_s']:.4g} | {f(t and t['step_s'], '.4g')} | "
           f"{f(tr.get('ratio_torch_over_jax'), '.3f')} |",
           f"| model TFLOP/s | {j['model_tflops_per_s']:.4g} | {f(t and t['model_tflops_per_s'], '.4g')} | |",
           f"| MFU | {f(j['mfu'], '.1%')} | {f(t and t['mfu'], '.1%')} | |",
           f"| rollout images/s ({ro['rows']} rows, {ro['steps']} steps, {ro['resolution']}^2) | "
           f"{ro['jax']['images_per_s']:.4g} | {f(ro.get('torch') and ro['torch']['images_per_s'], '.4g')} | "
           f"{f(ro.get('speedup_jax_over_torch'), '.3f')} |",
           f"velocity rel-L2 (bf16, JAX vs PyTorch): {f(res.get('velocity_rel_l2_bf16'), '.3g')}; rollout final "
           f"latents rel-L2: {f(ro.get('final_latent_rel_l2_bf16'), '.3g')}; first-step loss |diff|: "
           f"{f(tr.get('first_loss_abs_diff'), '.3g')}",
           f"model FLOPs per step {res['model_flops_step']:.4g} (XLA counts {j['xla_flops']:.4g}); JAX compile "
           f"{j['compile_s']:.1f} s (train) + {ro['jax']['compile_s']:.1f} s (rollout); total {res['total_s']:.1f} s"]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m normguard_jax.bench_suite", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small", choices=sorted(PRESETS))
  p.add_argument("--attention", default="auto", choices=attention_lib.IMPLEMENTATIONS,
                 help="JAX's model.attention_impl (PyTorch uses diffusers' SDPA)")
  p.add_argument("--iters", type=int, default=5, help="timed train steps (each framework)")
  p.add_argument("--warmup", type=int, default=2, help="untimed train steps before timing (each framework)")
  p.add_argument("--rollout-iters", type=int, default=3, help="timed rollouts (each framework, after one warm-up)")
  p.add_argument("--remat", action="store_true", help="rematerialise blocks (JAX remat, torch gradient "
                 "checkpointing)")
  p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU (default: "
                 "PEAK_BF16_TFLOPS by device kind)")
  p.add_argument("--no-torch", action="store_true", help="time JAX only (torch still builds the weights)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="write the JSON here")
  a = p.parse_args(argv)
  for k, v in PRESETS[a.preset].items():
    setattr(a, k, v)
  res = run(a)
  print(json.dumps(res, indent=2))
  print(table(res))
  if a.out:
    with open(a.out, "w") as fh:
      fh.write(json.dumps(res, indent=2) + "\n")
  return res


if __name__ == "__main__":
  main()
