"""Conversion between the three layouts of Gemma 4 parameter trees.

NESTED is the Flax tree the model uses: `{'embedder': ..., 'layer_0': {'attn':
{'q_einsum': {'w': ...}}, ...}, 'final_norm': ...}`.

FLAT maps a slash-joined path to the dict of arrays at its leaf-parent level:
`'transformer/layer_0/attn/q_einsum' -> {'w': ...}`. The decoder sits under
`transformer/` and the vision encoder under `SigLiPFromPatches_0/`. The dense
MLP weights of a decoder layer, bare arrays in NESTED, get a `w` level in FLAT
(`'transformer/layer_0/mlp/linear' -> {'w': ...}`). MoE expert weights already
have one and keep it.

STACKED is FLAT with the decoder layers at the same position of the attention
pattern stacked along a new leading axis. For a pattern of length P, the key
`'transformer/stacked_layers/attention_type_{i}/attn/q_einsum'` maps to
`{'w': [n, ...]}` with layers `i, i + P, i + 2P, ...` along the new axis.

Every function here is pure: the leaves may be arrays, `jax.ShapeDtypeStruct`
or any object with a `shape`. Slicing a stacked leaf uses `leaf[i]`, except for
`jax.ShapeDtypeStruct` leaves, whose leading axis is dropped.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from gemma4_jax.checkpoint.errors import CheckpointError

Tree = dict[str, Any]

TEXT_PREFIX = 'transformer'
VISION_PREFIX = 'SigLiPFromPatches_0'
STACKED_PREFIX = f'{TEXT_PREFIX}/stacked_layers/attention_type_'

# Top-level NESTED keys and `embedder` key prefixes of the multimodal towers.
# These parameters stay float32 whatever the dtype of the text decoder.
VISION_KEYS = ('vision_encoder',)
AUDIO_KEYS = ('audio_encoder',)
VISION_EMBEDDER_PREFIX = 'mm_'
AUDIO_EMBEDDER_PREFIX = 'audio_'

_LAYER_RE = re.compile(r'layer_(\d+)')
_FLAT_LAYER_RE = re.compile(rf'{TEXT_PREFIX}/layer_(\d+)(/.*)?')
_STACKED_RE = re.compile(rf'{re.escape(STACKED_PREFIX)}(\d+)(/.*)?')
_DENSE_MLP_WEIGHTS = ('gating_einsum', 'linear')
_CONFORMER_LAYER_RE = re.compile(r'stacked_layers_\d+')


class Layout(enum.StrEnum):
  """On-disk arrangement of a parameter tree."""

  NESTED = 'nested'
  FLAT = 'flat'
  STACKED = 'stacked'


def flatten_paths(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Map each leaf of a nested dict to its slash-joined path."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      path = f'{prefix}/{key}' if prefix else str(key)
      if isinstance(value, Mapping):
        visit(value, path)
      else:
        flat[path] = value

  visit(tree, '')
  return flat


def split_path(path: str) -> tuple[str, ...]:
  """Split a slash-joined path into the keys of the NESTED tree.

  The audio encoder names its layers `conformer/stacked_layers_{i}`: one
  key that contains a slash, in the model and in the official NESTED
  checkpoints. Those two parts stay one key.
  """
  parts = path.split('/')
  if AUDIO_KEYS[0] not in parts:
    return tuple(parts)
  keys = []
  for part in parts:
    if (
        keys
        and keys[-1] == 'conformer'
        and _CONFORMER_LAYER_RE.fullmatch(part)
        and AUDIO_KEYS[0] in keys
    ):
      keys[-1] = f'conformer/{part}'
    else:
      keys.append(part)
  return tuple(keys)


def unflatten_paths(flat: Mapping[str, Any]) -> Tree:
  """Invert `flatten_paths`: build a nested dict from slash-joined paths."""
  tree: Tree = {}
  for path, leaf in flat.items():
    _set_path(tree, split_path(path), leaf)
  return tree


def _set_path(tree: Tree, path: tuple[str, ...], leaf: Any) -> None:
  node = tree
  for key in path[:-1]:
    node = node.setdefault(key, {})
    if not isinstance(node, dict):
      raise CheckpointError(
          f'parameter key {"/".join(path)!r} nests under a leaf; the tree'
          ' mixes an array and a dict at the same path'
      )
  if path[-1] in node:
    raise CheckpointError(
        f'parameter key {"/".join(path)!r} occurs twice after layout'
        ' conversion; the checkpoint holds conflicting entries'
    )
  node[path[-1]] = leaf


def detect_layout(tree: Mapping[str, Any]) -> Layout:
  """Return the layout of a parameter tree from its top-level keys."""
  keys = list(tree)
  if not keys:
    raise CheckpointError('the parameter tree is empty')

  if any(key.startswith(STACKED_PREFIX) for key in keys):
    return Layout.STACKED
  flat_prefixes = (f'{TEXT_PREFIX}/', f'{VISION_PREFIX}/')
  if all(key.startswith(flat_prefixes) for key in keys):
    return Layout.FLAT
  return Layout.NESTED


def attention_pattern_len(stacked: Mapping[str, Any]) -> int:
  """Infer the attention-pattern length from the keys of a STACKED tree.

  The length is one more than the largest `attention_type_{i}` index. When
  the model has fewer layers than the pattern, the inferred length is the
  layer count, which unstacks to the same layers.
  """
  indices = [
      int(match.group(1))
      for key in stacked
      if (match := _STACKED_RE.fullmatch(key))
  ]
  if not indices:
    raise CheckpointError(
        'the tree has no `transformer/stacked_layers/attention_type_{i}` key,'
        ' so it is not in the STACKED layout'
    )
  return max(indices) + 1


# ----------------------------------------------------------------- NESTED/FLAT


def _is_layer_key(key: str) -> bool:
  return _LAYER_RE.fullmatch(key) is not None


def _is_bare_dense_mlp_weight(path: tuple[str, ...]) -> bool:
  """Return whether a NESTED path is `layer_N/mlp/{gating_einsum,linear}`."""
  return (
      len(path) == 3
      and _is_layer_key(path[0])
      and path[1] == 'mlp'
      and path[2] in _DENSE_MLP_WEIGHTS
  )


def nested_to_flat(params: Mapping[str, Any]) -> Tree:
  """Convert a NESTED tree to the FLAT layout."""
  flat: Tree = {}
  for path_str, leaf in flatten_paths(params).items():
    path = tuple(path_str.split('/'))
    if path[0] in VISION_KEYS:
      prefix, rest = VISION_PREFIX, path[1:]
    else:
      prefix, rest = TEXT_PREFIX, path

    if _is_bare_dense_mlp_weight(rest):
      rest = (*rest, 'w')

    group = '/'.join((prefix, *rest[:-1]))
    flat.setdefault(group, {})[rest[-1]] = leaf
  return flat


def flat_to_nested(flat: Mapping[str, Any]) -> Tree:
  """Convert a FLAT tree to the NESTED layout.

  Inverts `nested_to_flat` for dense and MoE decoders alike: the `w` level
  is dropped from `layer_N/mlp/{gating_einsum,linear}` only in layers without
  a router, where NESTED has bare arrays. MoE layers keep it, as their
  expert weights are `mlp/gating_einsum/w` and `mlp/linear/w` in NESTED too.
  """
  moe_layers = set()
  for group in flat:
    match = _FLAT_LAYER_RE.fullmatch(group)
    if match and match.group(2) == '/mlp/router_logits':
      moe_layers.add(f'layer_{match.group(1)}')

  nested: Tree = {}
  for group, leaves in flat.items():
    prefix, _, rest = group.partition('/')
    if prefix == TEXT_PREFIX:
      base = tuple(rest.split('/')) if rest else ()
    elif prefix == VISION_PREFIX:
      base = (VISION_KEYS[0], *rest.split('/')) if rest else VISION_KEYS
    else:
      raise CheckpointError(
          f'FLAT key {group!r} starts with neither {TEXT_PREFIX!r} nor'
          f' {VISION_PREFIX!r}'
      )
    if not isinstance(leaves, Mapping):
      raise CheckpointError(
          f'FLAT key {group!r} contains a {type(leaves).__name__}; a dict of'
          ' arrays such as {"w": ...} is expected'
      )

    for name, leaf in flatten_paths(leaves).items():
      path = (*base, *name.split('/'))
      if (
          path[-1] == 'w'
          and _is_bare_dense_mlp_weight(path[:-1])
          and path[0] not in moe_layers
      ):
        path = path[:-1]
      _set_path(nested, path, leaf)
  return nested


# ---------------------------------------------------------------- FLAT/STACKED


def _stack(slices: list[Any], names: list[str]) -> Any:
  """Stack leaves along a new leading axis, checking that shapes agree."""
  first_shape = tuple(slices[0].shape)
  for leaf, name in zip(slices[1:], names[1:]):
    if tuple(leaf.shape) != first_shape:
      raise CheckpointError(
          f'the STACKED layout cannot hold `{names[0]}` {first_shape} and'
          f' `{name}` {tuple(leaf.shape)} in one stack: layers at the same'
          ' position of the attention pattern must have equal shapes (E2B-style'
          ' KV-shared layers with a wider MLP do not); save as "flat" or'
          ' "nested" instead'
      )

  if all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in slices):
    return jax.ShapeDtypeStruct((len(slices), *first_shape), slices[0].dtype)
  if any(isinstance(leaf, jax.Array) for leaf in slices):
    return jax.numpy.stack(slices)
  return np.stack(slices)


def flat_to_stacked(flat: Mapping[str, Any], pattern_len: int) -> Tree:
  """Stack the decoder layers of a FLAT tree by attention-pattern position."""
  if pattern_len < 1:
    raise ValueError(f'pattern_len={pattern_len} must be at least 1')

  stacked: Tree = {}
  # (stacked group, leaf name) -> {slice index: (leaf, per-layer key)}
  stacks: dict[tuple[str, str], dict[int, tuple[Any, str]]] = {}
  for group, leaves in flat.items():
    match = _FLAT_LAYER_RE.fullmatch(group)
    if not match:
      stacked[group] = leaves
      continue

    layer = int(match.group(1))
    suffix = match.group(2) or ''
    position, slice_index = layer % pattern_len, layer // pattern_len
    stacked_group = f'{STACKED_PREFIX}{position}{suffix}'
    for name, leaf in leaves.items():
      stacks.setdefault((stacked_group, name), {})[slice_index] = (
          leaf,
          f'layer_{layer}{suffix}/{name}',
      )

  for (group, name), slices in stacks.items():
    count = len(slices)
    if sorted(slices) != list(range(count)):
      raise CheckpointError(
          f'cannot stack {group}/{name}: the decoder layers at this pattern'
          f' position are not contiguous (slices {sorted(slices)})'
      )
    leaves = [slices[i][0] for i in range(count)]
    names = [slices[i][1] for i in range(count)]
    stacked.setdefault(group, {})[name] = _stack(leaves, names)
  return stacked


def _take_slice(leaf: Any, index: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  return leaf[index]


def stacked_to_flat(
    stacked: Mapping[str, Any],
    *,
    take_slice: Callable[[Any, int], Any] = _take_slice,
) -> Tree:
  """Unstack a STACKED tree into per-layer FLAT keys.

  Args:
    stacked: The STACKED tree.
    take_slice: Returns slice `i` of a stacked leaf along its leading axis.
      The default indexes arrays and drops the leading axis of
      `jax.ShapeDtypeStruct` leaves.

  Returns:
    The FLAT tree.
  """
  pattern_len = attention_pattern_len(stacked)
  flat: Tree = {}
  for group, leaves in stacked.items():
    match = _STACKED_RE.fullmatch(group)
    if not match:
      flat[group] = leaves
      continue

    position = int(match.group(1))
    suffix = match.group(2) or ''
    for name, leaf in leaves.items():
      for slice_index in range(leaf.shape[0]):
        layer = slice_index * pattern_len + position
        layer_group = f'{TEXT_PREFIX}/layer_{layer}{suffix}'
        flat.setdefault(layer_group, {})[name] = take_slice(leaf, slice_index)
  return flat


# ----------------------------------------------------------- any layout/NESTED


def to_nested(
    tree: Mapping[str, Any],
    *,
    take_slice: Callable[[Any, int], Any] = _take_slice,
) -> Tree:
  """Convert a tree in any layout to NESTED (see `stacked_to_flat`)."""
  layout = detect_layout(tree)
  if layout == Layout.STACKED:
    return flat_to_nested(stacked_to_flat(tree, take_slice=take_slice))
  if layout == Layout.FLAT:
    return flat_to_nested(tree)
  return dict(tree)


def from_nested(
    params: Mapping[str, Any],
    layout: Layout | str,
    *,
    pattern_len: int | None = None,
) -> Tree:
  """Convert a NESTED tree to `layout`; STACKED needs `pattern_len`."""
  layout = Layout(layout)
  if layout == Layout.NESTED:
    return dict(params)
  flat = nested_to_flat(params)
  if layout == Layout.FLAT:
    return flat
  if pattern_len is None:
    raise ValueError(
        'the STACKED layout needs the attention-pattern length; pass'
        ' pattern_len=len(config.attention_pattern)'
    )
  return flat_to_stacked(flat, pattern_len)


# ------------------------------------------------------------ text/multimodal


def is_multimodal_path(path: str | tuple[str, ...]) -> bool:
  """Return whether a NESTED parameter path belongs to a vision or audio tower."""
  return multimodal_tower(path) is not None


def multimodal_tower(path: str | tuple[str, ...]) -> str | None:
  """Return 'vision' or 'audio' for a multimodal NESTED path, else None."""
  parts = tuple(path.split('/')) if isinstance(path, str) else tuple(path)
  if not parts:
    return None
  if parts[0] in VISION_KEYS:
    return 'vision'
  if parts[0] in AUDIO_KEYS:
    return 'audio'
  if parts[0] == 'embedder' and len(parts) > 1:
    if parts[1].startswith(VISION_EMBEDDER_PREFIX):
      return 'vision'
    if parts[1].startswith(AUDIO_EMBEDDER_PREFIX):
      return 'audio'
  return None


def split_multimodal(params: Mapping[str, Any]) -> tuple[Tree, Tree]:
  """Split a NESTED tree into (text decoder, vision and audio towers).

  The multimodal part contains `vision_encoder`, `audio_encoder` and the
  `embedder/mm_*` and `embedder/audio_*` projections; it is `{}` for a
  text-only tree.
  """
  text: dict[str, Any] = {}
  multimodal: dict[str, Any] = {}
  for path, leaf in flatten_paths(params).items():
    target = multimodal if is_multimodal_path(path) else text
    target[path] = leaf
  return unflatten_paths(text), unflatten_paths(multimodal)


def merge_trees(first: Mapping[str, Any], second: Mapping[str, Any]) -> Tree:
  """Merge two NESTED trees with disjoint leaves (inverse of a split)."""
  merged = flatten_paths(first)
  for path, leaf in flatten_paths(second).items():
    if path in merged:
      raise ValueError(f'parameter {path!r} is in both trees')
    merged[path] = leaf
  return unflatten_paths(merged)
