"""The attention dispatcher (models/attention.py): every implementation against the f32 reference, forward and
gradients w.r.t. q, k and v; masks; the mesh; the `auto` rules; the full MMDiT and FLUX velocities with splash.

Splash runs in Pallas interpret mode on CPU (slow), so its shapes are tiny; the joint length 150 is not a multiple
of its block (128), so the padding and its masking are exercised.
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from normguard_jax.models import attention as attn
from normguard_jax.models import flux, mmdit
from normguard_jax.parallel import mesh as mesh_lib
from normguard_jax.parallel import rules

B, L, H, D = 3, 150, 2, 8
TOL = {"float32": 2e-6, "bfloat16": 2e-2}  # max abs error (outputs and gradients are O(1))


def _qkv(dtype, b=B, l=L, h=H, d=D, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, l, h, d)), dtype) for _ in range(3))


def _kv_mask(l=L, b=B):
  """Row 0: a text-style mask (the last quarter of the keys are padding); row 1: every key real; row 2 (if
  any): no real key (output and gradients must be zero, not NaN)."""
  rows = [np.arange(l) < l - l // 4, np.ones(l, bool), np.zeros(l, bool)]
  return jnp.asarray(np.stack(rows[:b]))


def _reference(q, k, v, allowed):
  """Softmax attention in float64 numpy from the (dtype-rounded) inputs; rows with no allowed key give 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("blhd,bmhd->bhlm", q, k) * q.shape[-1] ** -0.5
  s = np.where(allowed, s, -1e300)
  p = np.where(allowed, np.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhlm,bmhd->blhd", p, v)


def _value_and_grads(impl, q, k, v, kv_mask=None, mask=None):
  f = lambda q_, k_, v_: attn.dot_product_attention(q_, k_, v_, impl=impl, kv_mask=kv_mask, mask=mask)
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
  loss = lambda q_, k_, v_: jnp.sum(f(q_, k_, v_).astype(jnp.float32) * w)
  return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


_ref_value_and_grads = jax.jit(lambda q, k, v, kv_mask: _value_and_grads("xla", q, k, v, kv_mask))


def _assert_close(got, want, tol, what):
  for name, a, b in zip(("out", "dq", "dk", "dv"), (got[0],) + tuple(got[1]), (want[0],) + tuple(want[1])):
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    assert err <= tol, (what, name, err)


@pytest.mark.parametrize("impl,dtype", [("chunked", "float32"), ("chunked", "bfloat16"), ("splash", "float32"),
                                        ("splash", "bfloat16")])
def test_kernel_matches_xla_forward_and_gradients(impl, dtype, monkeypatch):
  monkeypatch.setattr(attn, "CHUNK_BLOCK", 64)  # 150 keys -> 3 blocks, the last one padded
  q, k, v = _qkv(jnp.dtype(dtype))
  kv_mask = _kv_mask()
  want = _ref_value_and_grads(q, k, v, kv_mask)
  run = jax.jit(lambda *a: _value_and_grads(impl, *a, kv_mask=kv_mask))
  if impl == "chunked":  # forward and backward scan 3 key blocks (JAX 0.12 also lists the primal's forward)
    lengths = [e.params["length"] for e in _eqns(jax.make_jaxpr(run)(q, k, v).jaxpr, "scan")]
    assert len(lengths) >= 2 and set(lengths) == {3}, lengths
  got = run(q, k, v)
  assert got[0].dtype == q.dtype and all(g.dtype == q.dtype for g in got[1])
  _assert_close(got, want, TOL[dtype], (impl, dtype))
  assert all(float(jnp.max(jnp.abs(x[2]))) == 0.0 for x in (got[0],) + tuple(got[1])), "row without keys"


def test_xla_reference_is_exact_softmax_attention_with_masks():
  q, k, v = _qkv(jnp.float32, l=40)
  kv_mask = _kv_mask(40)
  causal = jnp.tril(jnp.ones((40, 40), bool))[None, None]
  run = jax.jit(lambda q, k, v, kv_mask, mask: attn.dot_product_attention(q, k, v, impl="xla", kv_mask=kv_mask,
                                                                          mask=mask))
  for mask in (jnp.ones((1, 1, 1, 1), bool), causal):
    allowed = np.asarray(kv_mask)[:, None, None, :] & np.asarray(mask)
    np.testing.assert_allclose(run(q, k, v, kv_mask, mask), _reference(q, k, v, allowed), atol=1e-6)


def _eqns(jaxpr, name):
  """Equations named ``name`` in program order, inside nested jaxprs (jit, custom_vjp, ...) too."""
  for e in jaxpr.eqns:
    if e.primitive.name == name:
      yield e
    for p in e.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub, name)


def test_xla_logits_are_float32_with_bf16_inputs():
  """Issue 12 item 7: QK^T must accumulate and come out in f32, not be rounded to bf16 before the softmax."""
  q, k, v = _qkv(jnp.bfloat16, l=64, seed=1)
  q = q * 8  # logits of O(20): bf16 rounds them by up to ~0.06, which moves the softmax weights by ~6%
  f = jax.jit(lambda *a: attn.dot_product_attention(*a, impl="xla"))
  dots = list(_eqns(jax.make_jaxpr(f)(q, k, v).jaxpr, "dot_general"))
  assert dots[0].outvars[0].aval.dtype == jnp.float32, dots[0]  # the first matmul is QK^T
  ref = _reference(q, k, v, True)
  rel = np.linalg.norm(np.asarray(f(q, k, v), np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 4e-3, rel  # bf16 weights and output only: 2.0e-3; with bf16 logits (the old code) 8.3e-3


def test_chunked_takes_a_dense_causal_mask(monkeypatch):
  """CLIP's causal mask through chunked (dense masks never reach the kernels)."""
  monkeypatch.setattr(attn, "CHUNK_BLOCK", 16)
  q, k, v = _qkv(jnp.float32, l=40)
  causal = jnp.tril(jnp.ones((40, 40), bool))[None, None]
  run = jax.jit(lambda impl, *a: _value_and_grads(impl, *a, mask=causal), static_argnums=0)
  _assert_close(run("chunked", q, k, v), run("xla", q, k, v), TOL["float32"], "causal")


def test_cudnn_key_reordering_is_exact():
  """The cuDNN path serves a kv_mask by a real-first key order + key_value_seq_lengths; run that logic through
  JAX's XLA implementation (no GPU here) and compare with the masked reference, gradients included."""
  q, k, v = _qkv(jnp.float32)
  kv_mask = _kv_mask().at[0, :20].set(False)  # masked keys in front and at the end (FLUX puts text first)
  w = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)

  @jax.jit
  def run(q, k, v):
    f = lambda q_, k_, v_: attn._cudnn(q_, k_, v_, kv_mask, implementation="xla")
    return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
  _assert_close(run(q, k, v), _ref_value_and_grads(q, k, v, kv_mask), 1e-5, "cudnn reorder")


def _shard_map_out_spec(fn, *args):
  eqns = list(_eqns(jax.make_jaxpr(fn)(*args).jaxpr, "shard_map"))
  assert len(eqns) == 1, eqns
  return tuple(eqns[0].params["out_specs"][0])


@pytest.mark.parametrize("rows,heads", [(2, 2), (3, 3)])
def test_splash_runs_per_shard_under_a_tensor_mesh(rows, heads):
  """fsdp=2 x tensor=2: rows over fsdp and heads over tensor in shard_map (forward and gradients). 3 rows and 3
  heads do not split in two and are replicated instead: the same numbers, no crash."""
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=2)), jax.devices()[:4])
  q, k, v = _qkv(jnp.float32, b=rows, h=heads)
  kv_mask = _kv_mask(b=rows)

  def forward(q, k, v):
    with rules.activation_mesh(mesh):
      return attn.dot_product_attention(q, k, v, impl="splash", kv_mask=kv_mask)
  spec = _shard_map_out_spec(forward, q, k, v)
  assert spec == (("fsdp", None, "tensor", None) if heads == 2 else (None,) * 4)[:len(spec)], spec
  if heads == 2:
    def value_and_grads(*a):
      with rules.activation_mesh(mesh):
        return _value_and_grads("splash", *a, kv_mask=kv_mask)
    got = jax.jit(value_and_grads)(q, k, v)
    _assert_close(got, _ref_value_and_grads(q, k, v, kv_mask), TOL["float32"], "mesh")
  else:
    np.testing.assert_allclose(jax.jit(forward)(q, k, v), _ref_value_and_grads(q, k, v, kv_mask)[0], atol=2e-6)


def _fake_mesh(platform, cc=None):
  dev = types.SimpleNamespace(platform=platform, compute_capability=cc)
  return types.SimpleNamespace(devices=np.array([dev, dev]))


def test_auto_rules_and_refusals():
  s = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  short, long_ = s((1, 1357, 24, 64)), s((1, 4429, 24, 64))
  assert attn.resolve("auto", short, short) == "xla"          # this CPU, SD3.5-M at 512^2
  assert attn.resolve("auto", long_, long_) == "chunked"      # 1024^2
  tpu, hopper, ampere = _fake_mesh("tpu"), _fake_mesh("gpu", "9.0"), _fake_mesh("gpu", "8.0")
  assert attn.resolve("auto", short, short, mesh=tpu) == "splash"
  assert attn.resolve("auto", short, short, mesh=tpu, dense_mask=True) == "xla"
  bf = s((1, 1357, 24, 64), jnp.bfloat16)
  assert attn.resolve("auto", bf, bf, mesh=hopper) == "cudnn"
  assert attn.resolve("auto", short, short, mesh=hopper) == "xla"                    # fp32: no cuDNN
  wide = s((1, 1357, 4, 192), jnp.bfloat16)
  assert attn.resolve("auto", wide, wide, mesh=hopper) == "cudnn"
  assert attn.resolve("auto", wide, wide, mesh=ampere) == "xla"                      # head_dim 192 > 128
  assert attn.resolve("cudnn", long_, long_, mesh=hopper) == "chunked"               # refused shape: fallback
  with pytest.raises(ValueError, match="needs a GPU"):
    attn.resolve("cudnn", bf, bf)
  with pytest.raises(ValueError, match="'jax' was removed"):
    attn.resolve("jax", short, short)
  with pytest.raises(ValueError, match="kv_mask must be bool"):
    attn.dot_product_attention(*_qkv(jnp.float32, l=8), kv_mask=jnp.ones((B, 8), jnp.int32))


# ----------------------------------------------------------------------------------------------- full models

SD35_TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                 out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0, 1))
FLUX1_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
                  guidance_embeds=True)


def _random_variables(shapes, seed=1):
  """Every param random on the host (no init program to compile): kernels ~ N(0, 1/fan_in), the rest
  ~ 1 + N(0, 0.2) for norm scales and N(0, 0.2) otherwise."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) >= 2:
      return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[-2:-1])), s.dtype)
    base = 1.0 if "scale" in name else 0.0
    return jnp.asarray(base + 0.2 * rng.standard_normal(s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _velocity_errors(make_cfg, module, inputs):
  cfg_x, cfg_s = make_cfg("xla"), make_cfg("splash")
  variables = _random_variables(module.param_shapes(cfg_x))
  vx = jax.jit(lambda v: module.velocity(v, *inputs, cfg=cfg_x))(variables)
  vs = jax.jit(lambda v: module.velocity(v, *inputs, cfg=cfg_s))(variables)
  err = float(jnp.max(jnp.abs(vs - vx)))
  return err, err / float(jnp.max(jnp.abs(vx)))


def test_mmdit_velocity_with_splash_matches_xla():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 12, 12, 16)), jnp.float32)     # 36 image + 7 text tokens
  cond = dict(prompt_embeds=jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32),
              pooled=jnp.asarray(rng.standard_normal((2, 32)), jnp.float32))
  abs_err, rel_err = _velocity_errors(lambda impl: mmdit.MMDiTConfig(**SD35_TINY, attention_impl=impl), mmdit,
                                      (x, jnp.array([0.25, 0.9]), cond))
  assert abs_err <= 1e-5 and rel_err <= 1e-5, (abs_err, rel_err)


def test_flux_velocity_with_splash_matches_xla():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)        # 16 packed image + 6 text tokens
  cond = dict(prompt_embeds=jnp.asarray(rng.standard_normal((2, 6, 24)), jnp.float32),
              pooled=jnp.asarray(rng.standard_normal((2, 12)), jnp.float32), guidance=jnp.array([3.5, 3.5]))
  abs_err, rel_err = _velocity_errors(lambda impl: flux.FluxConfig(**FLUX1_TINY, attention_impl=impl), flux,
                                      (x, jnp.array([0.25, 0.9]), cond))
  assert abs_err <= 1e-5 and rel_err <= 1e-5, (abs_err, rel_err)
