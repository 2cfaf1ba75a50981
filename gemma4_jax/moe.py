"""Mixture-of-experts feed-forward block of Gemma 4 26B-A4B.

Each token goes to its top-k experts only. Tokens are sorted by expert and
the experts run as grouped (ragged) matmuls, so the cost is that of k expert
MLPs per token, not of all E. With `implementation='all_to_all'` each device
has a share of the experts and tokens travel to them
(`gemma4_jax.parallel.expert`).
"""

from __future__ import annotations

import functools

from flax import linen as nn
import jax
import jax.numpy as jnp

from gemma4_jax import layers
from gemma4_jax.parallel import expert as expert_parallel


class Weight(nn.Module):
  """A bare weight `w`, read by the caller (keeps the released `.../w` names)."""

  shape: tuple[int, ...]
  init_stddev: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param(
        'w', layers.normal_init(self.init_stddev), self.shape, self.dtype
    )


def route(
    router_logits: jax.Array, experts_per_token: int
) -> tuple[jax.Array, jax.Array]:
  """Top-k routing.

  Args:
    router_logits: [M, E] logits of M tokens over E experts.
    experts_per_token: k.

  Returns:
    weights [M, k] (float32, the chosen softmax probabilities renormalised to
    sum to one) and expert ids [M, k].
  """
  logits = router_logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  _, experts = jax.lax.top_k(logits, experts_per_token)
  chosen = jnp.take_along_axis(probs, experts, axis=-1)
  weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
  return weights, experts


def load_balancing_loss(
    router_logits: jax.Array, experts: jax.Array, num_experts: int
) -> jax.Array:
  """Compute the auxiliary loss that pushes a router to use every expert.

  The loss is `E * sum_e f_e * p_e`, where `f_e` is the fraction of the M*k expert
  assignments that went to expert e and `p_e` is the mean router probability
  of e over the M tokens. It is 1 when routing is uniform and grows up to E
  as the assignments and the probabilities concentrate on fewer experts.
  Only `p_e` carries a gradient (the top-k choice is not differentiable).

  NOTE: `MoE` sows this over all the tokens it gets, padding included,
  because the block does not see the input mask.

  Args:
    router_logits: [M, E] router logits.
    experts: [M, k] chosen expert ids.
    num_experts: E.

  Returns:
    A float32 scalar.
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  assigned = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [M, k, E]
  fraction = jnp.mean(jnp.sum(assigned, axis=1), axis=0) / experts.shape[-1]
  mean_prob = jnp.mean(probs, axis=0)
  return num_experts * jnp.sum(jax.lax.stop_gradient(fraction) * mean_prob)


def _tile_size(num_rows: int, num_experts: int) -> int:
  """Rows per tile: about the mean rows per expert, a power of two in [1, 256]."""
  mean_rows = max(1, -(-num_rows // num_experts))
  return min(256, 1 << (mean_rows - 1).bit_length())


def _tiled_expert_mlp(
    sorted_rows: jax.Array,
    sorted_experts: jax.Array,
    group_sizes: jax.Array,
    gating: jax.Array,
    linear: jax.Array,
) -> jax.Array:
  """Grouped MLP over expert-sorted rows, one expert's weights per tile.

  Each expert's rows are padded to whole tiles of `b` rows; a loop over the
  tiles multiplies each tile by the weights of its expert only. Tiles past the
  last expert's rows are skipped, so the work is about `R + E_used * b` rows
  and no weight of an unchosen expert is read. Used where `ragged_dot` has no
  grouped kernel (XLA's CPU backend lowers it to a dense product over all
  experts).

  Args:
    sorted_rows: [R, D] rows grouped by expert, in expert order.
    sorted_experts: [R] expert id of each row (non-decreasing); E marks an
      empty row, which is skipped and gets a zero output.
    group_sizes: [E] rows per expert.
    gating: [E, 2, F, D].
    linear: [E, F, D].

  Returns:
    [R, D] expert outputs in the order of `sorted_rows`.
  """
  num_rows, embed_dim = sorted_rows.shape
  num_experts = gating.shape[0]
  tile = _tile_size(num_rows, num_experts)
  max_tiles = -(-num_rows // tile) + min(num_experts, num_rows)

  # Where each expert's rows start, unpadded and padded to whole tiles.
  tiles_per_expert = -(-group_sizes // tile)  # [E]
  padded_ends = jnp.cumsum(tiles_per_expert) * tile
  padded_starts = padded_ends - tiles_per_expert * tile
  starts = jnp.cumsum(group_sizes) - group_sizes
  row_experts = jnp.minimum(sorted_experts, num_experts - 1)
  rank_in_group = jnp.arange(num_rows) - starts[row_experts]
  padded_index = padded_starts[row_experts] + rank_in_group  # [R]
  # Empty rows point past the padded rows: not written, read back as zero.
  padded_index = jnp.where(
      sorted_experts < num_experts, padded_index, max_tiles * tile
  )

  padded = jnp.zeros((max_tiles * tile, embed_dim), sorted_rows.dtype)
  padded = padded.at[padded_index].set(sorted_rows, mode='drop')
  padded = padded.reshape(max_tiles, tile, embed_dim)

  tile_starts = jnp.arange(max_tiles) * tile
  tile_experts = jnp.searchsorted(padded_ends, tile_starts, side='right')
  tile_used = tile_starts < padded_ends[-1]
  tile_experts = jnp.minimum(tile_experts, num_experts - 1)

  def run_tile(args):
    rows, expert, used = args  # [b, D], [], []

    def compute(rows):
      gates = jnp.einsum('bD,CFD->bCF', rows, gating[expert])
      hidden = layers.gelu_tanh(gates[:, 0]) * gates[:, 1]
      return jnp.einsum('bF,FD->bD', hidden, linear[expert])

    return jax.lax.cond(used, compute, jnp.zeros_like, rows)

  out = jax.lax.map(run_tile, (padded, tile_experts, tile_used))
  out = out.reshape(max_tiles * tile, embed_dim)
  return out.at[padded_index].get(mode='fill', fill_value=0)


def _ragged_expert_mlp(
    sorted_rows: jax.Array,
    group_sizes: jax.Array,
    gating: jax.Array,
    linear: jax.Array,
) -> jax.Array:
  """Grouped MLP over expert-sorted rows with `ragged_dot` (GPU/TPU kernels)."""
  # Contract D of the rows with D of each expert's [2, F, D] gating weight.
  gate_dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((1,), (3,)), ((), ())),
      lhs_ragged_dimensions=(0,),
      rhs_group_dimensions=(0,),
  )
  gates = jax.lax.ragged_dot_general(
      sorted_rows, gating, group_sizes, gate_dims
  )  # [R, 2, F]
  hidden = layers.gelu_tanh(gates[:, 0]) * gates[:, 1]
  return jax.lax.ragged_dot(hidden, linear, group_sizes)  # [R, D]


def grouped_expert_mlp(
    tokens: jax.Array,
    experts: jax.Array,
    gating: jax.Array,
    linear: jax.Array,
    *,
    implementation: str = 'auto',
) -> jax.Array:
  """Run every token through each of its chosen experts' gated MLPs.

  Args:
    tokens: [M, D].
    experts: [M, k] expert ids chosen for each token. An id equal to E
      marks an empty assignment: it is skipped and its output is zero.
    gating: [E, 2, F, D] gate and up projections of every expert.
    linear: [E, F, D] down projections.
    implementation: 'ragged' (`jax.lax.ragged_dot`), 'tiled' (a loop over
      expert tiles) or 'auto': tiled on CPU, ragged elsewhere.

  Returns:
    [M, k, D]: output of expert `experts[m, j]` on token m.
  """
  if implementation == 'auto':
    implementation = 'tiled' if jax.default_backend() == 'cpu' else 'ragged'
  if implementation not in ('ragged', 'tiled'):
    raise ValueError(
        f"unknown MoE implementation {implementation!r}; use 'auto',"
        " 'ragged' or 'tiled' (the MoE block also accepts 'all_to_all')"
    )

  num_tokens, k = experts.shape
  num_experts = gating.shape[0]
  flat_experts = experts.reshape(-1)  # [M * k], token-major
  order = jnp.argsort(flat_experts, stable=True)
  sorted_rows = tokens[order // k]  # [M * k, D], grouped by expert
  # Counted with mode='drop' so that empty assignments (id E) count nowhere.
  group_sizes = jnp.zeros((num_experts,), jnp.int32)
  group_sizes = group_sizes.at[flat_experts].add(1, mode='drop')

  if implementation == 'ragged':
    sorted_out = _ragged_expert_mlp(sorted_rows, group_sizes, gating, linear)
    # Empty assignments sort last, past every group.
    is_assigned = flat_experts[order] < num_experts
    sorted_out = jnp.where(is_assigned[:, None], sorted_out, 0)
  else:
    sorted_out = _tiled_expert_mlp(
        sorted_rows, flat_experts[order], group_sizes, gating, linear
    )

  out = jnp.zeros_like(sorted_out).at[order].set(sorted_out)
  return out.reshape(num_tokens, k, -1)


class MoE(nn.Module):
  """Routed experts: router, grouped expert MLPs and the weighted combine.

  Parameters (released names): `router_logits/w` [D, E], `router_scale` [D],
  `gating_einsum/w` [E, 2, F, D], `linear/w` [E, F, D], `per_expert_scale` [E].

  Attributes:
    implementation: 'auto', 'ragged' or 'tiled' (see `grouped_expert_mlp`),
      or 'all_to_all': expert parallelism over the expert axes of the mesh
      set by `jax.set_mesh` (see `gemma4_jax.parallel.expert`), with the
      'auto' grouped MLP on each device. Without an expert axis of size > 1,
      'all_to_all' runs the 'auto' path on one device.
    capacity_factor: Used by 'all_to_all' only. None exchanges buffers that
      never overflow. A number c sizes them at c times their mean load, and
      the assignments that do not fit are dropped. The block sows the count
      of dropped assignments as `intermediates/dropped_assignments` and logs
      a WARNING in every step that drops any.
  """

  embed_dim: int
  hidden_dim: int
  num_experts: int
  experts_per_token: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = 'auto'
  capacity_factor: float | None = None

  def setup(self):
    d, f, e = self.embed_dim, self.hidden_dim, self.num_experts
    self.router_logits = layers.Einsum(
        (d, e), init_stddev=d**-0.5, dtype=self.dtype
    )
    self.router_scale = self.param(
        'router_scale', nn.initializers.ones, (d,), self.dtype
    )
    self.gating_einsum = Weight((e, 2, f, d), d**-0.5, self.dtype)
    self.linear = Weight((e, f, d), f**-0.5, self.dtype)
    self.per_expert_scale = self.param(
        'per_expert_scale', nn.initializers.ones, (e,), self.dtype
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Apply the experts to `x` [..., D] (the normalised block input)."""
    lead_shape = x.shape[:-1]
    tokens = x.reshape(-1, self.embed_dim)  # [M, D]
    k = self.experts_per_token

    router_in = layers.rms_norm(tokens)
    router_in = router_in * jax.lax.rsqrt(
        jnp.asarray(self.embed_dim, router_in.dtype)
    )
    router_in = router_in * self.router_scale.astype(router_in.dtype)
    router_logits = self.router_logits('MD,DE->ME', router_in)

    if self.implementation == 'all_to_all':
      # Each device routes its own tokens inside the exchange.
      combined, experts, dropped = expert_parallel.expert_parallel_mlp(
          tokens,
          router_logits,
          self.gating_einsum(),
          self.linear(),
          self.per_expert_scale,
          router=functools.partial(route, experts_per_token=k),
          experts_per_token=k,
          expert_mlp=grouped_expert_mlp,
          capacity_factor=self.capacity_factor,
      )  # [M, D] float32, [M, k]
      self.sow(
          'intermediates',
          'load_balancing_loss',
          load_balancing_loss(router_logits, experts, self.num_experts),
      )
      self.sow('intermediates', 'dropped_assignments', dropped)
      return combined.astype(x.dtype).reshape(*lead_shape, self.embed_dim)

    weights, experts = route(router_logits, k)  # [M, k]
    self.sow(
        'intermediates',
        'load_balancing_loss',
        load_balancing_loss(router_logits, experts, self.num_experts),
    )

    out = grouped_expert_mlp(
        tokens,
        experts,
        self.gating_einsum(),
        self.linear(),
        implementation=self.implementation,
    )  # [M, k, D]
    out = out * self.per_expert_scale.astype(out.dtype)[experts][..., None]

    combined = jnp.einsum(
        'MKD,MK->MD', out.astype(jnp.float32), weights
    ).astype(x.dtype)
    return combined.reshape(*lead_shape, self.embed_dim)
