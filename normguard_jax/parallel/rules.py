"""The one sharding table: logical axis names for every param (by path) and activation, and logical -> mesh.

``PARAM_AXES`` names the dims of each parameter kind, matched on whole '/'-separated path segments at the end of
the path (first match wins);
params stacked by ``nn.scan`` get a leading 'layers' axis. LoRA adapters inherit the in/out names of the kernel they
adapt. ``LOGICAL_RULES`` maps logical names to mesh axes, the only place where that decision is made.
A dim that the mesh axis does not divide is replicated (``logical_to_spec`` reports it in ``notes``).
"""

import contextlib
import contextvars
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),   # activations and data: split over every data-parallel axis
    ("embed", "fsdp"),             # model width: FSDP shards the params along it (ZeRO-3 style)
    ("mlp", "tensor"),             # hidden / projection outputs: tensor parallel
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),              # tokens
    ("layers", None),              # the scanned layer axis is never sharded
    ("vocab", None), ("patch", None), ("freq", None), ("out_channels", None), ("in_channels", None),
    ("text_embed", None),
    ("lora_rank", None), ("adapters", None),
    # LoRA factors: the non-rank dim of a factor on a tensor-parallel ("mlp") dim is split over tensor and fsdp, so
    # that under pure FSDP (tensor = 1) the factors and their Adam moments are sharded too, not replicated (issue 13)
    ("lora_mlp", ("tensor", "fsdp")),
)

# (path-suffix regex, logical axes of the kernel/param dims, without the scanned 'layers' axis)
PARAM_AXES = (
    # specific paths first: a later, shorter pattern may also match their suffix
    (r"(^|/)pos_embed/proj/kernel$", ("patch", "patch", "in_channels", "embed")),
    (r"(^|/)pos_embed/proj/bias$", ("embed",)),
    # tiny DiT (models/dit.py)
    (r"(^|/)(qkv|fc1|adaln|final_adaln|t_embed_2)/kernel$", ("embed", "mlp")),
    (r"(^|/)(proj|fc2)/kernel$", ("mlp", "embed")),
    (r"(^|/)(qkv|fc1|adaln|final_adaln)/bias$", ("mlp",)),
    (r"(^|/)(proj|fc2|patch_embed|t_embed_1|t_embed_2)/bias$", ("embed",)),
    (r"(^|/)label_embed/embedding$", ("vocab", "embed")),
    (r"(^|/)patch_embed/kernel$", ("patch", "embed")),
    (r"(^|/)t_embed_1/kernel$", ("freq", "embed")),
    (r"(^|/)final_proj/kernel$", ("embed", "out_channels")),
    (r"(^|/)final_proj/bias$", ("out_channels",)),
    # SD3 / SD3.5 MMDiT (models/mmdit.py; diffusers names)
    (r"(^|/)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|norm1|norm1_context|norm_out|linear_2)/kernel$",
     ("embed", "mlp")),
    (r"(^|/)(to_out|to_add_out)/kernel$", ("mlp", "embed")),
    (r"(^|/)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|norm1|norm1_context|norm_out|linear_2)/bias$",
     ("mlp",)),
    (r"(^|/)(to_out|to_add_out|context_embedder|linear_1)/bias$", ("embed",)),
    (r"(^|/)(norm_q|norm_k|norm_added_q|norm_added_k)/scale$", ("kv",)),
    (r"(^|/)context_embedder/kernel$", ("text_embed", "embed")),
    (r"(^|/)timestep_embedder/linear_1/kernel$", ("freq", "embed")),
    (r"(^|/)text_embedder/linear_1/kernel$", ("text_embed", "embed")),
    (r"(^|/)proj_out/kernel$", ("embed", "out_channels")),
    (r"(^|/)proj_out/bias$", ("out_channels",)),
    # FLUX.1 / FLUX.2 (models/flux.py; diffusers names), after the shared attention and embedding patterns above
    (r"(^|/)(norm|proj_mlp|to_qkv_mlp_proj|linear_in|double_stream_modulation_img|double_stream_modulation_txt|"
     r"single_stream_modulation)/kernel$", ("embed", "mlp")),
    (r"(^|/)(norm|proj_mlp|to_qkv_mlp_proj)/bias$", ("mlp",)),
    (r"(^|/)linear_out/kernel$", ("mlp", "embed")),
    (r"(^|/)guidance_embedder/linear_1/kernel$", ("freq", "embed")),
    (r"(^|/)x_embedder/kernel$", ("in_channels", "embed")),
    (r"(^|/)x_embedder/bias$", ("embed",)),
)

ACTIVATION_AXES = {
    "tokens": ("batch", "length", "embed"),
    "images": ("batch", None, None, None),
    "per_sample": ("batch",),
}


_ACTIVATION_MESH = contextvars.ContextVar("normguard_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh):
  """While tracing under this context, :func:`constrain` pins activations to ``mesh`` by ACTIVATION_AXES."""
  token = _ACTIVATION_MESH.set(mesh)
  try:
    yield mesh
  finally:
    _ACTIVATION_MESH.reset(token)


def constrain(x, kind):
  """``with_sharding_constraint`` on an activation by its ACTIVATION_AXES kind (e.g. the token stream between
  blocks: rows over the data axes); a no-op outside :func:`activation_mesh` (single device, parity tests)."""
  mesh = _ACTIVATION_MESH.get()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(ACTIVATION_AXES[kind], x.shape,
                                                                                  mesh)))


def _path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_logical_axes(path, ndim):
  """Logical axes of a param leaf from its path; raises naming the path if no rule covers it."""
  s = _path_str(path) if not isinstance(path, str) else path
  lora = re.search(r"/(lora_a|lora_b)$", s)
  probe = re.sub(r"/lora_[ab]$", "/kernel", s) if lora else s
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, probe):
      if lora:
        dim = lambda a: "lora_mlp" if a == "mlp" else a
        axes = ((dim(axes[0]), "lora_rank", "adapters") if lora.group(1) == "lora_a"
                else ("lora_rank", dim(axes[1]), "adapters"))
      extra = ndim - len(axes)
      if extra == 1:
        return ("layers",) + tuple(axes)
      if extra == 0:
        return tuple(axes)
  raise KeyError(f"no sharding rule covers param {s!r} (ndim {ndim}); add it to parallel/rules.py PARAM_AXES")


def logical_to_spec(logical, shape, mesh, notes=None):
  """PartitionSpec for ``logical`` names on ``mesh``; dims the mesh axes do not divide are replicated."""
  rules = dict(LOGICAL_RULES)
  spec, used = [], set()
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no entry in LOGICAL_RULES")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if axes and dim % size:
      if notes is not None:
        notes.append(f"{name}: dim {dim} not divisible by {axes} ({size}); replicated")
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes if axes else None))
  return P(*spec)


def is_replicated_scalar_like(x):
  return getattr(x, "ndim", 0) == 0


def tree_partition_specs(tree, mesh, notes=None):
  """PartitionSpecs for a pytree of arrays / ShapeDtypeStructs: params by rule, scalars and keys replicated.

  Optimizer moments (adam mu/nu) mirror the params' paths, so the same rules cover them."""
  def spec(path, x):
    if is_replicated_scalar_like(x) or jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return P()
    s = _path_str(path)
    if re.search(r"(^|/)rng$", s) or (x.ndim == 1 and x.dtype == "uint32"):
      return P()
    return logical_to_spec(param_logical_axes(s, x.ndim), x.shape, mesh, notes)
  return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(tree, mesh, notes=None):
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), tree_partition_specs(tree, mesh, notes),
                                is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh, ndim):
  """Batch arrays: leading dim over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (0,) * ndim, mesh))


def current_activation_mesh():
  """The mesh set by :func:`activation_mesh` while tracing, or None (e.g. the attention kernels' shard_map)."""
  return _ACTIVATION_MESH.get()
