"""Expert parallelism for the MoE block: tokens travel to their experts.

Each device on the mesh's expert axes has E / n of the experts (the
`experts` rule of the rules table names those axes). Inside `jax.shard_map`
every device routes its own share of the tokens. It sends each (token,
expert) assignment with `jax.lax.all_to_all` to the device that has that
expert. That device runs its local experts on the rows it received and
sends the outputs back, where they are combined with the router weights.
Only token rows, their expert ids and the outputs cross devices: no device
gathers the weights of experts that it does not have.

How to turn it on: build the model with
`Transformer(moe_implementation='all_to_all')` and trace it under
`with jax.set_mesh(mesh):` on a mesh with an `expert` axis of size > 1,
or call `expert_parallel_mlp` with `mesh=`. Without such an axis the
experts run on the single-device path.

NOTE: `training.step.make_train_step(mesh=...)` places its inputs on the
mesh but does not set it, so call the step under `jax.set_mesh(mesh)` too.

Capacity: every (source, destination) pair of devices exchanges a buffer
of a fixed number of rows per step (`exchange_capacity`). By default that is
the largest number of assignments that one device can send to another for
the given shapes, so no assignment is ever dropped. The price is traffic:
on n devices the buffers carry up to n times the routed rows. A
`capacity_factor` makes the buffers smaller. Every token's first choice
then takes a slot before any token's second choice, and so on. An
assignment that does not fit is dropped: its expert's output is left out
of its token's weighted sum, and the router weights are not renormalised.
Dropped assignments are never silent. `expert_parallel_mlp` returns their
count, `moe.MoE` sows it as `intermediates/dropped_assignments`, and a
WARNING is logged in every step that drops any.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gemma4_jax.parallel import rules as rules_lib

_logger = logging.getLogger(__name__)

Rules = Sequence[tuple[str, Sequence[str]]]

# expert_mlp(rows [R, D], expert ids [R, 1], gating [E', 2, F, D],
# linear [E', F, D]) -> [R, 1, D]. An id equal to E' marks an empty row,
# whose output must be zero. `moe.grouped_expert_mlp` has this contract.
ExpertMlp = Callable[
    [jax.Array, jax.Array, jax.Array, jax.Array], jax.Array
]
# router(logits [m, E]) -> (weights [m, k] float32, expert ids [m, k]), for
# example `moe.route` with `experts_per_token` bound.
Router = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _present_axes(
    mesh, logical_name: str, rules: Rules
) -> tuple[str, ...]:
  """Mesh axes of size > 1 that the rule of `logical_name` lists."""
  if mesh is None:
    return ()
  axes = dict(rules).get(logical_name, ())
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def expert_axes(mesh, rules: Rules = rules_lib.DEFAULT_RULES) -> tuple[str, ...]:
  """Mesh axes that split the experts: the `experts` rule's axes of size > 1."""
  return _present_axes(mesh, 'experts', rules)


def token_axes(mesh, rules: Rules = rules_lib.DEFAULT_RULES) -> tuple[str, ...]:
  """Mesh axes that split the tokens of the block: batch axes, then expert axes."""
  batch = _present_axes(mesh, 'batch', rules)
  experts = expert_axes(mesh, rules)
  return batch + tuple(a for a in experts if a not in batch)


def exchange_capacity(
    local_tokens: int,
    experts_per_token: int,
    num_experts: int,
    num_shards: int,
    capacity_factor: float | None = None,
) -> int:
  """Rows of the buffer that one device sends to each other device per step.

  Args:
    local_tokens: Tokens per device (m).
    experts_per_token: k.
    num_experts: E, all experts of the block.
    num_shards: n, devices the experts are split over.
    capacity_factor: None for the capacity that never overflows: a token's
      k experts are distinct, so it sends at most min(k, E / n) assignments
      to one device, m * min(k, E / n) in all. A number c gives
      ceil(c * m * k / n), the mean load of a buffer times c, at most the
      never-overflowing capacity; it drops assignments beyond that.

  Returns:
    The capacity in rows, at least 1.
  """
  never_overflows = local_tokens * min(
      experts_per_token, num_experts // num_shards
  )
  if capacity_factor is None:
    return max(1, never_overflows)
  if not capacity_factor > 0:
    raise ValueError(
        f'capacity_factor={capacity_factor} must be positive; pass None for'
        ' buffers that never overflow'
    )
  mean_load = local_tokens * experts_per_token / num_shards
  return max(1, min(never_overflows, math.ceil(capacity_factor * mean_load)))


_single_device_logged = False


def _log_single_device_once() -> None:
  # Logged once per process: a mesh passed to `jit` alone does not count,
  # so a caller who forgot `jax.set_mesh` learns why nothing is exchanged.
  global _single_device_logged
  if not _single_device_logged:
    _single_device_logged = True
    _logger.info(
        "MoE 'all_to_all' runs without expert parallelism because the mesh"
        ' (set with jax.set_mesh or passed as mesh=) has no expert axis of'
        ' size > 1, or there is no mesh'
    )


def _log_dropped(dropped, capacity: int) -> None:
  if dropped > 0:
    _logger.warning(
        'MoE all-to-all dropped %d expert assignments in this step (buffer'
        ' capacity %d rows per device pair); raise capacity_factor or pass'
        ' None to drop none',
        int(dropped),
        capacity,
    )


def _exchange_and_compute(
    tokens: jax.Array,
    router_logits: jax.Array,
    is_token: jax.Array,
    gating: jax.Array,
    linear: jax.Array,
    per_expert_scale: jax.Array,
    *,
    exchange_axes: tuple[str, ...],
    reduce_axes: tuple[str, ...],
    num_experts: int,
    capacity: int,
    router: Router,
    expert_mlp: ExpertMlp,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Run one device's share of the block (the body of the `shard_map`).

  Args:
    tokens: [m, D] this device's tokens.
    router_logits: [m, E] their router logits.
    is_token: [m] False for a padding row, which is sent nowhere.
    gating: [E', 2, F, D] this device's experts (E' = E / n).
    linear: [E', F, D].
    per_expert_scale: [E'].
    exchange_axes: Mesh axes of the all-to-all (the expert axes).
    reduce_axes: Mesh axes over which the dropped count is summed.
    num_experts: E.
    capacity: Rows per (source, destination) buffer.
    router: See `Router`.
    expert_mlp: The grouped expert MLP, see `ExpertMlp`.

  Returns:
    [m, D] float32 weighted sums of the expert outputs, the [m, k] expert
    ids (`num_experts` in padding rows) and the number of dropped
    assignments over all devices (int32 scalar).
  """
  weights, experts = router(router_logits)  # [m, k] each
  experts = jnp.where(is_token[:, None], experts, num_experts)
  num_tokens, k = experts.shape
  embed_dim = tokens.shape[-1]
  num_local = gating.shape[0]
  num_shards = num_experts // num_local
  axis = exchange_axes[0] if len(exchange_axes) == 1 else exchange_axes

  # Assignments in choice-major order, so that every token's first choice
  # takes a buffer slot before any token's second choice does.
  flat_experts = experts.T.reshape(-1)  # [A], A = k * m
  flat_tokens = jnp.tile(jnp.arange(num_tokens), k)  # [A]
  valid = flat_experts < num_experts
  destination = jnp.where(valid, flat_experts // num_local, num_shards)
  local_expert = flat_experts % num_local

  # Rank of each assignment among those for the same destination device.
  to_device = destination[:, None] == jnp.arange(num_shards)  # [A, n]
  running = jnp.cumsum(to_device.astype(jnp.int32), axis=0)  # [A, n]
  rank = jnp.take_along_axis(
      running, jnp.minimum(destination, num_shards - 1)[:, None], axis=1
  )[:, 0] - 1
  kept = valid & (rank < capacity)
  dropped = jnp.sum(valid & ~kept, dtype=jnp.int32)

  # Slot in the flat [n * C] send buffer. Slot n * C is out of range, so an
  # assignment given it is not sent.
  num_slots = num_shards * capacity
  slot = jnp.where(kept, destination * capacity + rank, num_slots)
  send_rows = jnp.zeros((num_slots, embed_dim), tokens.dtype)
  # Kept slots are distinct, so `add` writes each row once; its transpose
  # is a plain gather, cheaper than that of `set`.
  send_rows = send_rows.at[slot].add(tokens[flat_tokens], mode='drop')
  send_ids = jnp.full((num_slots,), num_local, jnp.int32)
  send_ids = send_ids.at[slot].set(local_expert.astype(jnp.int32), mode='drop')

  # Chunk d of each buffer goes to device d; what arrives is in source order.
  received_rows = jax.lax.all_to_all(send_rows, axis, 0, 0, tiled=True)
  received_ids = jax.lax.all_to_all(send_ids, axis, 0, 0, tiled=True)

  out_rows = expert_mlp(
      received_rows, received_ids[:, None], gating, linear
  )[:, 0]  # [n * C, D], zero in empty rows
  scale = per_expert_scale[jnp.minimum(received_ids, num_local - 1)]
  out_rows = out_rows * scale.astype(out_rows.dtype)[:, None]

  returned = jax.lax.all_to_all(out_rows, axis, 0, 0, tiled=True)
  out = returned.at[slot].get(mode='fill', fill_value=0)  # [A, D]
  out = out.reshape(k, num_tokens, embed_dim).transpose(1, 0, 2)  # [m, k, D]

  combined = jnp.einsum('MKD,MK->MD', out.astype(jnp.float32), weights)
  return combined, experts, jax.lax.psum(dropped, reduce_axes)


def expert_parallel_mlp(
    tokens: jax.Array,
    router_logits: jax.Array,
    gating: jax.Array,
    linear: jax.Array,
    per_expert_scale: jax.Array,
    *,
    router: Router,
    experts_per_token: int,
    expert_mlp: ExpertMlp,
    mesh: jax.sharding.Mesh | None = None,
    capacity_factor: float | None = None,
    rules: Rules = rules_lib.DEFAULT_RULES,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Route tokens and apply their experts, with tokens exchanged by all-to-all.

  Tokens are split over the batch and expert mesh axes (`token_axes`),
  padded with rows routed nowhere if the device count does not divide them.
  Each device routes its own tokens. Inside each group of devices along the
  expert axes, assignments go to the device that has their expert, and the
  outputs come back. Devices on other mesh axes (`tensor`, for example)
  repeat the same work. Expert weights enter split over the expert axes
  only: an FSDP or tensor split of a device's own experts is gathered there.

  Args:
    tokens: [M, D] block inputs.
    router_logits: [M, E] router logits of the tokens.
    gating: [E, 2, F, D] gate and up projections of every expert.
    linear: [E, F, D] down projections.
    per_expert_scale: [E] output scale of each expert.
    router: Chooses the experts of each token, see `Router`.
    experts_per_token: k, the number of experts `router` chooses.
    expert_mlp: The grouped expert MLP that runs each device's experts.
    mesh: The mesh; None uses the one set by `jax.set_mesh`.
    capacity_factor: See `exchange_capacity`; None never drops.
    rules: Logical-axis rules that name the batch and expert mesh axes.

  Returns:
    [M, D] float32 sum over each token's experts of router weight times
    scaled expert output, the [M, k] chosen expert ids and the int32 count
    of dropped assignments.

  Raises:
    ValueError: The expert axes do not divide the number of experts.
  """
  num_tokens = tokens.shape[0]
  num_experts = gating.shape[0]
  mesh_shape = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  exchange_axes = expert_axes(mesh_shape, rules)

  if not exchange_axes:
    _log_single_device_once()
    weights, experts = router(router_logits)
    out = expert_mlp(tokens, experts, gating, linear)  # [M, k, D]
    out = out * per_expert_scale.astype(out.dtype)[experts][..., None]
    combined = jnp.einsum('MKD,MK->MD', out.astype(jnp.float32), weights)
    return combined, experts, jnp.zeros((), jnp.int32)

  num_shards = math.prod(mesh_shape.shape[a] for a in exchange_axes)
  if num_experts % num_shards:
    raise ValueError(
        f'{num_experts} experts do not split evenly over the expert mesh axes'
        f' {exchange_axes} ({num_shards} devices); pick an expert axis size'
        f' that divides {num_experts}, or another moe_implementation'
    )
  split_axes = token_axes(mesh_shape, rules)
  token_shards = math.prod(mesh_shape.shape[a] for a in split_axes)

  padding = -num_tokens % token_shards
  is_token = jnp.arange(num_tokens + padding) < num_tokens
  if padding:
    tokens = jnp.pad(tokens, ((0, padding), (0, 0)))
    router_logits = jnp.pad(router_logits, ((0, padding), (0, 0)))
  local_tokens = (num_tokens + padding) // token_shards
  capacity = exchange_capacity(
      local_tokens, experts_per_token, num_experts, num_shards,
      capacity_factor,
  )

  split_tokens = PartitionSpec(split_axes)
  split_experts = PartitionSpec(exchange_axes)
  body = functools.partial(
      _exchange_and_compute,
      exchange_axes=exchange_axes,
      reduce_axes=split_axes,
      num_experts=num_experts,
      capacity=capacity,
      router=router,
      expert_mlp=expert_mlp,
  )
  combined, experts, dropped = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(split_tokens,) * 3 + (split_experts,) * 3,
      out_specs=(split_tokens, split_tokens, PartitionSpec()),
  )(tokens, router_logits, is_token, gating, linear, per_expert_scale)

  if capacity_factor is not None:
    jax.debug.callback(functools.partial(_log_dropped, capacity=capacity),
                       dropped)
  return combined[:num_tokens], experts[:num_tokens], dropped
