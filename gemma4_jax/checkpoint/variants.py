"""Detection of the Gemma 4 model in a checkpoint from parameter shapes alone.

A checkpoint matches a preset when its text parameters have exactly the keys
and shapes of `expected_param_shapes(preset)`. Otherwise the shape-determined
config fields (widths, layer count, heads, experts, ...) are read from the
tree. Settings that leave no trace in shapes (sliding window, RoPE, top-k)
must come from the caller.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

from gemma4_jax import config as config_lib
from gemma4_jax.checkpoint import files, layouts
from gemma4_jax.checkpoint.errors import (
    CheckpointMismatchError,
    UnknownVariantError,
    UnsupportedCheckpointError,
)
from gemma4_jax.checkpoint.shapes import (
    expected_audio_shapes,
    expected_param_shapes,
    expected_vision_shapes,
)
from gemma4_jax.config import GLOBAL, LOCAL, AttentionKind, Gemma4Config

Shape = tuple[int, ...]
ShapeMap = dict[str, Shape]  # slash-joined NESTED path -> shape

# Most mismatch lines an error message lists before summarising the rest.
_MAX_LISTED = 12

# Config fields that no parameter shape depends on.
_SHAPELESS_FIELDS = (
    'sliding_window',
    'local_rope_base',
    'global_rope_base',
    'local_rope_proportion',
    'global_rope_proportion',
    'final_logit_softcap',
    'vision_bidirectional',
)

_LAYER_KEY_RE = re.compile(r'layer_(\d+)')


@dataclasses.dataclass(frozen=True)
class ShapeComparison:
  """Differences between a checkpoint's shapes and a config's.

  Attributes:
    missing: Keys the config expects that the checkpoint lacks.
    unexpected: Keys the checkpoint has that the config does not expect.
    wrong_shapes: `(key, found, expected)` for keys present in both.
  """

  missing: tuple[str, ...]
  unexpected: tuple[str, ...]
  wrong_shapes: tuple[tuple[str, Shape, Shape], ...]

  @property
  def matches(self) -> bool:
    return not (self.missing or self.unexpected or self.wrong_shapes)

  @property
  def num_differences(self) -> int:
    return len(self.missing) + len(self.unexpected) + len(self.wrong_shapes)

  def describe(self, expected_name: str) -> list[str]:
    """Format one line per difference, at most `_MAX_LISTED` of them."""
    lines = [
        f'`{key}` has shape {found} but {expected_name} expects {expected}'
        for key, found, expected in self.wrong_shapes
    ]
    lines += [f'`{key}` is missing' for key in self.missing]
    lines += [
        f'`{key}` is not a parameter of {expected_name}'
        for key in self.unexpected
    ]
    if len(lines) > _MAX_LISTED:
      hidden = len(lines) - _MAX_LISTED
      lines = lines[:_MAX_LISTED] + [f'... and {hidden} more']
    return lines


def shape_map(tree: Mapping[str, Any]) -> ShapeMap:
  """Flatten a NESTED tree of arrays, ShapeDtypeStructs or shapes."""
  shapes = {}
  for path, leaf in layouts.flatten_paths(tree).items():
    shapes[path] = tuple(leaf) if isinstance(leaf, tuple) else tuple(leaf.shape)
  return shapes


def compare_shapes(found: ShapeMap, expected: ShapeMap) -> ShapeComparison:
  """List the keys and shapes in which `found` differs from `expected`."""
  missing = tuple(key for key in expected if key not in found)
  unexpected = tuple(key for key in found if key not in expected)
  wrong = tuple(
      (key, found[key], expected[key])
      for key in expected
      if key in found and found[key] != expected[key]
  )
  return ShapeComparison(missing, unexpected, wrong)


def check_is_gemma4(shapes: ShapeMap) -> None:
  """Raise `UnsupportedCheckpointError` unless `shapes` is a Gemma 4 decoder.

  Gemma 1-3 decoders have no per-layer `skip_scale`, which every Gemma 4
  layer has, and Gemma 3 names its QK norms `attn/_query_norm`.
  """
  if 'embedder/input_embedding' not in shapes:
    listed = ', '.join(sorted({key.split('/')[0] for key in shapes})[:10])
    raise UnsupportedCheckpointError(
        'the checkpoint has no `embedder/input_embedding`, so it is not a'
        f' Gemma language model (its top-level keys: {listed})'
    )

  layer_keys = {
      key.split('/')[0] for key in shapes if _LAYER_KEY_RE.match(key)
  }
  has_skip_scale = any(
      f'{layer}/skip_scale' in shapes for layer in layer_keys
  )
  old_norm_names = any(
      key.endswith(('attn/_query_norm/scale', 'attn/_key_norm/scale'))
      for key in shapes
  )
  evidence = []
  if layer_keys and not has_skip_scale:
    evidence.append('its layers have no `skip_scale`')
  if old_norm_names:
    evidence.append('its QK norms are named `attn/_query_norm`')
  if evidence:
    raise UnsupportedCheckpointError(
        'the checkpoint looks like a Gemma 3 (or earlier) checkpoint: '
        + ' and '.join(evidence)
        + '. gemma4_jax loads Gemma 4 checkpoints only; use the `gemma`'
        ' package for older models'
    )


def text_shapes(tree: Mapping[str, Any]) -> ShapeMap:
  """Return the shapes of the text-decoder parameters of a tree in any layout."""
  nested = layouts.to_nested(tree)
  text, _ = layouts.split_multimodal(nested)
  return shape_map(text)


def _load_text_shapes(path_or_tree) -> ShapeMap:
  if isinstance(path_or_tree, Mapping):
    return text_shapes(path_or_tree)
  checkpoint = files.resolve_checkpoint(path_or_tree)
  return text_shapes(files.read_abstract_tree(checkpoint.orbax_dir))


def match_preset(shapes: ShapeMap) -> Gemma4Config | None:
  """Return the preset whose shapes equal `shapes`, else None."""
  for preset in config_lib.PRESETS.values():
    if compare_shapes(shapes, shape_map(expected_param_shapes(preset))).matches:
      return preset
  return None


def _key_templates(shapes: ShapeMap) -> set[str]:
  """Return the keys with layer numbers removed ('layer_N/attn/...')."""
  return {_LAYER_KEY_RE.sub('layer_N', key, count=1) for key in shapes}


def closest_preset(shapes: ShapeMap) -> tuple[Gemma4Config, ShapeComparison]:
  """Find the preset most like `shapes` and return it with the differences.

  Presets are ranked first by how many per-layer key names differ, because
  those names separate the families (PLE, MoE, keys equal values), then by
  the number of differing keys.
  """
  templates = _key_templates(shapes)
  ranked = []
  for preset in config_lib.PRESETS.values():
    expected = shape_map(expected_param_shapes(preset))
    comparison = compare_shapes(shapes, expected)
    family_distance = len(templates ^ _key_templates(expected))
    ranked.append(
        ((family_distance, comparison.num_differences), preset, comparison)
    )
  _, preset, comparison = min(ranked, key=lambda item: item[0])
  return preset, comparison


# ----------------------------------------------------------- custom variants


def shortest_pattern(
    kinds: tuple[AttentionKind, ...],
) -> tuple[AttentionKind, ...]:
  """Return the shortest pattern whose repetition gives `kinds`."""
  for length in range(1, len(kinds) + 1):
    pattern = kinds[:length]
    if config_lib.layer_kinds(pattern, len(kinds)) == kinds:
      return pattern
  return kinds


def _require(shapes: ShapeMap, key: str) -> Shape:
  if key not in shapes:
    raise UnknownVariantError(
        f'cannot read the model dimensions: `{key}` is missing'
    )
  return shapes[key]


def _single(values: dict[int, Any], quantity: str) -> Any:
  distinct = sorted(set(values.values()))
  if len(distinct) != 1:
    raise UnknownVariantError(
        f'cannot read the model dimensions: layers disagree on {quantity}'
        f' ({distinct})'
    )
  return distinct[0]


def infer_layer_kinds(shapes: ShapeMap) -> tuple[AttentionKind, ...] | None:
  """Return the attention kind of every layer, or None if shapes hide it.

  A layer with `attn/k_einsum` (keys equal values) is global. Otherwise, when
  the layers have two head widths, the wider ones are global, as in every
  Gemma 4 release (256 local, 512 global). With one head width and no
  `k_einsum` the kinds cannot be read, and None is returned.
  """
  layers = _layer_indices(shapes)
  head_dims = {
      i: _require(shapes, f'layer_{i}/attn/q_einsum/w')[2] for i in layers
  }
  k_eq_v = {i for i in layers if f'layer_{i}/attn/k_einsum/w' in shapes}
  if k_eq_v:
    return tuple(GLOBAL if i in k_eq_v else LOCAL for i in layers)

  distinct = sorted(set(head_dims.values()))
  if len(distinct) == 1:
    return None
  if len(distinct) > 2:
    raise UnknownVariantError(
        f'cannot read the attention pattern: the layers have {len(distinct)}'
        f' head widths {distinct}; Gemma 4 has one local and one global width'
    )
  return tuple(GLOBAL if head_dims[i] == distinct[1] else LOCAL for i in layers)


def infer_attention_pattern(
    shapes: ShapeMap,
) -> tuple[AttentionKind, ...] | None:
  """Return the repeating attention pattern, or None if shapes hide it."""
  kinds = infer_layer_kinds(shapes)
  return None if kinds is None else shortest_pattern(kinds)


def _layer_indices(shapes: ShapeMap) -> list[int]:
  indices = sorted({
      int(match.group(1))
      for key in shapes
      if (match := _LAYER_KEY_RE.match(key.split('/')[0]))
  })
  if not indices:
    raise UnknownVariantError('cannot read the model dimensions: no layer_N keys')
  if indices != list(range(len(indices))):
    gaps = sorted(set(range(indices[-1] + 1)) - set(indices))
    raise UnknownVariantError(
        f'cannot read the model dimensions: layers {gaps[:10]} are missing'
    )
  return indices


def _attention_fields(shapes: ShapeMap, layers: list[int]) -> dict[str, Any]:
  """Read the heads, head widths, KV heads and attention pattern."""
  fields: dict[str, Any] = {}
  queries = {i: shapes[f'layer_{i}/attn/q_einsum/w'] for i in layers}  # [N,D,H]
  fields['num_heads'] = _single({i: q[0] for i, q in queries.items()}, 'heads')

  kv_heads = {}
  for i in layers:
    if f'layer_{i}/attn/k_einsum/w' in shapes:
      kv_heads[i] = shapes[f'layer_{i}/attn/k_einsum/w'][0]  # [K, D, H]
    else:
      kv_heads[i] = _require(shapes, f'layer_{i}/attn/kv_einsum/w')[1]  # [2,K,D,H]

  kinds = infer_layer_kinds(shapes)
  if kinds is None:
    # One head width and no k_einsum: local and global look alike, so both
    # get the same values and the pattern must come from the caller.
    fields['head_dim'] = fields['global_head_dim'] = _single(
        {i: q[2] for i, q in queries.items()}, 'head width'
    )
    fields['num_kv_heads'] = fields['num_global_kv_heads'] = _single(
        kv_heads, 'KV heads'
    )
    fields['k_eq_v_global'] = False
    return fields

  fields['attention_pattern'] = shortest_pattern(kinds)
  fields['k_eq_v_global'] = any(
      f'layer_{i}/attn/k_einsum/w' in shapes for i in layers
  )
  for kind, head_field, kv_field in (
      (LOCAL, 'head_dim', 'num_kv_heads'),
      (GLOBAL, 'global_head_dim', 'num_global_kv_heads'),
  ):
    of_kind = [i for i in layers if kinds[i] == kind]
    if not of_kind:
      continue
    fields[head_field] = _single(
        {i: queries[i][2] for i in of_kind}, f'{kind.value} head width'
    )
    fields[kv_field] = _single(
        {i: kv_heads[i] for i in of_kind}, f'{kind.value} KV heads'
    )
  return fields


def _mlp_fields(shapes: ShapeMap, layers: list[int]) -> dict[str, Any]:
  """Read the MLP and expert widths, and KV sharing from a wider MLP."""
  if 'layer_0/mlp/router_logits/w' in shapes:
    experts = {i: _require(shapes, f'layer_{i}/mlp/linear/w') for i in layers}
    hidden = {i: _require(shapes, f'layer_{i}/mlp2/linear')[0] for i in layers}
    return {
        'num_experts': _single({i: s[0] for i, s in experts.items()}, 'experts'),
        'expert_hidden_dim': _single(
            {i: s[1] for i, s in experts.items()}, 'expert width'
        ),
        'hidden_dim': _single(hidden, 'MLP width'),
        'kv_shared_hidden_dim': None,
    }

  hidden = [_require(shapes, f'layer_{i}/mlp/linear')[0] for i in layers]
  fields: dict[str, Any] = {
      'num_experts': 0,
      'expert_hidden_dim': 0,
      'hidden_dim': hidden[0],
      'kv_shared_hidden_dim': None,
  }
  if len(set(hidden)) == 1:
    return fields

  # E2B-style: the last (KV-shared) layers have a wider MLP.
  shared_width = hidden[-1]
  num_shared = 0
  while num_shared < len(hidden) and hidden[-1 - num_shared] == shared_width:
    num_shared += 1
  if len(set(hidden[:-num_shared])) != 1:
    raise UnknownVariantError(
        'cannot read the model dimensions: the MLP widths per layer'
        f' {hidden} are neither constant nor one width followed by a wider'
        ' run of KV-shared layers'
    )
  fields['kv_shared_hidden_dim'] = shared_width
  fields['num_kv_shared_layers'] = num_shared
  return fields


def infer_config_fields(shapes: ShapeMap) -> dict[str, Any]:
  """Read the shape-determined `Gemma4Config` fields from text shapes.

  Returns only fields that the shapes determine: `vocab_size`, `embed_dim`,
  `num_layers`, `per_layer_input_dim`, heads and head widths, `k_eq_v_global`,
  MLP and expert widths, and, where the layer widths show it,
  `attention_pattern` and `num_kv_shared_layers`.

  Raises:
    UnknownVariantError: the tree is not regular enough to read.
  """
  vocab, dim = _require(shapes, 'embedder/input_embedding')  # [V, D]
  layers = _layer_indices(shapes)
  fields: dict[str, Any] = {
      'vocab_size': vocab,
      'embed_dim': dim,
      'num_layers': len(layers),
      'per_layer_input_dim': 0,
  }
  if 'embedder/per_layer_embeddings' in shapes:
    fields['per_layer_input_dim'] = shapes['embedder/per_layer_embeddings'][2]

  fields.update(_attention_fields(shapes, layers))
  fields.update(_mlp_fields(shapes, layers))
  return fields


def _unread_fields(fields: Mapping[str, Any]) -> list[str]:
  unread = list(_SHAPELESS_FIELDS)
  if fields.get('num_experts'):
    unread.append('experts_per_token')
  if 'attention_pattern' not in fields:
    unread.append('attention_pattern')
  if 'num_kv_shared_layers' not in fields:
    unread.append('num_kv_shared_layers')
  return unread


def _format_fields(fields: Mapping[str, Any]) -> str:
  parts = []
  for name, value in fields.items():
    if name == 'attention_pattern':
      value = '(' + ', '.join(kind.value for kind in value) + ')'
    parts.append(f'{name}={value}')
  return ', '.join(parts)


def config_from_checkpoint(
    path_or_tree: str | os.PathLike[str] | Mapping[str, Any],
    *,
    defaults: Gemma4Config | None = None,
) -> Gemma4Config:
  """Return the config of the model in a checkpoint.

  Args:
    path_or_tree: A checkpoint path, or a parameter tree in any layout whose
      leaves have a `shape` (arrays or `jax.ShapeDtypeStruct`).
    defaults: Supplies the settings that shapes cannot show (sliding window,
      RoPE, experts per token, ...) when no preset matches. Its shape fields
      are replaced by those read from the checkpoint.

  Returns:
    The matching preset, or a config named 'custom' built from `defaults` and
    the checkpoint's shapes.

  Raises:
    UnsupportedCheckpointError: not a Gemma 4 decoder (e.g. Gemma 3).
    UnknownVariantError: no preset matches, and `defaults` is missing or the
      shapes cannot be read. The message lists the keys whose shapes differ
      from the closest preset.
  """
  shapes = _load_text_shapes(path_or_tree)
  check_is_gemma4(shapes)
  preset = match_preset(shapes)
  if preset is not None:
    return preset

  nearest, comparison = closest_preset(shapes)
  closest_report = (
      f'closest preset {nearest.name!r} differs in'
      f' {comparison.num_differences} keys:\n  '
      + '\n  '.join(comparison.describe(nearest.name))
  )
  try:
    fields = infer_config_fields(shapes)
  except UnknownVariantError as error:
    raise UnknownVariantError(
        f'the checkpoint fits no Gemma 4 preset and {error}. The {closest_report}'
        '\nPass a matching config, or check the path'
    ) from error

  if defaults is None:
    raise UnknownVariantError(
        'the checkpoint fits no Gemma 4 preset. Its shapes give'
        f' {_format_fields(fields)}; these settings leave no trace in shapes:'
        f' {", ".join(_unread_fields(fields))}. Pass a Gemma4Config with them'
        ' (config_from_checkpoint(..., defaults=...), or config=... to'
        f' load_params). The {closest_report}'
    )

  try:
    config = dataclasses.replace(defaults, name='custom', **fields)
  except ValueError as error:
    raise UnknownVariantError(
        f'the shapes read from the checkpoint ({_format_fields(fields)}) do not'
        f' combine with defaults {defaults.name!r}: {error}'
    ) from error

  mismatch = compare_shapes(shapes, shape_map(expected_param_shapes(config)))
  if not mismatch.matches:
    raise UnknownVariantError(
        'the config built from the checkpoint shapes and defaults'
        f' {defaults.name!r} does not reproduce them (the attention pattern or'
        ' KV-shared layer count of defaults may be wrong):\n  '
        + '\n  '.join(mismatch.describe('the inferred config'))
    )
  return config


def validate_shapes(
    shapes: ShapeMap, config: Gemma4Config, *, source: str
) -> None:
  """Raise `CheckpointMismatchError` unless `shapes` fit `config` exactly.

  Args:
    shapes: Text-decoder shapes of the checkpoint (see `text_shapes`).
    config: The config the caller wants to load into.
    source: The checkpoint path or a description, for the message.
  """
  check_is_gemma4(shapes)
  comparison = compare_shapes(shapes, shape_map(expected_param_shapes(config)))
  if comparison.matches:
    return

  preset = match_preset(shapes)
  if preset is not None:
    fix = (
        f'The checkpoint matches preset {preset.name!r}: pass'
        f' config=get_preset({preset.name!r}), or check the path.'
    )
  else:
    fix = (
        'Pass a config that matches the checkpoint'
        ' (config_from_checkpoint(path) reads one), or check the path.'
    )
  raise CheckpointMismatchError(
      f'checkpoint {source} does not fit config {config.name!r}'
      f' ({len(comparison.wrong_shapes)} wrong shapes,'
      f' {len(comparison.missing)} missing keys,'
      f' {len(comparison.unexpected)} unexpected keys):\n  '
      + '\n  '.join(comparison.describe(config.name))
      + f'\n{fix}',
      missing=comparison.missing,
      unexpected=comparison.unexpected,
      wrong_shapes=comparison.wrong_shapes,
  )


def tower_shapes(tree: Mapping[str, Any], tower: str) -> ShapeMap:
  """Return the shapes of one tower's parameters ('vision' or 'audio')."""
  _, multimodal = layouts.split_multimodal(layouts.to_nested(tree))
  return {
      path: shape
      for path, shape in shape_map(multimodal).items()
      if layouts.multimodal_tower(path) == tower
  }


def vision_shapes(tree: Mapping[str, Any]) -> ShapeMap:
  """Return the shapes of the vision parameters of a tree in any layout."""
  return tower_shapes(tree, 'vision')


def audio_shapes(tree: Mapping[str, Any]) -> ShapeMap:
  """Return the shapes of the audio parameters of a tree in any layout."""
  return tower_shapes(tree, 'audio')


def validate_vision_shapes(
    shapes: ShapeMap, config: Gemma4Config, *, source: str
) -> None:
  """Raise `CheckpointMismatchError` unless the vision shapes fit `config`.

  Args:
    shapes: Vision shapes of the checkpoint (see `vision_shapes`).
    config: A config with a vision encoder.
    source: The checkpoint path or a description, for the message.
  """
  _validate_tower_shapes(
      shapes, expected_vision_shapes(config), config, 'vision', source
  )


def validate_audio_shapes(
    shapes: ShapeMap, config: Gemma4Config, *, source: str
) -> None:
  """Raise `CheckpointMismatchError` unless the audio shapes fit `config`.

  Args:
    shapes: Audio shapes of the checkpoint (see `audio_shapes`).
    config: A config with an audio encoder.
    source: The checkpoint path or a description, for the message.
  """
  _validate_tower_shapes(
      shapes, expected_audio_shapes(config), config, 'audio', source
  )


def _validate_tower_shapes(
    shapes: ShapeMap,
    expected_tree: Mapping[str, Any],
    config: Gemma4Config,
    tower: str,
    source: str,
) -> None:
  comparison = compare_shapes(shapes, shape_map(expected_tree))
  if comparison.matches:
    return
  if not shapes:
    fix = (
        f'The checkpoint has no {tower} tower: load it with text_only=True'
        f' and a config without the {tower} tower.'
    )
  else:
    fix = f'Pass the {tower} config of the checkpoint, or check the path.'
  raise CheckpointMismatchError(
      f'the {tower} tower of checkpoint {source} does not fit config'
      f' {config.name!r} ({len(comparison.wrong_shapes)} wrong shapes,'
      f' {len(comparison.missing)} missing keys,'
      f' {len(comparison.unexpected)} unexpected keys):\n  '
      + '\n  '.join(
          comparison.describe(f'the {tower} config of {config.name}')
      )
      + f'\n{fix}',
      missing=comparison.missing,
      unexpected=comparison.unexpected,
      wrong_shapes=comparison.wrong_shapes,
  )
