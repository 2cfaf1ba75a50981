"""Attention masks and the Gemma 4 attention layer.

Queries are not scaled by `head_dim**-0.5`: the RMS-normalised queries and
keys (QK-norm) replace that scaling. There is no attention-logit soft-cap.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from gemma4_jax import layers
from gemma4_jax.config import GLOBAL, Gemma4Config
from gemma4_jax.parallel.rules import constrain
from gemma4_jax.sampling.cache import LayerCache

# Masked logits get a large finite negative value rather than -inf, so that a
# row with no visible key (a padding query) gives a uniform softmax, not NaN.
MASK_VALUE = -2.3819763e38


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """Positions [B, T] counting only the valid tokens of `input_mask` [B, T].

  Valid tokens get 0, 1, 2, ...; padding gets the position of the valid token
  before it (its value does not matter, it is masked everywhere).
  """
  counts = jnp.cumsum(input_mask.astype(jnp.int32), axis=-1)
  return jnp.maximum(counts - 1, 0)


def causal_mask(
    input_mask: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
  """Mask [B, T, T]: query t may attend to valid keys s <= t of its segment."""
  length = input_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  mask = causal[None] & input_mask[:, None, :].astype(jnp.bool_)
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return mask


def sliding_window_mask(
    query_positions: jax.Array, key_positions: jax.Array, window: int
) -> jax.Array:
  """Mask [B, T, S] of keys with `|query_pos - key_pos| < window`."""
  delta = key_positions[:, None, :] - query_positions[:, :, None]
  return (delta > -window) & (delta < window)


def image_block_mask(
    query_blocks: jax.Array, key_blocks: jax.Array
) -> jax.Array:
  """Mask [B, T, S] of query and key soft tokens of the same image.

  Args:
    query_blocks: [B, T] image block ids of the queries (see
      `vision.merge.image_block_ids`): 0 for text, k for the k-th run of
      image placeholders of the row.
    key_blocks: [B, S] the same for the keys.
  """
  same = query_blocks[:, :, None] == key_blocks[:, None, :]
  return same & (query_blocks[:, :, None] > 0)


def bidirectional_image_mask(
    mask: jax.Array, image_blocks: jax.Array
) -> jax.Array:
  """`mask` [B, T, T] widened so each image's soft tokens see each other.

  This is the mask of the sliding-window layers of 26B-A4B and 31B for a
  sequence with images: causal, or both tokens in the same image. The
  window still applies on top.
  """
  return mask | image_block_mask(image_blocks, image_blocks)


class KVView(NamedTuple):
  """Keys and values a layer attends to, with the position of each key.

  Attributes:
    keys: [B, S, K, H].
    values: [B, S, K, H].
    positions: [B, S] int32; -1 marks an empty or padding slot.
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array


def visible_keys_mask(
    query_positions: jax.Array,
    key_positions: jax.Array,
    window: int | None,
) -> jax.Array:
  """Mask [B, T, S]: key s is valid, not after query t, and inside the window.

  Masking by position rather than by index lets one rule serve the prompt,
  the ring buffer of local layers (slots in any order) and the global cache.
  """
  query = query_positions[:, :, None]
  key = key_positions[:, None, :]
  mask = (key >= 0) & (key <= query)
  if window is not None:
    mask &= key > query - window
  return mask


def write_to_cache(
    cache: LayerCache,
    keys: jax.Array | None,
    values: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
) -> LayerCache:
  """Store the valid tokens of a chunk in their slots `position % S`.

  Args:
    cache: The layer's cache with S slots.
    keys: [B, T, K, H] or None when the cache keeps values only.
    values: [B, T, K, H].
    positions: [B, T] positions of the chunk's tokens.
    valid: [B, T], False for padding.

  Returns:
    The updated cache. When a row's chunk is longer than S, only its last S
    valid tokens are kept.
  """
  batch, _ = positions.shape
  slots = cache.positions.shape[1]
  last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  keep = valid & (positions > last - slots)
  slot = jnp.where(keep, positions % slots, slots)  # `slots` is dropped.
  rows = jnp.arange(batch)[:, None]

  def scatter(buffer, update):
    return buffer.at[rows, slot].set(update.astype(buffer.dtype), mode='drop')

  return LayerCache(
      values=scatter(cache.values, values),
      keys=None if keys is None else scatter(cache.keys, keys),
      positions=scatter(cache.positions, positions),
  )


def attend(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
) -> jax.Array:
  """Grouped-query attention.

  Args:
    queries: [B, T, N, H].
    keys: [B, S, K, H], with N a multiple of K.
    values: [B, S, K, H].
    mask: [B, T, S], True where query t may attend to key s.

  Returns:
    [B, T, N, H], in the dtype of `values`.
  """
  batch, length, num_heads, head_dim = queries.shape
  num_kv_heads = keys.shape[2]
  groups = num_heads // num_kv_heads
  if length == 1 and num_kv_heads > 1:
    return _attend_one_token(queries, [(keys, values, mask)])
  queries = queries.reshape(batch, length, num_kv_heads, groups, head_dim)

  logits = jnp.einsum('BTKGH,BSKH->BTKGS', queries, keys)
  logits = jnp.where(mask[:, :, None, None, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  probs = probs.astype(values.dtype)

  encoded = jnp.einsum('BTKGS,BSKH->BTKGH', probs, values)
  return encoded.reshape(batch, length, num_heads, head_dim)


# A first prompt chunk longer than this attends in blocks (`attend_blocked`).
BLOCKED_PREFILL_MIN_LENGTH = 1024
# Query block sizes `prefill_block` tries, largest first, and the most bytes
# of a float32 logits block [B, N, block, block] it allows (the smallest
# block is taken when none fits).
PREFILL_BLOCKS = (512, 256, 128, 64)
BLOCK_LOGITS_BYTES = 1 << 28


def prefill_block(query_shape: tuple[int, ...]) -> int | None:
  """Query block size for `attend_blocked`, or None to attend in one go.

  Args:
    query_shape: [B, T, N, H] of the chunk's queries.
  """
  batch, length, num_heads, _ = query_shape
  if length <= BLOCKED_PREFILL_MIN_LENGTH:
    return None
  for block in PREFILL_BLOCKS:
    fits = batch * num_heads * block * block * 4 <= BLOCK_LOGITS_BYTES
    if length % block == 0 and (fits or block == PREFILL_BLOCKS[-1]):
      return block
  return None


def attend_blocked(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    positions: jax.Array,
    window: int | None,
    block: int,
) -> jax.Array:
  """`attend` for a long prompt chunk attending to itself, in blocks.

  Queries go in blocks of `block` tokens. Each block visits only the key
  blocks it can see: those up to its own end (causal), and for a sliding
  layer those from `window` tokens before its start. It combines them with
  a running maximum and sum (online softmax), so no [T, T] logits exist and
  a sliding layer does O(T * window) work, not O(T^2).

  The key ranges rely on each row's tokens holding positions 0, 1, ... in
  order, followed by padding, as in the first chunk of a right-padded
  prompt; `positions` is then used for the exact mask.

  Args:
    queries: [B, T, N, H], T a multiple of `block`.
    keys: [B, T, K, H].
    values: [B, T, K, H].
    positions: [B, T] positions of the tokens; -1 marks padding keys.
    window: Sliding window of the layer, or None for a global layer.
    block: Tokens per query and key block.

  Returns:
    [B, T, N, H] in the dtype of `values`.
  """
  batch, length, num_heads, head_dim = queries.shape
  num_kv_heads = keys.shape[2]
  groups = num_heads // num_kv_heads
  num_blocks = length // block
  dtype = values.dtype
  # Batch axes first ([B, K, ...]) so that XLA multiplies in place.
  q = queries.reshape(batch, num_blocks, block, num_kv_heads, groups, head_dim)
  q = q.transpose(1, 0, 3, 4, 2, 5)  # [blocks, B, K, G, block, H]
  k = keys.astype(queries.dtype).reshape(
      batch, num_blocks, block, num_kv_heads, head_dim
  ).transpose(1, 0, 3, 2, 4)  # [blocks, B, K, block, H]
  v = values.reshape(batch, num_blocks, block, num_kv_heads, head_dim)
  v = v.transpose(1, 0, 3, 2, 4)
  pos = positions.reshape(batch, num_blocks, block).transpose(1, 0, 2)

  def query_block(_, index):
    q_block = q[index]
    q_pos = pos[index]
    first = 0
    if window is not None:
      first = jnp.maximum(index * block - window + 1, 0) // block

    def key_block(j, carry):
      running_max, total, acc = carry
      k_pos = pos[j]
      logits = jnp.einsum(
          'BKGQH,BKSH->BKGQS', q_block, k[j],
          preferred_element_type=jnp.float32,
      )
      visible = (k_pos[:, None, :] >= 0) & (
          k_pos[:, None, :] <= q_pos[:, :, None]
      )
      if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
      logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
      new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
      correction = jnp.exp(running_max - new_max)
      probs = jnp.exp(logits - new_max[..., None])
      total = total * correction + jnp.sum(probs, axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          'BKGQS,BKSH->BKGQH', probs.astype(dtype), v[j],
          preferred_element_type=jnp.float32,
      )
      return new_max, total, acc

    shape = (batch, num_kv_heads, groups, block)
    carry = (
        jnp.full(shape, MASK_VALUE, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (head_dim,), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(first, index + 1, key_block, carry)
    return None, (acc / total[..., None]).astype(dtype)

  _, encoded = jax.lax.scan(query_block, None, jnp.arange(num_blocks))
  # [blocks, B, K, G, block, H] -> [B, T, N, H]
  encoded = encoded.transpose(1, 0, 4, 2, 3, 5)
  return encoded.reshape(batch, length, num_heads, head_dim)


def attend_to_parts(
    queries: jax.Array,
    parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
) -> jax.Array:
  """Attention over keys and values held in several arrays.

  One softmax runs over all parts' keys together, as if they were
  concatenated, but the keys and values themselves are never copied into
  one array: only the logits are joined. A decode step attends this way to
  the cache as it was before the step plus the step's own token, so the
  cache is read in place and then updated in place.

  Args:
    queries: [B, T, N, H].
    parts: (keys [B, S_i, K, H], values [B, S_i, K, H], mask [B, T, S_i])
      for each part.

  Returns:
    [B, T, N, H], in the dtype of the values.
  """
  if len(parts) == 1:
    return attend(queries, *parts[0])
  batch, length, num_heads, head_dim = queries.shape
  num_kv_heads = parts[0][0].shape[2]
  if length == 1 and num_kv_heads > 1:
    return _attend_one_token(queries, parts)
  groups = num_heads // num_kv_heads
  dtype = parts[0][1].dtype
  queries = queries.reshape(batch, length, num_kv_heads, groups, head_dim)

  logits = []
  for keys, _, mask in parts:
    part_logits = jnp.einsum('BTKGH,BSKH->BTKGS', queries, keys)
    logits.append(jnp.where(mask[:, :, None, None, :], part_logits, MASK_VALUE))
  probs = jax.nn.softmax(
      jnp.concatenate(logits, axis=-1).astype(jnp.float32), axis=-1
  ).astype(dtype)

  encoded = 0.0
  start = 0
  for _, values, _ in parts:
    size = values.shape[1]
    encoded += jnp.einsum(
        'BTKGS,BSKH->BTKGH', probs[..., start : start + size], values,
        preferred_element_type=jnp.float32,
    )
    start += size
  return encoded.astype(dtype).reshape(batch, length, num_heads, head_dim)


def _attend_one_token(
    queries: jax.Array,
    parts: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
) -> jax.Array:
  """`attend_to_parts` for one query token per row (a decode step).

  Grouped-query products have the KV head as a batch axis, and XLA's CPU
  backend wants batch axes in front. It would copy the whole cache,
  [B, S, K, H], into [B, K, S, H] order twice per step, and these copies run
  at a fraction of the memory bandwidth.
  Here the cache is read in place as [B, S, K * H] matrices, multiplied by
  block-diagonal query and probability matrices (zero outside each head's
  block). That multiplies by K more terms, all exact zeros, so the results
  are unchanged; the cost is arithmetic, cheap next to a one-token step's
  memory traffic.
  """
  batch, _, num_heads, head_dim = queries.shape
  num_kv_heads = parts[0][0].shape[2]
  groups = num_heads // num_kv_heads
  dtype = parts[0][1].dtype
  eye = jnp.eye(num_kv_heads, dtype=queries.dtype)
  queries = queries.reshape(batch, num_kv_heads, groups, head_dim)
  # [B, K * H, K * G], zero where the key head differs from the query's.
  blocks = jnp.einsum('BKGH,KL->BKHLG', queries, eye).reshape(
      batch, num_kv_heads * head_dim, num_kv_heads * groups
  )

  logits = []
  for keys, _, mask in parts:
    slots = keys.shape[1]
    flat_keys = keys.astype(queries.dtype).reshape(batch, slots, -1)
    part_logits = jnp.einsum(
        'BSM,BMN->BSN', flat_keys, blocks,
        preferred_element_type=jnp.float32,
    ).astype(queries.dtype)
    part_logits = part_logits.reshape(batch, slots, num_kv_heads, groups)
    logits.append(
        jnp.where(mask[:, 0, :, None, None], part_logits, MASK_VALUE)
    )
  probs = jax.nn.softmax(
      jnp.concatenate(logits, axis=1).astype(jnp.float32), axis=1
  ).astype(dtype)

  # [B, K, G, K, H]: every query head against every key head's values; keep
  # the blocks where they match.
  mixed = 0.0
  start = 0
  for _, values, _ in parts:
    slots = values.shape[1]
    mixed += jnp.einsum(
        'BSKG,BSM->BKGM', probs[:, start : start + slots],
        values.reshape(batch, slots, -1),
        preferred_element_type=jnp.float32,
    )
    start += slots
  mixed = mixed.reshape(batch, num_kv_heads, groups, num_kv_heads, head_dim)
  encoded = jnp.stack(
      [mixed[:, k, :, k] for k in range(num_kv_heads)], axis=1
  ).astype(dtype)
  return encoded.reshape(batch, 1, num_heads, head_dim)


class Attention(nn.Module):
  """Self-attention of decoder layer `layer`, local (sliding) or global.

  Global layers have `global_head_dim`-wide heads, their own KV-head count,
  partial RoPE and, when `k_eq_v_global`, one projection `k_einsum` whose
  output serves as both keys and values (before their different norms).
  """

  config: Gemma4Config
  layer: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    embed_dim = cfg.embed_dim
    self.head_dim = cfg.layer_head_dim(self.layer)
    self.num_kv_heads = cfg.layer_num_kv_heads(self.layer)
    self.k_eq_v = cfg.layer_k_eq_v(self.layer)
    self.is_global = cfg.layer_kinds[self.layer] == GLOBAL

    self.q_einsum = layers.Einsum(
        (cfg.num_heads, embed_dim, self.head_dim),
        init_stddev=embed_dim**-0.5,
        dtype=self.dtype,
    )
    if self.k_eq_v:
      self.k_einsum = layers.Einsum(
          (self.num_kv_heads, embed_dim, self.head_dim),
          init_stddev=embed_dim**-0.5,
          dtype=self.dtype,
      )
    else:
      self.kv_einsum = layers.Einsum(
          (2, self.num_kv_heads, embed_dim, self.head_dim),
          init_stddev=embed_dim**-0.5,
          dtype=self.dtype,
      )
    self.attn_vec_einsum = layers.Einsum(
        (cfg.num_heads, self.head_dim, embed_dim),
        init_stddev=(cfg.num_heads * self.head_dim) ** -0.5,
        dtype=self.dtype,
    )
    self.query_norm = layers.RMSNorm(dtype=self.dtype)
    self.key_norm = layers.RMSNorm(dtype=self.dtype)

  def rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    cfg = self.config
    if self.is_global:
      base, proportion = cfg.global_rope_base, cfg.global_rope_proportion
    else:
      base, proportion = cfg.local_rope_base, cfg.local_rope_proportion
    return layers.apply_rope(
        x, positions, base_frequency=base, rope_proportion=proportion
    )

  def queries(
      self, x: jax.Array, positions: jax.Array, streamed: bool = False
  ) -> jax.Array:
    """Normalised, rotated queries [B, T, N, H] of `x` [B, T, D]."""
    q = self.q_einsum('BTD,NDH->BTNH', x, streamed)
    q = constrain(q, ('batch', 'length', 'heads', None))
    return self.rope(self.query_norm(q), positions)

  def keys_values(
      self, x: jax.Array, positions: jax.Array, streamed: bool = False
  ) -> tuple[jax.Array, jax.Array]:
    """Keys (normalised, rotated) and values (normalised) [B, S, K, H]."""
    if self.k_eq_v:
      k = v = self.k_einsum('BSD,KDH->BSKH', x, streamed)
    else:
      k, v = self.kv_einsum('BSD,CKDH->CBSKH', x, streamed)
    k = constrain(k, ('batch', 'length', 'kv_heads', None))
    v = constrain(v, ('batch', 'length', 'kv_heads', None))
    k = self.rope(self.key_norm(k), positions)
    v = layers.rms_norm(v)
    return k, v

  def view_of_cache(self, cache: LayerCache) -> KVView:
    """Return the keys and values in `cache`, rebuilding keys it does not store."""
    keys = cache.keys
    if keys is None:
      # Keys equal values up to the key-norm scale: K = RoPE(v * scale).
      scale = self.key_norm.variables['params']['scale']
      if self.is_global:
        # A global cache stores the token at position p in slot p (it has a
        # slot for every position), so the rotation angles depend on the
        # slot only: one table serves every row.
        cfg = self.config
        keys = layers.apply_rope_by_slot(
            cache.values * scale,
            base_frequency=cfg.global_rope_base,
            rope_proportion=cfg.global_rope_proportion,
        )
      else:
        keys = self.rope(cache.values * scale, cache.positions)
      # Without the barrier XLA fuses the rotation into the attention
      # products, which then recompute it per use (4x slower at 8K slots).
      keys = jax.lax.optimization_barrier(keys)
    return KVView(keys, cache.values, cache.positions)

  def cached(
      self,
      x: jax.Array,
      positions: jax.Array,
      valid: jax.Array,
      cache: LayerCache | None,
      mode: str,
      shared_view: tuple[KVView, ...] | None = None,
      image_blocks: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None, tuple[KVView, ...]]:
    """Attention for prefill and decode steps, reading and updating `cache`.

    Args:
      x: Normalised block input [B, T, D].
      positions: [B, T] positions of the chunk's tokens.
      valid: [B, T], False for padding tokens (neither stored nor attended).
      cache: This layer's cache, or None for a KV-shared layer.
      mode: 'fresh' when the cache is still empty (the chunk attends to
        itself only), 'extend' when the chunk continues what is cached.
      shared_view: For KV-shared layers, the view of the source layer.
      image_blocks: [B, T] image block ids of the chunk's tokens, given for
        models whose sliding-window layers attend bidirectionally within an
        image (`vision_bidirectional`). Each image must lie wholly inside
        one chunk. Global layers ignore it.

    Returns:
      The output [B, T, D], the updated cache (None for shared layers) and
      the view attended to, which KV-shared layers reuse: the chunk's keys
      and values, after those of the cache as it was before the chunk
      ('extend' only).
    """
    q = self.queries(x, positions, streamed=True)

    new_cache = None
    if shared_view is not None:
      view = shared_view
    else:
      k, v = self.keys_values(x, positions, streamed=True)
      chunk = KVView(k, v, jnp.where(valid, positions, -1))
      if mode == 'fresh':
        view = (chunk,)
      else:
        # The cache before the chunk, read in place. Slots the chunk
        # overwrites hold positions outside its window (local layers) or no
        # token (global layers), so attending to them changes nothing.
        view = (self.view_of_cache(cache), chunk)
      new_cache = write_to_cache(
          cache, None if cache.keys is None else k, v, positions, valid
      )

    window = None if self.is_global else self.config.sliding_window
    bidirectional = image_blocks is not None and not self.is_global
    block = None
    # `attend_blocked` applies only the causal and window masks, so a sliding
    # layer where image tokens attend to later ones attends in one go.
    if mode == 'fresh' and not bidirectional:
      block = prefill_block(q.shape)
    if block is not None:
      # In a fresh chunk, `view` contains the chunk's own keys (or those of
      # the KV-sharing source, at the same positions).
      (own,) = view
      encoded = attend_blocked(
          q, own.keys, own.values, own.positions, window, block
      )
    else:
      parts = [
          (
              part.keys.astype(q.dtype),
              part.values,
              visible_keys_mask(positions, part.positions, window),
          )
          for part in view
      ]
      if bidirectional:
        # The chunk's own keys are the last part of the view, in both modes
        # and for KV-shared layers alike.
        keys, values, mask = parts[-1]
        same_image = image_block_mask(image_blocks, image_blocks)
        same_image &= sliding_window_mask(
            positions, view[-1].positions, window
        )
        parts[-1] = (keys, values, mask | same_image)
      encoded = attend_to_parts(q, parts)
    out = self.attn_vec_einsum('BTNH,NHD->BTD', encoded, streamed=True)
    return out, new_cache, view

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      mask: jax.Array,
      shared_kv: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Attend from `x` [B, T, D] to its own keys or to `shared_kv`.

    Args:
      x: Normalised block input [B, T, D].
      positions: Token positions [B, T].
      mask: [B, T, S] visibility before the sliding window is applied; local
        layers add the window here.
      shared_kv: Keys and values [B, S, K, H] of the layer this one shares
        with (KV-shared layers), or None to compute its own.

    Returns:
      The attention output [B, T, D] and the (keys, values) it used.
    """
    q = self.queries(x, positions)

    if shared_kv is None:
      k, v = self.keys_values(x, positions)
    else:
      k, v = shared_kv
      if self.is_initializing():
        # KV-shared layers never use their own projection, but the released
        # checkpoints hold it, so it must exist in the parameter tree.
        self.keys_values(x, positions)

    if not self.is_global:
      # Keys of a shared source sit at the same positions as the queries.
      mask = mask & sliding_window_mask(
          positions, positions, self.config.sliding_window
      )

    encoded = constrain(
        attend(q, k, v, mask), ('batch', 'length', 'heads', None)
    )
    out = self.attn_vec_einsum('BTNH,NHD->BTD', encoded)
    return out, (k, v)
