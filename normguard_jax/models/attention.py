"""Attention dispatcher: one entry, several implementations (DESIGN.md §2).

``dot_product_attention(q, k, v, *, impl, mask=None, kv_mask=None)`` computes softmax(q k^T / sqrt(Dh)) v over
(B, L, H, Dh) queries and (B, M, H, Dh) keys / values, with the logits and the softmax in float32 whatever the
input dtype. Implementations (``IMPLEMENTATIONS``):

* ``xla``: the reference. QK^T as one einsum with float32 accumulation and output
  (``preferred_element_type``), f32 softmax, PV with f32 accumulation. Materialises the (B, H, L, M) logits.
* ``chunked``: online softmax over key blocks of ``CHUNK_BLOCK`` in a ``lax.scan`` (FlashAttention-2, Dao 2023,
  Alg. 1 forward / Alg. 2 backward), with its own VJP that saves only the output and the per-row log-sum-exp and
  recomputes each block's probabilities in the backward, so no (L, M) array is ever kept. Any backend, any shape.
* ``splash``: TPU Pallas splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``). The query and
  key lengths are padded up to a multiple of ``SPLASH_LENGTH_MULTIPLE`` and the padded (or ``kv_mask``-ed) keys
  are masked exactly with ``SegmentIds`` (real query 1; real key 1, masked key 0). Blocks: the largest power of
  two <= ``SPLASH_MAX_BLOCK`` dividing the padded length (1357 -> 1408, blocks of 128). head_dim is kept as is
  (AOT for v5p, forward + backward: 8, 64, 128, 256 and 512 compile; padding 64 up to the MXU width 128, as
  maxdiffusion does, doubles the q/k/v traffic and is left to a TPU benchmark). Off TPU the kernel runs in Pallas
  interpret mode (how the CPU tests check it; slow).
* ``cudnn``: GPU flash attention, ``jax.nn.dot_product_attention(implementation="cudnn")``. Needs bf16 / fp16
  inputs and head_dim a multiple of 8, at most 128 (256 on Hopper and later). A ``kv_mask`` is served without a
  bias (which cuDNN only takes at even lengths in training): the keys are stably reordered real-first (attention
  is invariant to the key order) and ``key_value_seq_lengths`` masks the rest.
* ``auto`` (the recipes' default): ``splash`` on TPU, ``cudnn`` on GPU where the dtype and head_dim allow, else
  ``chunked`` when a query row sees at least ``AUTO_CHUNKED_MIN_LOGITS`` = 2048^2 logits per head (SD3.5-M at
  1024^2: 4429^2) and ``xla`` below (SD3.5-M at 512^2: 1357^2; CLIP; the tiny CPU models). On TPU, splash is
  chosen only where it can run: under the activation mesh (``parallel.rules.activation_mesh``, set by the
  sharded train step) or on a single-device backend; a Mosaic kernel cannot be partitioned by XLA itself.

A kernel that cannot take a call (a dense ``mask``; cuDNN with fp32 or an unsupported head_dim) falls back to
what ``auto`` picks off-kernel (chunked or xla by length), once-logged. ``cudnn`` asked for on a non-GPU backend
is an error. The former ``jax`` value was removed: it was ``jax.nn.dot_product_attention`` with
``implementation=None``, which is JAX's XLA softmax attention (no kernel on any backend, JAX 0.10 and 0.12), the
same program as ``xla``. Use ``auto``, or ``xla`` for the reference.

Masks: ``kv_mask`` (B, M) bool, True = a real key (text padding); ``mask`` a dense bool array broadcastable to
(B, H, L, M), True = the query may attend to the key (CLIP's causal mask; served by xla and chunked). A query
with no allowed key gets a zero output (and zero gradients) in every implementation.

Under a mesh (``rules.activation_mesh(mesh)`` while tracing) the kernels run per shard in ``shard_map``: rows
over the batch axes ('data', 'fsdp'), heads over 'tensor', by the rules table (a dim the mesh does not divide is
replicated). ``xla`` and ``chunked`` are left to XLA's partitioner.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from normguard_jax.parallel import rules

IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
AUTO_CHUNKED_MIN_LOGITS = 2048 * 2048   # per (row, head): auto picks chunked at or above, xla below
CHUNK_BLOCK = 512                       # chunked: keys per block
SPLASH_LENGTH_MULTIPLE = 128            # splash: sequence lengths are padded to a multiple of this
SPLASH_MAX_BLOCK = 512                  # splash: largest block (power of two dividing the padded length)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "minus infinity" (as splash's DEFAULT_MASK_VALUE)

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- xla reference

def _xla(q, k, v, allowed):
  """softmax(q k^T * s) v; ``allowed`` None or bool broadcastable to (B, H, L, M)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("blhd,bmhd->bhlm", q, k, preferred_element_type=jnp.float32) * scale
  if allowed is not None:
    logits = jnp.where(allowed, logits, _NEG)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhlm,bmhd->blhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  if allowed is not None:  # a query with no allowed key: zero output
    any_key = jnp.broadcast_to(jnp.any(allowed, axis=-1), logits.shape[:3])  # (B, H, L)
    out = jnp.where(any_key.transpose(0, 2, 1)[..., None], out, 0.0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------- chunked

def _key_blocks(k, v, allowed, block):
  """Pad the key axis to a multiple of ``block`` and move the block index to the front (scan xs)."""
  m = k.shape[1]
  nb = -(-m // block)
  pad = nb * block - m
  kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
  vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  ap = jnp.pad(allowed, [(0, 0)] * 3 + [(0, pad)])  # padding: False
  to_blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[:1] + (nb, block) + x.shape[2:]), 1, 0)
  ab = jnp.moveaxis(ap.reshape(ap.shape[:3] + (nb, block)), 3, 0)
  return to_blocks(kp), to_blocks(vp), ab


def _chunked_fwd_scan(q, kb, vb, ab):
  scale = q.shape[-1] ** -0.5
  b, lq, h, d = q.shape
  init = (jnp.full((b, h, lq), _NEG, jnp.float32), jnp.zeros((b, h, lq), jnp.float32),
          jnp.zeros((b, h, lq, d), jnp.float32))

  def body(carry, xs):
    m, l, acc = carry
    kj, vj, aj = xs
    s = jnp.einsum("blhd,bmhd->bhlm", q, kj, preferred_element_type=jnp.float32) * scale
    s = jnp.where(aj, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + jnp.einsum("bhlm,bmhd->bhld", p.astype(vj.dtype), vj,
                                              preferred_element_type=jnp.float32)
    return (m_new, l, acc), None

  (m, l, acc), _ = jax.lax.scan(body, init, (kb, vb, ab))
  ok = m > 0.5 * _NEG  # the row saw at least one allowed key
  out = jnp.where(ok[..., None], acc / l[..., None], 0.0)
  lse = jnp.where(ok, m + jnp.log(l), jnp.inf)  # inf: p = exp(s - inf) = 0 in the backward
  return out.transpose(0, 2, 1, 3).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked_core(q, k, v, allowed, block):
  kb, vb, ab = _key_blocks(k, v, allowed, block)
  return _chunked_fwd_scan(q, kb, vb, ab)[0]


def _chunked_core_fwd(q, k, v, allowed, block):
  kb, vb, ab = _key_blocks(k, v, allowed, block)
  out, lse = _chunked_fwd_scan(q, kb, vb, ab)
  return out, (q, k, v, allowed, out, lse)


def _chunked_core_bwd(block, res, g):
  """FlashAttention-2 backward over the same key blocks: P = exp(S - lse), dS = P (dP - rowsum(dO * O))."""
  q, k, v, allowed, out, lse = res
  scale = q.shape[-1] ** -0.5
  m = k.shape[1]
  kb, vb, ab = _key_blocks(k, v, allowed, block)
  delta = jnp.einsum("blhd,blhd->bhl", g.astype(jnp.float32), out.astype(jnp.float32))

  def body(dq, xs):
    kj, vj, aj = xs
    s = jnp.einsum("blhd,bmhd->bhlm", q, kj, preferred_element_type=jnp.float32) * scale
    p = jnp.where(aj, jnp.exp(s - lse[..., None]), 0.0)
    dv = jnp.einsum("bhlm,blhd->bmhd", p.astype(g.dtype), g, preferred_element_type=jnp.float32)
    dp = jnp.einsum("blhd,bmhd->bhlm", g, vj, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bhlm,bmhd->blhd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhlm,blhd->bmhd", ds.astype(q.dtype), q, preferred_element_type=jnp.float32)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), (kb, vb, ab))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((x.shape[1], -1) + x.shape[3:])[:, :m]
  return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), None


_chunked_core.defvjp(_chunked_core_fwd, _chunked_core_bwd)


def _chunked(q, k, v, allowed, block=None):
  m = k.shape[1]
  block = CHUNK_BLOCK if block is None else block
  if allowed is None:
    allowed = jnp.ones((1, 1, 1, m), bool)
  allowed = jnp.asarray(allowed, bool)
  allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape)
  return _chunked_core(q, k, v, allowed, int(min(block, m)))


# ----------------------------------------------------------------------------------------------- splash (TPU)

def _round_up(n, m):
  return -(-n // m) * m


def _splash_block(length):
  """The largest power of two <= SPLASH_MAX_BLOCK that divides the (padded) length."""
  block = SPLASH_MAX_BLOCK
  while length % block:
    block //= 2
  return block


def _splash_kernel(heads, lq, lk, interpret):
  """Built per call (its mask-info arrays must belong to the current trace); the numpy mask processing behind
  it is cached by the library."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  bq, bk = _splash_block(lq), _splash_block(lk)
  sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                        block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
  mask = sm.MultiHeadMask([sm.FullMask((lq, lk)) for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, kv_mask, *, interpret):
  """Per shard: (B, L, H, D) -> pad lengths, SegmentIds for padding / kv_mask, vmap the kernel over rows."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, lq, h, d = q.shape
  lk = k.shape[1]
  lqp, lkp = _round_up(lq, SPLASH_LENGTH_MULTIPLE), _round_up(lk, SPLASH_LENGTH_MULTIPLE)
  real_k = jnp.arange(lkp) < lk
  key_ok = real_k[None] if kv_mask is None else jnp.pad(kv_mask, ((0, 0), (0, lkp - lk)))
  key_ok = jnp.broadcast_to(key_ok, (b, lkp))
  # Queries (padded ones too) take id 1 and see the real keys; a row with no real key takes id 0, sees every
  # key (so no softmax row is empty) and is zeroed below.
  row_ok = jnp.any(key_ok, axis=1)
  q_seg = jnp.broadcast_to(row_ok[:, None], (b, lqp)).astype(jnp.int32)
  segments = sk.SegmentIds(q=q_seg, kv=key_ok.astype(jnp.int32))
  to_kernel = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  kernel = _splash_kernel(h, lqp, lkp, interpret)
  qs = q * jnp.asarray(d ** -0.5, q.dtype)
  out = jax.vmap(kernel)(to_kernel(qs, lqp), to_kernel(k, lkp), to_kernel(v, lkp), segments)
  out = out.transpose(0, 2, 1, 3)[:, :lq]
  if kv_mask is not None:
    out = jnp.where(row_ok[:, None, None, None], out, 0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------- cuDNN (GPU)

def _cudnn(q, k, v, kv_mask, *, implementation="cudnn"):
  """cuDNN flash attention; a ``kv_mask`` becomes a real-first key order plus ``key_value_seq_lengths``.
  (``implementation="xla"`` runs the same reordering through JAX's XLA path: how the CPU tests check it.)"""
  if kv_mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  order = jnp.argsort(jnp.logical_not(kv_mask), axis=1, stable=True)  # real keys first, in order
  k = jnp.take_along_axis(k, order[:, :, None, None], axis=1)
  v = jnp.take_along_axis(v, order[:, :, None, None], axis=1)
  n = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=jnp.maximum(n, 1),
                                     implementation=implementation)
  return jnp.where((n > 0)[:, None, None, None], out, 0).astype(q.dtype)


def _cudnn_refusal(q, platform, devices):
  """Why cuDNN cannot take this call (None if it can)."""
  if platform != "gpu":
    return f"backend {platform!r} is not a GPU"
  if q.dtype not in [jnp.dtype(t) for t in CUDNN_DTYPES]:
    return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 / float16)"
  dh = q.shape[-1]
  cc = str(getattr(devices[0], "compute_capability", "0.0") or "0.0")
  hopper = tuple(int(x) for x in cc.split(".")[:2]) >= (9, 0)
  limit = 256 if hopper else 128
  if dh % 8 or dh > limit:
    return f"head_dim {dh} (cuDNN needs a multiple of 8, at most {limit} on compute capability {cc})"
  return None


# ----------------------------------------------------------------------------------------------- dispatch

def _shard_map(fn, mesh, in_specs, out_specs):
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map  # JAX < 0.7
  return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _per_shard(kernel, mesh, q, k, v, kv_mask):
  """Run ``kernel(q, k, v, kv_mask)`` per shard: rows over ('data', 'fsdp'), heads over 'tensor' (rules table)."""
  if mesh is None:
    return kernel(q, k, v, kv_mask)
  spec = rules.logical_to_spec(("batch", "length", "heads", "kv"), q.shape, mesh)  # lengths: never split
  if kv_mask is None:
    return _shard_map(lambda q_, k_, v_: kernel(q_, k_, v_, None), mesh, (spec, spec, spec), spec)(q, k, v)
  mspec = jax.sharding.PartitionSpec(spec[0], None)
  return _shard_map(kernel, mesh, (spec, spec, spec, mspec), spec)(q, k, v, kv_mask)


def _target(mesh):
  """(platform, devices) the program is compiled for: the mesh's devices (AOT for TPU on a CPU host), else the
  default backend."""
  if mesh is not None:
    devices = list(mesh.devices.flat)
    return devices[0].platform, devices
  return jax.default_backend(), jax.devices()


def _off_kernel(q, k):
  return "chunked" if q.shape[1] * k.shape[1] >= AUTO_CHUNKED_MIN_LOGITS else "xla"


@functools.lru_cache(maxsize=None)
def _log_fallback_once(asked, got, why):
  _log.warning("attention_impl=%r cannot take this call (%s); using %r", asked, why, got)


def resolve(impl, q, k, *, dense_mask=False, mesh=None):
  """The implementation that ``dot_product_attention`` runs for these (abstract) inputs; see the module doc."""
  if impl not in IMPLEMENTATIONS:
    extra = "; 'jax' was removed: use 'auto' (or 'xla' for the reference)" if impl == "jax" else ""
    raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLEMENTATIONS}{extra}")
  platform, devices = _target(mesh)
  if impl in ("xla", "chunked"):
    return impl
  if impl == "auto":
    if dense_mask:
      return _off_kernel(q, k)
    if platform == "tpu" and (mesh is not None or len(devices) == 1):
      return "splash"
    if platform == "gpu" and _cudnn_refusal(q, platform, devices) is None:
      return "cudnn"
    return _off_kernel(q, k)
  if impl == "cudnn" and platform != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs a GPU backend; this program is for {platform!r} "
                     "(use 'auto')")
  why = "a dense mask (kernels take kv_mask only)" if dense_mask else None
  if why is None and impl == "cudnn":
    why = _cudnn_refusal(q, platform, devices)
  if why is not None:
    got = _off_kernel(q, k)
    _log_fallback_once(impl, got, why)
    return got
  return impl


def _check(q, k, v, mask, kv_mask):
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"attention: q (B, L, H, Dh), k and v (B, M, H, Dh) expected; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree on batch, heads or head_dim")
  if kv_mask is not None and (kv_mask.shape != (k.shape[0], k.shape[1]) or kv_mask.dtype != jnp.bool_):
    raise ValueError(f"attention: kv_mask must be bool (B, M) = {(k.shape[0], k.shape[1])}; got "
                     f"{kv_mask.dtype} {kv_mask.shape}")
  if mask is not None:
    try:
      jnp.broadcast_shapes(mask.shape, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    except ValueError:
      raise ValueError(f"attention: mask {mask.shape} does not broadcast to (B, H, L, M) = "
                       f"{(q.shape[0], q.shape[2], q.shape[1], k.shape[1])}") from None


def dot_product_attention(q, k, v, *, impl="xla", mask=None, kv_mask=None):
  """Scaled dot-product attention over (B, L, H, Dh) queries and (B, M, H, Dh) keys / values.

  ``impl``: one of ``IMPLEMENTATIONS`` (module doc). ``kv_mask``: None or bool (B, M), True = a real key.
  ``mask``: None or bool broadcastable to (B, H, L, M), True = the query may attend to the key. A query with no
  allowed key gets a zero output. Returns (B, L, H, Dh) in q's dtype.
  """
  kv_mask = None if kv_mask is None else jnp.asarray(kv_mask)
  mask = None if mask is None else jnp.asarray(mask)
  _check(q, k, v, mask, kv_mask)
  mesh = rules.current_activation_mesh()
  chosen = resolve(impl, q, k, dense_mask=mask is not None, mesh=mesh)
  if chosen in ("xla", "chunked"):
    allowed = mask
    if kv_mask is not None:
      key_allowed = kv_mask[:, None, None, :]
      allowed = key_allowed if allowed is None else (allowed & key_allowed)
    return (_xla if chosen == "xla" else _chunked)(q, k, v, allowed)
  platform, _ = _target(mesh)
  if chosen == "splash":
    kernel = functools.partial(_splash, interpret=platform != "tpu")
  else:
    kernel = _cudnn
  return _per_shard(kernel, mesh, q, k, v, kv_mask)
