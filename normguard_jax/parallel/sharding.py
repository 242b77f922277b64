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
