"""Sharding helpers: shardings from ``eval_shape``, init directly into them, sharded batches, per-device bytes."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from normguard_jax.parallel import rules


def abstract_and_shardings(init_fn, mesh, notes=None):
  """``init_fn() -> pytree``: returns (its ShapeDtypeStruct tree, the NamedSharding tree from the rules)."""
  abstract = jax.eval_shape(init_fn)
  return abstract, rules.tree_shardings(abstract, mesh, notes)


def init_sharded(init_fn, mesh, notes=None):
  """Run ``init_fn`` under jit with the rule shardings as out_shardings: params are created already sharded,
  never materialised whole on one device."""
  _, shardings = abstract_and_shardings(init_fn, mesh, notes)
  return jax.jit(init_fn, out_shardings=shardings)()


def shard_tree(tree, mesh, notes=None):
  """Place an existing (host or single-device) tree onto the mesh by the rules."""
  return jax.device_put(tree, rules.tree_shardings(tree, mesh, notes))


def batch_shardings(batch, mesh):
  return jax.tree_util.tree_map(lambda x: rules.batch_sharding(mesh, x.ndim), batch)


def shard_batch(batch, mesh):
  """Global batch (on one host) -> arrays split over ('data', 'fsdp') on the leading dim."""
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  for k, x in batch.items():
    if x.shape[0] % n:
      raise ValueError(f"batch field {k!r} has {x.shape[0]} rows, not divisible by data*fsdp = {n}")
  return jax.device_put(batch, batch_shardings(batch, mesh))


def host_local_batch_to_global(local_batch, mesh):
  """Multi-host feeding: each process passes its own rows; returns global arrays sharded over the batch axes
  (``jax.make_array_from_process_local_data``)."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(rules.batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
      local_batch)


def batch_size_divisor(mesh):
  """How many ways the batch axes split the rows: data x fsdp (DCN sizes included: the mesh holds them)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def place_rows(tree, mesh):
  """Split every leaf's rows over the mesh's batch axes (one global value, the same on every process).

  Rows that the batch axes do not divide are refused: a replicated batch would make every chip compute every row
  (correct, and data x fsdp times the work). The config check (config.check_batch_layout) refuses such a config
  before any compute; :func:`pad_rows` serves programs whose row count is not the config's choice (evaluation)."""
  rows = jax.tree_util.tree_leaves(tree)[0].shape[0]
  n = batch_size_divisor(mesh)
  if rows % n:
    raise ValueError(f"{rows} rows do not split over the mesh's batch axes data x fsdp = {n} "
                     f"(mesh {dict(mesh.shape)}); pad them (sharding.pad_rows) or change the batch")
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, rules.batch_sharding(mesh, np.ndim(x))), tree)


def pad_rows(tree, multiple):
  """Pad every leaf's rows up to a multiple of ``multiple`` with copies of the last row; returns (tree, rows).
  Row-wise programs (sampling, decoding, scoring) then run split evenly, and ``x[:rows]`` drops the copies
  exactly."""
  rows = jax.tree_util.tree_leaves(tree)[0].shape[0]
  extra = -rows % multiple
  if not extra:
    return tree, rows
  pad = lambda x: np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], extra, axis=0)], axis=0)
  return jax.tree_util.tree_map(pad, tree), rows


def rows_from_process_local(make_rows, num_rows, mesh):
  """A global pytree of ``num_rows`` rows split over the mesh's batch axes, where each process builds only the
  rows its own devices hold (DESIGN.md §5: each host feeds its shard of the global batch).

  ``make_rows(row_indices) -> pytree`` of host arrays with those rows of the global batch, in that order. On one
  process it is called with every row; on a pod each host materialises 1/hosts of the batch."""
  n = batch_size_divisor(mesh)
  if num_rows % n:
    raise ValueError(f"{num_rows} rows do not split over the mesh's batch axes data x fsdp = {n}")
  row_sh = rules.batch_sharding(mesh, 1)
  index_map = row_sh.addressable_devices_indices_map((num_rows,))
  slices = {d: range(*idx[0].indices(num_rows)) for d, idx in index_map.items()}
  needed = sorted({i for r in slices.values() for i in r})
  local = make_rows(np.asarray(needed, np.int64))
  where = {row: j for j, row in enumerate(needed)}

  def build(x):
    x = np.asarray(x)
    sh = rules.batch_sharding(mesh, x.ndim)
    arrays = [jax.device_put(x[[where[i] for i in r]], d) for d, r in slices.items()]
    return jax.make_array_from_single_device_arrays((num_rows,) + x.shape[1:], sh, arrays)
  return jax.tree_util.tree_map(build, local)


def replicated(mesh):
  return NamedSharding(mesh, P())


def per_device_bytes(tree):
  """Bytes of ``tree`` held by the first addressable device (the largest shard per leaf on device 0)."""
  dev = None
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shards = x.addressable_shards
    if dev is None:
      dev = shards[0].device
    total += sum(s.data.nbytes for s in shards if s.device == dev)
  return total
