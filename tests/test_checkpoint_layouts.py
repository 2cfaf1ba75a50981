"""Layout conversion, expected shapes and variant detection, against `gemma`.

The official `gemma` 4.0.1 package defines every expectation here: its
`_nested_to_flat` and `_nested_to_stacked` converters define FLAT and STACKED,
and `jax.eval_shape` of its models defines the NESTED trees and their shapes.
Only the parameter counts published for the releases are written out.
Nothing here touches the disk.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import traverse_util
from gemma.gm.ckpts import _checkpoint as official_ckpt
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config as config_lib
from gemma4_jax.checkpoint import errors, layouts, shapes, variants
from gemma4_jax.checkpoint.layouts import Layout
from tests import oracle

SMALL_NAMES = tuple(oracle.SMALL_CONFIGS)
PRESET_NAMES = tuple(config_lib.PRESETS)
# Configs whose layers at one pattern position share shapes. In E2B-style
# models the KV-shared layers have a wider MLP, so they cannot be stacked.
STACKABLE_NAMES = tuple(
    name
    for name, cfg in oracle.SMALL_CONFIGS.items()
    if cfg.kv_shared_hidden_dim is None
)

_TOKENS = jnp.ones((1, 4), jnp.int32)


@functools.cache
def _abstract_small(name: str):
  model = oracle.official_model(oracle.SMALL_CONFIGS[name])
  return jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']


@functools.cache
def _abstract_preset(name: str, text_only: bool = True):
  model = oracle.official_preset_model(name)
  if not text_only:
    # The same released class, built with its vision tower.
    model = type(model)(text_only=False)
  return jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']


def _random_params(name: str, seed: int = 0):
  """Official-structured parameters filled with distinct random values."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32),
      _abstract_small(name),
  )


def _flat_dict(tree):
  """Map '/'-joined key paths to leaves, for either layout's dict nesting."""
  return traverse_util.flatten_dict(tree, sep='/')


def _assert_same_tree(actual, expected):
  actual, expected = _flat_dict(actual), _flat_dict(expected)
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    if isinstance(value, jax.ShapeDtypeStruct):
      assert actual[key].shape == value.shape, key
      assert actual[key].dtype == value.dtype, key
    else:
      np.testing.assert_array_equal(actual[key], value, err_msg=key)


# --------------------------------------------------------------- conversion


@pytest.mark.parametrize('name', SMALL_NAMES)
def test_nested_to_flat_matches_official(name):
  params = _random_params(name)
  _assert_same_tree(
      layouts.nested_to_flat(params), official_ckpt._nested_to_flat(params)
  )


@pytest.mark.parametrize('name', SMALL_NAMES)
def test_flat_to_nested_inverts_official_flat(name):
  params = _random_params(name)
  flat = official_ckpt._nested_to_flat(params)
  _assert_same_tree(layouts.flat_to_nested(flat), params)


def test_moe_flat_keeps_expert_w_level():
  # The MoE expert weights are `mlp/gating_einsum/w` in the official NESTED
  # tree, so a FLAT round trip must keep that `w`. The dense `mlp2` weights
  # stay bare arrays.
  params = _random_params('26b_a4b_like')
  nested = layouts.flat_to_nested(official_ckpt._nested_to_flat(params))
  for key in ('gating_einsum', 'linear', 'router_logits'):
    assert set(nested['layer_0']['mlp'][key]) == {'w'}
  assert isinstance(nested['layer_0']['mlp2']['linear'], np.ndarray)


@pytest.mark.parametrize('name', STACKABLE_NAMES)
def test_nested_to_stacked_matches_official(name):
  params = _random_params(name)
  pattern_len = len(oracle.SMALL_CONFIGS[name].attention_pattern)
  _assert_same_tree(
      layouts.from_nested(params, Layout.STACKED, pattern_len=pattern_len),
      official_ckpt._nested_to_stacked(params, pattern_len),
  )


@pytest.mark.parametrize('name', STACKABLE_NAMES)
def test_stacked_to_nested_inverts_official_stacked(name):
  params = _random_params(name)
  pattern_len = len(oracle.SMALL_CONFIGS[name].attention_pattern)
  stacked = official_ckpt._nested_to_stacked(params, pattern_len)
  _assert_same_tree(layouts.to_nested(stacked), params)


@pytest.mark.parametrize('name', STACKABLE_NAMES)
def test_attention_pattern_len_read_from_stacked_keys(name):
  pattern_len = len(oracle.SMALL_CONFIGS[name].attention_pattern)
  stacked = official_ckpt._nested_to_stacked(_abstract_small(name), pattern_len)
  assert layouts.attention_pattern_len(stacked) == pattern_len


def test_stacked_rejects_layers_of_different_widths():
  params = _random_params('e2b_like')
  pattern_len = len(oracle.E2B_LIKE.attention_pattern)
  # The official converter cannot stack these layers either.
  with pytest.raises(ValueError):
    official_ckpt._nested_to_stacked(params, pattern_len)
  first_shared = oracle.E2B_LIKE.num_layers - oracle.E2B_LIKE.num_kv_shared_layers
  with pytest.raises(errors.CheckpointError) as info:
    layouts.from_nested(params, Layout.STACKED, pattern_len=pattern_len)
  message = str(info.value)
  assert 'layer_0/mlp' in message
  assert f'layer_{first_shared}/mlp' in message
  assert 'save as "flat" or "nested"' in message


@pytest.mark.parametrize('name', STACKABLE_NAMES)
def test_detect_layout_of_official_trees(name):
  params = _abstract_small(name)
  pattern_len = len(oracle.SMALL_CONFIGS[name].attention_pattern)
  assert layouts.detect_layout(params) == Layout.NESTED
  flat = official_ckpt._nested_to_flat(params)
  assert layouts.detect_layout(flat) == Layout.FLAT
  stacked = official_ckpt._nested_to_stacked(params, pattern_len)
  assert layouts.detect_layout(stacked) == Layout.STACKED


def test_vision_tower_flat_round_trip_matches_official():
  # The real E2B multimodal tree (abstract): the vision tower moves under
  # `SigLiPFromPatches_0/` in FLAT and comes back unchanged.
  params = _abstract_preset('e2b', text_only=False)
  flat = official_ckpt._nested_to_flat(params)
  _assert_same_tree(layouts.nested_to_flat(params), flat)
  assert any(key.startswith('SigLiPFromPatches_0/') for key in flat)
  _assert_same_tree(layouts.flat_to_nested(flat), params)


def test_split_multimodal_of_released_tree():
  multimodal_tree = _abstract_preset('e2b', text_only=False)
  text, multimodal = layouts.split_multimodal(multimodal_tree)
  _assert_same_tree(text, _abstract_preset('e2b'))
  assert set(multimodal) == {'vision_encoder'}


def test_split_multimodal_of_synthetic_embedder_projections():
  # A synthetic multimodal tree: a small text tree plus the embedder
  # projections and audio tower names that the official Embedder and
  # Transformer create for images and audio.
  params = _random_params('31b_like')
  params['embedder']['mm_input_projection'] = {'w': np.ones((8, 64))}
  params['embedder']['audio_input_projection'] = {'w': np.ones((4, 64))}
  params['audio_encoder'] = {'feature': {'w': np.ones((3,))}}
  text, multimodal = layouts.split_multimodal(params)
  _assert_same_tree(text, _random_params('31b_like'))
  assert sorted(_flat_dict(multimodal)) == [
      'audio_encoder/feature/w',
      'embedder/audio_input_projection/w',
      'embedder/mm_input_projection/w',
  ]


# ------------------------------------------------------------ expected shapes


def _official_shapes(abstract):
  return jax.tree.map(lambda leaf: tuple(leaf.shape), abstract)


@pytest.mark.parametrize('name', SMALL_NAMES)
def test_expected_shapes_equal_official_small(name):
  expected = shapes.expected_param_shapes(oracle.SMALL_CONFIGS[name])
  assert expected == _official_shapes(_abstract_small(name))


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_expected_shapes_equal_official_preset(name):
  expected = shapes.expected_param_shapes(config_lib.PRESETS[name])
  assert expected == _official_shapes(_abstract_preset(name))


# Text parameters (including PLE) as published for the releases, in billions
# and at the published precision.
_PUBLISHED_COUNTS = {
    'e2b': (4.65, 2),
    'e4b': (7.52, 2),
    '26b_a4b': (25.2, 1),
    '31b': (30.7, 1),
}
_PUBLISHED_PLE_TABLES = {'e2b': 2.35, 'e4b': 2.82}


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_preset_param_count_matches_published(name):
  count = shapes.count_params(shapes.expected_param_shapes(config_lib.PRESETS[name]))
  published, digits = _PUBLISHED_COUNTS[name]
  assert round(count / 1e9, digits) == published


@pytest.mark.parametrize('name', sorted(_PUBLISHED_PLE_TABLES))
def test_preset_ple_table_matches_published(name):
  tree = shapes.expected_param_shapes(config_lib.PRESETS[name])
  ple_table = np.prod(tree['embedder']['per_layer_embeddings'])
  assert round(ple_table / 1e9, 2) == _PUBLISHED_PLE_TABLES[name]


def test_e2b_embedding_matches_published():
  tree = shapes.expected_param_shapes(config_lib.PRESETS['e2b'])
  assert round(np.prod(tree['embedder']['input_embedding']) / 1e9, 2) == 0.40


# ---------------------------------------------------------- variant detection


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_detects_preset_from_official_tree(name):
  detected = variants.config_from_checkpoint(_abstract_preset(name))
  assert detected == config_lib.PRESETS[name]


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_detects_preset_from_official_flat_tree(name):
  flat = official_ckpt._nested_to_flat(_abstract_preset(name, text_only=False))
  assert variants.config_from_checkpoint(flat) == config_lib.PRESETS[name]


@pytest.mark.parametrize('name', ['e4b', '26b_a4b', '31b'])
def test_detects_preset_from_official_stacked_tree(name):
  pattern_len = len(config_lib.PRESETS[name].attention_pattern)
  stacked = official_ckpt._nested_to_stacked(_abstract_preset(name), pattern_len)
  assert variants.config_from_checkpoint(stacked) == config_lib.PRESETS[name]


# Shape-determined fields compared after inference from a small tree.
_SHAPE_FIELDS = (
    'vocab_size',
    'embed_dim',
    'num_layers',
    'attention_pattern',
    'num_heads',
    'head_dim',
    'num_kv_heads',
    'global_head_dim',
    'num_global_kv_heads',
    'k_eq_v_global',
    'hidden_dim',
    'kv_shared_hidden_dim',
    'per_layer_input_dim',
    'num_experts',
    'expert_hidden_dim',
)


@pytest.mark.parametrize(
    'name, family',
    [('e2b_like', 'e2b'), ('26b_a4b_like', '26b_a4b'), ('31b_like', '31b')],
)
def test_infers_custom_config_from_shapes(name, family):
  small = oracle.SMALL_CONFIGS[name]
  defaults = config_lib.PRESETS[family]
  config = variants.config_from_checkpoint(
      _abstract_small(name), defaults=defaults
  )
  assert config.name == 'custom'
  for field in _SHAPE_FIELDS:
    assert getattr(config, field) == getattr(small, field), field
  # Settings without a trace in shapes come from `defaults`.
  assert config.sliding_window == defaults.sliding_window
  assert config.num_kv_shared_layers == small.num_kv_shared_layers


def test_custom_config_needs_defaults():
  with pytest.raises(errors.UnknownVariantError) as info:
    variants.config_from_checkpoint(_abstract_small('e2b_like'))
  message = str(info.value)
  assert 'sliding_window' in message
  assert 'embed_dim=64' in message
  assert 'defaults=' in message


def test_kv_shared_count_from_defaults():
  # E4B-style models share KV without a wider MLP, so the shared-layer count
  # leaves no trace in shapes. The E4B preset's 18 shared layers do not fit
  # a 12-layer model.
  with pytest.raises(errors.UnknownVariantError) as info:
    variants.config_from_checkpoint(
        _abstract_small('e4b_like'), defaults=config_lib.PRESETS['e4b']
    )
  assert 'num_kv_shared_layers' in str(info.value)
  fitting = dataclasses.replace(config_lib.PRESETS['e4b'], num_kv_shared_layers=6)
  config = variants.config_from_checkpoint(
      _abstract_small('e4b_like'), defaults=fitting
  )
  for field in _SHAPE_FIELDS:
    assert getattr(config, field) == getattr(oracle.E4B_LIKE, field), field
