"""Shardings of train states, batches and KV caches, from the logical-axis rules.

Parameters follow `rules.parameter_specs`. Optimizer state that mirrors the
parameters (AdamW's moments) follows them too. Such a leaf is recognised by
the parameter path at the end of its own path. Scalars such as step counts
are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from gemma4_jax.parallel import rules as rules_lib

Rules = Sequence[tuple[str, Sequence[str]]]


def _dict_path(path) -> str:
  """Return the '/'-joined dictionary keys of a tree path, other entries dropped."""
  return '/'.join(
      str(entry.key) for entry in path
      if isinstance(entry, jax.tree_util.DictKey)
  )


def _leaf_sharding(path, leaf, mesh, rules) -> NamedSharding:
  shape = getattr(leaf, 'shape', ())
  name = _dict_path(path)
  if not shape or not name:
    return NamedSharding(mesh, PartitionSpec())
  try:
    axes = rules_lib.parameter_axes(name, len(shape))
  except KeyError:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, rules_lib.spec_for(shape, axes, mesh, rules))


def tree_shardings(
    tree: Any, mesh: jax.sharding.Mesh, rules: Rules = rules_lib.DEFAULT_RULES
) -> Any:
  """Shard every leaf of `tree` whose path ends in a parameter path by the rules.

  Works for parameter trees, LoRA adapters, optax states and train states:
  leaves that are not parameters (counts, RNG keys, step numbers) are
  replicated.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _leaf_sharding(path, leaf, mesh, rules), tree
  )


def batch_shardings(
    batch: Any, mesh: jax.sharding.Mesh, rules: Rules = rules_lib.DEFAULT_RULES
) -> Any:
  """Split every [B, ...] array of `batch` over the `batch` rule's mesh axes."""

  def sharding(leaf):
    shape = getattr(leaf, 'shape', ())
    if not shape:
      return NamedSharding(mesh, PartitionSpec())
    axes = ('batch',) + ('length',) * (len(shape) > 1) + (None,) * max(
        len(shape) - 2, 0
    )
    return NamedSharding(mesh, rules_lib.spec_for(shape, axes, mesh, rules))

  return jax.tree.map(sharding, batch)


def cache_shardings(
    cache: Any, mesh: jax.sharding.Mesh, rules: Rules = rules_lib.DEFAULT_RULES
) -> Any:
  """Shard a KV cache: rows over the `batch` axes, KV heads over `kv_heads`.

  Keys and values are [B, S, K, H], slot positions [B, S] and lengths [B].
  """

  def sharding(leaf):
    shape = getattr(leaf, 'shape', ())
    axes = {
        0: (),
        1: ('batch',),
        2: ('batch', 'length'),
        4: ('batch', 'length', 'kv_heads', 'head_dim'),
    }.get(len(shape))
    if axes is None:
      raise ValueError(f'unexpected KV-cache array of shape {shape}')
    return NamedSharding(mesh, rules_lib.spec_for(shape, axes, mesh, rules))

  return jax.tree.map(sharding, cache)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
