"""Tier-3 parity: our MMDiT (models/mmdit.py) against diffusers' SD3Transformer2DModel, fp32 on CPU.

Tiny random-init diffusers models (every weight randomised, zero-initialised ones included) are saved with
``save_pretrained`` and converted by our strict converter from that directory. Tolerances (DESIGN.md §8):
1e-6 for embeddings, 2e-5 abs and 1e-5 rel (max|a-b| / max|b|) for a full forward and block gradients.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from normguard_jax.convert import sd3 as convert_sd3  # noqa: E402
from normguard_jax.models import mmdit  # noqa: E402
from tests.conftest import xla_default_compiler_options
from tests.torch_helpers import errors, randomize_torch

ABS_TOL, REL_TOL, EMB_TOL = 2e-5, 1e-5, 1e-6

# SD3-style; 3 layers so that scan_layers has a run of two plain blocks before the context_pre_only one.
SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                out_channels=16, pos_embed_max_size=16)
# SD3.5-style: qk RMSNorm, dual attention on a run of two blocks (scanned together), then a plain block and
# the context_pre_only last block.
SD35_TINY = dict(SD3_TINY, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1))
CONFIGS = {"sd3": SD3_TINY, "sd35": SD35_TINY}




def assert_close(name, ours, ref, abs_tol=ABS_TOL, rel_tol=REL_TOL):
  abs_err, rel_err = errors(ours, ref)
  print(f"[parity] {name}: max abs err {abs_err:.3g}, max rel err {rel_err:.3g}")
  assert abs_err <= abs_tol and rel_err <= rel_tol, (name, abs_err, rel_err)


def torch_freqs(dim=256, max_period=10000):
  """diffusers' own float32 frequency table (torch.exp), for runs that share it bit for bit."""
  half = dim // 2
  exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32)
  return jnp.asarray(torch.exp(exponent / half).numpy())


@pytest.fixture
def shared_freqs(monkeypatch):
  """Our model with torch's float32 timestep frequencies. torch's and XLA's float32 exp differ by 1 ulp on
  some frequencies, which at 1000-step timesteps moves the sinusoid by up to ~3e-5 (see
  test_embeddings_parity); sharing the table isolates the port from that float32 artefact."""
  monkeypatch.setattr(mmdit, "timestep_freqs", torch_freqs)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{name: (torch model, pipeline dir)}: saved as <dir>/transformer like a diffusers pipeline."""
  out = {}
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    model = randomize_torch(diffusers.SD3Transformer2DModel(**kwargs), seed=i)
    root = tmp_path_factory.mktemp(name)
    model.save_pretrained(root / "transformer")
    out[name] = (model, root)
  return out


def make_inputs(cfg, batch=2, text_len=7, size=12, seed=0):
  """NHWC latents smaller than sample_size (exercises the centre crop of the position table)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
  cond = dict(prompt_embeds=rng.standard_normal((batch, text_len, cfg.joint_attention_dim)).astype(np.float32),
              pooled=rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32))
  t = np.array([0.25, 0.9], np.float32)[:batch]
  return x, t, cond


def torch_velocity(model, x, t, cond):
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(cond["prompt_embeds"]),
                pooled_projections=torch.from_numpy(cond["pooled"]),
                timestep=torch.from_numpy(t * np.float32(1000.0)), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 1)


def _velocity_parity(models, name, scan_layers, t=(0.25, 0.9), label=""):
  model, root = models[name]
  cfg, params = convert_sd3.load_transformer(root, scan_layers=scan_layers)
  assert (cfg.qk_norm, cfg.dual_attention_layers) == (CONFIGS[name].get("qk_norm"),
                                                      tuple(CONFIGS[name].get("dual_attention_layers", ())))
  groups = mmdit.block_layout(cfg)
  assert any(g.scanned for g in groups) == scan_layers
  x, _, cond = make_inputs(cfg, size=16 if name == "sd3" else 12)
  t = np.asarray(t, np.float32)
  ref = torch_velocity(model, x, t, cond)
  v = jax.jit(lambda p, x, t, c: mmdit.velocity({"params": p}, x, t, c, cfg=cfg))(params, x, t, cond)
  assert v.shape == x.shape[:3] + (cfg.out_channels,) and v.dtype == jnp.float32
  assert_close(f"velocity {name} scan={scan_layers}{label}", v, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("scan_layers", [False, True])
def test_velocity_parity(models, shared_freqs, name, scan_layers):
  _velocity_parity(models, name, scan_layers, t=(0.25, 0.9))
  _velocity_parity(models, name, scan_layers, t=(0.7, 1.0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_velocity_parity_stock(models, name):
  """As shipped: our float32 exp against torch's, at the same tolerance (see shared_freqs for the margin)."""
  _velocity_parity(models, name, False, t=(0.25, 0.9), label=" stock")


def test_embeddings_parity(models, monkeypatch):
  from diffusers.models.embeddings import get_timestep_embedding
  model, root = models["sd35"]
  cfg, params = convert_sd3.load_transformer(root, scan_layers=False)
  # Position table: the persistent buffer vs our recomputation (and its crop).
  table = model.pos_embed.pos_embed.detach().numpy()
  assert_close("pos_embed table", mmdit.pos_embed_table(cfg), table, EMB_TOL, EMB_TOL)
  crop = model.pos_embed.cropped_pos_embed(12, 12).detach().numpy()[0]
  assert_close("pos_embed crop", mmdit.cropped_pos_embed(cfg, 6, 6), crop, EMB_TOL, EMB_TOL)
  # Timestep sinusoid. Our float32 frequency table is within 1 ulp of torch's; with the same table the
  # sinusoids agree to 1e-6. As shipped, the only extra difference allowed is 1000 t * ulp(freq).
  t = np.array([0.0, 0.013, 0.25, 0.5, 0.9, 1.0], np.float32)
  steps = torch.from_numpy(t * np.float32(1000.0))
  ref = get_timestep_embedding(steps, 256, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  np.testing.assert_array_max_ulp(np.asarray(mmdit.timestep_freqs()), np.asarray(torch_freqs()), maxulp=1)
  stock = np.asarray(mmdit.timestep_proj(jnp.asarray(t) * 1000.0))
  freqs = np.asarray(torch_freqs())
  args = (t * np.float32(1000.0))[:, None] * freqs[None]
  bound = 1e-6 + np.tile((t * 1000.0)[:, None] * np.spacing(freqs)[None] + np.spacing(args), 2)
  print(f"[parity] timestep sinusoid stock: max abs err {np.abs(stock - ref).max():.3g}")
  assert np.all(np.abs(stock - ref) <= bound)
  monkeypatch.setattr(mmdit, "timestep_freqs", torch_freqs)
  assert_close("timestep sinusoid (shared freqs)", mmdit.timestep_proj(jnp.asarray(t) * 1000.0), ref, EMB_TOL,
               EMB_TOL)
  pooled = np.random.default_rng(1).standard_normal((len(t), cfg.pooled_projection_dim)).astype(np.float32)
  with torch.no_grad():
    ref = model.time_text_embed(steps, torch.from_numpy(pooled)).numpy()
  ours = mmdit.TimeTextEmbed(cfg).apply({"params": params["time_text_embed"]}, jnp.asarray(t), pooled)
  assert_close("temb", ours, ref)


@pytest.mark.parametrize("name,layer", [("sd35", 0), ("sd35", 3), ("sd3", 0)])
def test_block_gradient_parity(models, name, layer):
  """Input gradients of one joint block (dual-attention, context_pre_only and plain): torch vs jax.grad."""
  model, root = models[name]
  cfg, params = convert_sd3.load_transformer(root, scan_layers=False)
  group = [g for g in mmdit.block_layout(cfg) if g.start == layer][0]
  block = model.transformer_blocks[layer]
  rng = np.random.default_rng(layer)
  b, n, m, d = 2, 9, 5, cfg.inner_dim
  x, ctx, temb = (rng.standard_normal(s).astype(np.float32) for s in ((b, n, d), (b, m, d), (b, d)))
  wx, wc = rng.standard_normal((b, n, d)).astype(np.float32), rng.standard_normal((b, m, d)).astype(np.float32)

  xt, ct, tt = (torch.tensor(a, requires_grad=True) for a in (x, ctx, temb))
  c_out, x_out = block(hidden_states=xt, encoder_hidden_states=ct, temb=tt)
  loss = (x_out * torch.from_numpy(wx)).sum()
  if c_out is not None:
    loss = loss + (c_out * torch.from_numpy(wc)).sum()
  loss.backward()
  ref_grads = [a.grad.numpy() for a in (xt, ct, tt)]

  module = mmdit.JointBlock(cfg, group.dual, group.context_pre_only)

  def scalar(x, ctx, temb):
    (x_out, c_out), _ = module.apply({"params": params[group.name]}, (x, ctx), temb, None)
    out = jnp.sum(x_out * wx)
    return out if c_out is None else out + jnp.sum(c_out * wc)

  value = jax.jit(scalar)(x, ctx, temb)
  assert_close(f"block {name}[{layer}] loss", value, loss.detach().numpy())
  grads = jax.jit(jax.grad(scalar, argnums=(0, 1, 2)))(x, ctx, temb)
  for label, ours, ref in zip(("d/dx", "d/dctx", "d/dtemb"), grads, ref_grads):
    assert_close(f"block {name}[{layer}] {label}", ours, ref)


def test_lora_gate_zero_is_base_exactly(models):
  """Random (nonzero) adapters on all eight projection targets: gate 0 rows == base model, bit for bit."""
  _, root = models["sd35"]
  for scan_layers in (True,):
    cfg, params = convert_sd3.load_transformer(root, scan_layers=scan_layers, lora_rank=2, lora_alpha=4.0)
    lora = mmdit.init_lora(cfg, jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    lora = jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, l.shape) * 0.3 for l, k in zip(leaves, keys)])
    n_targets = sum(1 for p in jax.tree_util.tree_flatten_with_path(lora)[0] if "lora_a" in str(p[0][-1]))
    # dual blocks: 8 joint + 4 attn2 targets; plain: 8; context_pre_only: 7 (no to_add_out).
    assert n_targets == (12 + 8 + 7 if scan_layers else 12 + 12 + 8 + 7)
    x, t, cond = make_inputs(cfg, size=8)
    base_cfg = dataclasses.replace(cfg, lora_rank=0)
    opts = xla_default_compiler_options()  # XLA's default CPU emitters (the test session may run others)
    base = jax.jit(lambda v: mmdit.velocity(v, x, t, cond, cfg=base_cfg), compiler_options=opts)({"params": params})
    gate = jnp.array([[0.0], [1.0]])
    out = jax.jit(lambda v: mmdit.velocity(v, x, t, cond, cfg=cfg, lora_gate=gate),
                  compiler_options=opts)({"params": params, "lora": lora})
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(base[0]))
    assert float(jnp.max(jnp.abs(out[1] - base[1]))) > 1e-3


def test_scanned_equals_unscanned_and_random_init(models):
  """The scanned tree is the stacked unscanned one; a fresh random init (with remat) runs."""
  _, root = models["sd35"]
  _, p_u = convert_sd3.load_transformer(root, scan_layers=False)
  cfg_s, p_s = convert_sd3.load_transformer(root, scan_layers=True)
  stacked = jax.tree_util.tree_map(lambda *a: np.stack(a), p_u["block_0"], p_u["block_1"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_s["blocks_0"], stacked)
  assert mmdit.param_count(p_s) == mmdit.param_count(p_u)
  cfg_r = dataclasses.replace(cfg_s, remat=True)
  x, t, cond = make_inputs(cfg_s, size=8)
  v = jax.jit(lambda k: mmdit.velocity(mmdit.init(cfg_r, k), x, t, cond, cfg=cfg_r))(jax.random.PRNGKey(0))
  assert np.isfinite(np.asarray(v)).all()
