"""The KV cache: only what attention needs, per layer.

- Local (sliding-window) layers keep a ring buffer of `sliding_window` slots:
  a query at position p only sees keys in (p - window, p].
- Global layers keep one slot per position up to the cache length.
- KV-shared layers keep nothing; they read the cache of their source layer.
- Global layers with keys equal to values (26B-A4B, 31B) store only the
  normalised values `v`: their keys are `RoPE(v * key_norm.scale)`, so they
  are rebuilt from `v` and the slot positions when attention reads them.

Each slot records the position of the token it holds (-1 when empty), and
token at position p lives in slot `p % num_slots`.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from gemma4_jax.config import GLOBAL, Gemma4Config


@flax.struct.dataclass
class LayerCache:
  """Keys and values of one unshared layer.

  Attributes:
    values: [B, S, K, H] normalised values.
    keys: [B, S, K, H] normalised, rotated keys; None for layers whose keys
      are rebuilt from `values` (keys equal values).
    positions: [B, S] int32 position of each slot's token, -1 if empty.
  """

  values: jax.Array
  keys: jax.Array | None
  positions: jax.Array


@flax.struct.dataclass
class KVCache:
  """The cache of a whole decoder.

  Attributes:
    layers: One `LayerCache` per layer, None for KV-shared layers.
    lengths: [B] int32 number of tokens written so far per row; the next
      token of row b has position `lengths[b]`.
  """

  layers: tuple[LayerCache | None, ...]
  lengths: jax.Array

  @property
  def batch_size(self) -> int:
    return int(self.lengths.shape[0])

  @property
  def max_length(self) -> int:
    """Tokens a row can hold: the slot count of the global layers."""
    return max(
        layer.positions.shape[1] for layer in self.layers if layer is not None
    )

  def nbytes(self) -> int:
    """Bytes of all cache arrays."""
    return sum(x.nbytes for x in jax.tree.leaves(self))


def layer_slots(config: Gemma4Config, layer: int, cache_length: int) -> int:
  """Slots of `layer`'s cache: the window for local layers, else the length."""
  if config.layer_kinds[layer] == GLOBAL:
    return cache_length
  return min(config.sliding_window, cache_length)


def init_cache(
    config: Gemma4Config,
    batch_size: int,
    cache_length: int,
    dtype=jnp.bfloat16,
    *,
    values_only_for_k_eq_v: bool = True,
) -> KVCache:
  """Allocate an empty cache for `batch_size` rows of `cache_length` tokens.

  With `values_only_for_k_eq_v=False`, keys-equal-values layers store their
  keys as well (twice the bytes; useful only to check the default).
  """
  if cache_length < 1:
    raise ValueError(f'cache_length={cache_length} must be at least 1')
  layers = []
  for i in range(config.num_layers):
    if config.is_kv_shared(i):
      layers.append(None)
      continue
    slots = layer_slots(config, i, cache_length)
    shape = (
        batch_size,
        slots,
        config.layer_num_kv_heads(i),
        config.layer_head_dim(i),
    )
    values = jnp.zeros(shape, dtype)
    values_only = values_only_for_k_eq_v and config.layer_k_eq_v(i)
    keys = None if values_only else jnp.zeros(shape, dtype)
    positions = jnp.full((batch_size, slots), -1, jnp.int32)
    layers.append(LayerCache(values=values, keys=keys, positions=positions))
  return KVCache(
      layers=tuple(layers), lengths=jnp.zeros((batch_size,), jnp.int32)
  )


def cache_bytes(
    config: Gemma4Config, batch_size: int, cache_length: int, dtype
) -> int:
  """Bytes `init_cache` would allocate, computed without allocating."""
  abstract = jax.eval_shape(
      lambda: init_cache(config, batch_size, cache_length, dtype)
  )
  return sum(
      x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
  )
