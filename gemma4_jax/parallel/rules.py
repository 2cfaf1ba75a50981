"""Logical axis names of every parameter, and the rules that map them to mesh axes.

Model code names no mesh axis. Each parameter's dimensions get logical
names here, from its path in the released parameter tree (`q_einsum/w` is
[heads, embed, head_dim]), and one rules table maps logical names to mesh
axes. A dimension whose size the mesh axes do not divide stays replicated
(for example 4 global KV heads on `tensor=8`), so every rule table works on
every mesh.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import contextvars
import math
import re
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Logical name -> mesh axes, in order. `batch` splits over both data and
# FSDP devices: FSDP shards parameters and data alike.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ('batch', ('data', 'fsdp')),
    ('vocab', ('tensor',)),
    ('embed', ('fsdp',)),
    ('heads', ('tensor',)),
    ('kv_heads', ('tensor',)),
    ('mlp', ('tensor',)),
    ('experts', ('expert',)),
    ('expert_mlp', ('tensor',)),
    ('head_dim', ()),
    ('length', ()),
    ('layers', ()),
    # The per-layer embedding table [vocab, layers, ple] is the largest
    # array of E2B and E4B; its `ple` axis splits over FSDP devices.
    ('ple', ('fsdp',)),
    ('norm', ()),
)

# Parameter path patterns (on '/'-joined paths of the text tree, layer
# numbers included) -> logical names of the dimensions. First match wins.
# The MoE experts' weights have an `experts` axis in front of the dense
# layout; `mlp2` is the MoE layers' always-on dense branch.
_PARAMETER_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r'embedder/input_embedding$', ('vocab', 'embed')),
    (r'embedder/per_layer_embeddings$', ('vocab', 'layers', 'ple')),
    (r'embedder/per_layer_model_projection/w$', ('embed', 'layers', 'ple')),
    (r'/attn/q_einsum/w$', ('heads', 'embed', 'head_dim')),
    (r'/attn/kv_einsum/w$', (None, 'kv_heads', 'embed', 'head_dim')),
    (r'/attn/k_einsum/w$', ('kv_heads', 'embed', 'head_dim')),
    (r'/attn/attn_vec_einsum/w$', ('heads', 'head_dim', 'embed')),
    (r'/mlp2?/gating_einsum$', (None, 'mlp', 'embed')),
    (r'/mlp2?/linear$', ('mlp', 'embed')),
    (r'/mlp/gating_einsum/w$', ('experts', None, 'expert_mlp', 'embed')),
    (r'/mlp/linear/w$', ('experts', 'expert_mlp', 'embed')),
    (r'/mlp/per_expert_scale$', ('experts',)),
    (r'/mlp/router_logits/w$', ('embed', None)),
    (r'/per_layer_input_gate/w$', ('embed', 'ple')),
    (r'/per_layer_projection/w$', ('ple', 'embed')),
    (r'(^|/)[^/]*norm/scale$', ('norm',)),
    (r'/mlp/router_scale$', ('norm',)),
    (r'/skip_scale$', (None,)),
    # LoRA adapters: `a` [..., rank] and `b` [rank, ...] of a projection;
    # small, so replicated.
    (r'/lora_[ab]$', None),
)


def _path_name(path) -> str:
  return '/'.join(str(getattr(entry, 'key', entry)) for entry in path)


def parameter_axes(path: str, ndim: int) -> tuple[str | None, ...]:
  """Return the logical axis names of the parameter at `path` with `ndim` dims.

  Raises:
    KeyError: No rule names the dimensions of this parameter.
  """
  for pattern, axes in _PARAMETER_AXES:
    if re.search(pattern, path):
      if axes is None:
        return (None,) * ndim
      if len(axes) != ndim:
        raise KeyError(
            f'parameter {path} has {ndim} dimensions but its logical axes'
            f' {axes} name {len(axes)}; is it from another model version?'
        )
      return axes
  if path.startswith('vision_encoder/') or '/mm_' in path or (
      path.startswith('audio')):
    return (None,) * ndim  # The towers are small next to the decoder.
  raise KeyError(
      f'no logical axes for parameter {path} ({ndim} dimensions); add a'
      ' pattern for it to gemma4_jax.parallel.rules._PARAMETER_AXES'
  )


def logical_axes(params: Any) -> Any:
  """Return the tree of logical axis names, one tuple per leaf of `params`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: parameter_axes(_path_name(path), len(x.shape)), params
  )


def spec_for(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dimensions are named `axes`.

  Each dimension takes the mesh axes its rule lists, skipping axes of size
  1, axes an earlier dimension already took, and axes whose combined size
  does not divide the dimension (it then keeps the ones that do, in order).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for size, name in zip(shape, axes):
    if name is not None and name not in table:
      raise KeyError(
          f'logical axis {name!r} has no rule; rules cover {sorted(table)}'
      )
    chosen = []
    for mesh_axis in table.get(name, ()) if name is not None else ():
      if mesh_axis not in mesh.shape:
        raise KeyError(
            f'rule for {name!r} names mesh axis {mesh_axis!r}, which the'
            f' mesh {dict(mesh.shape)} does not have'
        )
      width = mesh.shape[mesh_axis]
      if width == 1 or mesh_axis in used:
        continue
      if size % (math.prod(mesh.shape[a] for a in chosen) * width):
        continue
      chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else
                (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def parameter_specs(
    params: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> Any:
  """Return the PartitionSpec of every parameter (arrays or shape structs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: spec_for(
          x.shape, parameter_axes(_path_name(path), len(x.shape)), mesh, rules
      ),
      params,
  )


def parameter_shardings(
    params: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> Any:
  """Return the NamedSharding of every parameter of `params` on `mesh`."""
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, spec),
      parameter_specs(params, mesh, rules),
      is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def activation_sharding(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> NamedSharding:
  """NamedSharding of an activation or batch array with logical `axes`."""
  return NamedSharding(mesh, spec_for(shape, axes, mesh, rules))


# The mesh and rules that `constrain` applies, set by `activation_rules`.
_ACTIVE_RULES: contextvars.ContextVar[
    tuple[jax.sharding.Mesh, tuple[tuple[str, tuple[str, ...]], ...]] | None
] = contextvars.ContextVar('gemma4_jax_activation_rules', default=None)


@contextlib.contextmanager
def activation_rules(
    mesh: jax.sharding.Mesh | None,
    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> Iterator[None]:
  """Make `constrain` pin activations to `rules` on `mesh` while active.

  Enter it around the tracing of a step (the first call of a jitted
  function): the constraints are recorded in the traced program. With
  `mesh` None, `constrain` does nothing (single-device runs).
  """
  value = None
  if mesh is not None:
    value = (mesh, tuple((name, tuple(axes)) for name, axes in rules))
  token = _ACTIVE_RULES.set(value)
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pin activation `x`, whose dimensions are named `axes`, to its sharding.

  The model calls this on the residual stream, attention heads, MLP units and
  logits with logical names only. Outside `activation_rules` it returns `x`
  unchanged. Dimensions that the rule's mesh axes do not divide stay
  replicated, as for parameters.
  """
  active = _ACTIVE_RULES.get()
  if active is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(
        f'constrain got {len(axes)} axis names {tuple(axes)} for an array of'
        f' shape {x.shape}'
    )
  mesh, rules = active
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec_for(x.shape, axes, mesh, rules))
  )


def rules_from_mapping(
    overrides: Mapping[str, Sequence[str] | str | None],
    base: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES,
) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Return `base` with the rules of `overrides` replaced or added.

  A value may be a mesh axis, a sequence of them, or None (replicate).
  """
  table = {name: tuple(axes) for name, axes in base}
  for name, axes in overrides.items():
    if axes is None:
      table[name] = ()
    elif isinstance(axes, str):
      table[name] = (axes,)
    else:
      table[name] = tuple(axes)
  return tuple(table.items())
