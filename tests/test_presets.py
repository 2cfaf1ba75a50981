"""Tests that the presets equal the released configs of `gemma` 4.0.1.

Every comparison reads its expected value from the official package, from the
released classes (`gm.nn.Gemma4_E2B` and the others) and the parameter trees
they build. Only the published parameter counts are written out as numbers.
Parameter trees are built with `jax.eval_shape`, so no test allocates a
preset's weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from gemma.gm.nn.gemma4 import _config as official_config_lib
from gemma.gm.nn.gemma4 import _modules as official_modules
import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import config as config_lib
from gemma4_jax.config import GLOBAL, LOCAL
from tests import oracle

PRESET_NAMES = tuple(config_lib.PRESETS)

# Four tokens are enough for `init` to build every parameter.
_INIT_TOKENS_SHAPE = (1, 4)


@functools.cache
def _released_config(name: str):
  """Build the released class for preset `name` and return its text config."""
  return oracle.official_preset_model(name).config


def _abstract_params(model) -> dict[str, jax.ShapeDtypeStruct]:
  """Trace `model.init` and map each parameter path to its shape and dtype.

  Paths join the tree's keys with slashes, as in `layer_0/attn/q_einsum/w`.
  """
  tokens = jnp.ones(_INIT_TOKENS_SHAPE, jnp.int32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  leaves = jax.tree_util.tree_leaves_with_path(variables['params'])
  return {
      '/'.join(str(key.key) for key in path): leaf for path, leaf in leaves
  }


@functools.cache
def _released_params(name: str) -> dict[str, jax.ShapeDtypeStruct]:
  return _abstract_params(oracle.official_preset_model(name))


def _num_params(params: dict[str, jax.ShapeDtypeStruct]) -> int:
  return sum(math.prod(leaf.shape) for leaf in params.values())


def _tree_differences(
    expected: dict[str, jax.ShapeDtypeStruct],
    actual: dict[str, jax.ShapeDtypeStruct],
) -> dict[str, list[str]]:
  """List missing and extra paths, and paths whose shape or dtype differ."""
  common = sorted(expected.keys() & actual.keys())
  return {
      'missing': sorted(expected.keys() - actual.keys()),
      'extra': sorted(actual.keys() - expected.keys()),
      'shape': [
          f'{path}: expected {expected[path].shape}, got {actual[path].shape}'
          for path in common
          if expected[path].shape != actual[path].shape
      ],
      'dtype': [
          f'{path}: expected {expected[path].dtype}, got {actual[path].dtype}'
          for path in common
          if expected[path].dtype != actual[path].dtype
      ],
  }


# Each official value below is derived from a released `TransformerConfig` by
# the rule the official `Transformer.setup` and `Block.setup` apply to it.


def _official_layer_kinds(official):
  kinds = {
      official_modules.AttentionType.LOCAL_SLIDING: LOCAL,
      official_modules.AttentionType.GLOBAL: GLOBAL,
  }
  return tuple(kinds[kind] for kind in official.attention_types)


def _official_kv_sources(official) -> tuple[int, ...]:
  sources = official_config_lib.create_kv_cache_sharing_patterns(
      official.kv_cache_sharing_config,
      official.num_layers,
      official.attention_types,
  )
  return tuple(sources)


def _official_hidden_dims(official) -> tuple[int, ...]:
  """Read the hidden width of each layer's dense MLP (`mlp2` in MoE layers)."""
  sources = _official_kv_sources(official)
  dims = []
  for layer in range(official.num_layers):
    if official.enable_moe:
      dims.append(official.moe_dense_hidden_dim)
    elif (
        sources[layer] != layer
        and official.override_kv_shared_ffw_hidden is not None
    ):
      dims.append(official.override_kv_shared_ffw_hidden)
    else:
      dims.append(official.hidden_dim)
  return tuple(dims)


def _official_global_kv_heads(official) -> int:
  # None means global layers keep the local KV head count.
  return official.num_global_kv_heads or official.num_kv_heads


def _official_layer_head_dims(official) -> tuple[int, ...]:
  global_head_dim = official.global_key_size or official.head_dim
  return tuple(
      global_head_dim if kind == GLOBAL else official.head_dim
      for kind in _official_layer_kinds(official)
  )


def _official_layer_kv_heads(official) -> tuple[int, ...]:
  return tuple(
      _official_global_kv_heads(official) if kind == GLOBAL
      else official.num_kv_heads
      for kind in _official_layer_kinds(official)
  )


def _official_layer_k_eq_v(official) -> tuple[bool, ...]:
  return tuple(
      official.k_eq_v_global and kind == GLOBAL
      for kind in _official_layer_kinds(official)
  )


def _per_layer(method):
  """Turn a per-layer method of `Gemma4Config` into a reader of all layers."""
  return lambda cfg: tuple(method(cfg, i) for i in range(cfg.num_layers))


# Each property maps to a reader of our preset and a reader of the released
# config. The official config keeps an unused `top_k_experts=8` in dense
# models, so both readers of `experts_per_token` return 0 unless it is MoE.
_CONFIG_FIELDS = {
    'vocab_size': (lambda c: c.vocab_size, lambda o: o.num_embed),
    'embed_dim': (lambda c: c.embed_dim, lambda o: o.embed_dim),
    'num_layers': (lambda c: c.num_layers, lambda o: o.num_layers),
    'layer_kinds': (lambda c: c.layer_kinds, _official_layer_kinds),
    'num_heads': (lambda c: c.num_heads, lambda o: o.num_heads),
    'head_dim': (lambda c: c.head_dim, lambda o: o.head_dim),
    'num_kv_heads': (lambda c: c.num_kv_heads, lambda o: o.num_kv_heads),
    'num_global_kv_heads': (
        lambda c: c.num_global_kv_heads,
        _official_global_kv_heads,
    ),
    'global_head_dim': (
        lambda c: c.global_head_dim,
        lambda o: o.global_key_size,
    ),
    'k_eq_v_global': (lambda c: c.k_eq_v_global, lambda o: o.k_eq_v_global),
    'sliding_window': (
        lambda c: c.sliding_window,
        lambda o: o.sliding_window_size,
    ),
    'layer_hidden_dim': (
        _per_layer(config_lib.Gemma4Config.layer_hidden_dim),
        _official_hidden_dims,
    ),
    'layer_head_dim': (
        _per_layer(config_lib.Gemma4Config.layer_head_dim),
        _official_layer_head_dims,
    ),
    'layer_num_kv_heads': (
        _per_layer(config_lib.Gemma4Config.layer_num_kv_heads),
        _official_layer_kv_heads,
    ),
    'layer_k_eq_v': (
        _per_layer(config_lib.Gemma4Config.layer_k_eq_v),
        _official_layer_k_eq_v,
    ),
    'per_layer_input_dim': (
        lambda c: c.per_layer_input_dim,
        lambda o: o.per_layer_input_dim,
    ),
    'kv_source_layers': (lambda c: c.kv_source_layers, _official_kv_sources),
    'is_moe': (lambda c: c.is_moe, lambda o: o.enable_moe),
    'num_experts': (lambda c: c.num_experts, lambda o: o.num_experts),
    'expert_hidden_dim': (
        lambda c: c.expert_hidden_dim,
        lambda o: o.expert_dim,
    ),
    'experts_per_token': (
        lambda c: c.experts_per_token if c.is_moe else 0,
        lambda o: o.top_k_experts if o.enable_moe else 0,
    ),
    'local_rope_base': (
        lambda c: c.local_rope_base,
        lambda o: o.local_base_frequency,
    ),
    'global_rope_base': (
        lambda c: c.global_rope_base,
        lambda o: o.global_base_frequency,
    ),
    'local_rope_proportion': (
        lambda c: c.local_rope_proportion,
        lambda o: o.local_rope_proportion,
    ),
    'global_rope_proportion': (
        lambda c: c.global_rope_proportion,
        lambda o: o.global_rope_proportion,
    ),
    'final_logit_softcap': (
        lambda c: c.final_logit_softcap,
        lambda o: o.final_logit_softcap,
    ),
    'vision_bidirectional': (
        lambda c: c.vision_bidirectional,
        lambda o: o.use_bidirectional_attention == 'vision',
    ),
}


@pytest.mark.parametrize('field', list(_CONFIG_FIELDS))
@pytest.mark.parametrize('name', PRESET_NAMES)
def test_preset_field(name, field):
  read_ours, read_official = _CONFIG_FIELDS[field]
  ours = read_ours(config_lib.PRESETS[name])
  official = read_official(_released_config(name))

  assert ours == official


# Official settings that `Gemma4Config` has no field for, because our model
# hard-wires them: no attention-logit soft-cap, QK-norm with a learned scale,
# post-attention and post-FFW norms, and unscaled RoPE positions.
_FIXED_OFFICIAL_FIELDS = {
    'attn_logits_soft_cap': None,
    'qk_norm_with_scale': True,
    'use_post_attn_norm': True,
    'use_post_ffw_norm': True,
    'local_scale_factor': 1.0,
    'global_scale_factor': 1.0,
}


@pytest.mark.parametrize('field', list(_FIXED_OFFICIAL_FIELDS))
@pytest.mark.parametrize('name', PRESET_NAMES)
def test_released_fixed_field(name, field):
  released = _released_config(name)

  assert getattr(released, field) == _FIXED_OFFICIAL_FIELDS[field]


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_oracle_translation_tree(name):
  # Every parity test builds its official model through
  # `oracle.official_config`, so its tree must equal the released one.
  translated = oracle.official_model(config_lib.PRESETS[name], jnp.bfloat16)

  differences = _tree_differences(
      _released_params(name), _abstract_params(translated)
  )

  assert not differences['missing']
  assert not differences['extra']
  assert not differences['shape']
  assert not differences['dtype']


@pytest.mark.parametrize('name', PRESET_NAMES)
def test_transformer_tree(name):
  # Imported here so that the config tests still run while the model module
  # is missing or broken. This test then fails, as it should.
  from gemma4_jax.transformer import Transformer

  model = Transformer(config=config_lib.PRESETS[name], dtype=jnp.bfloat16)

  differences = _tree_differences(
      _released_params(name), _abstract_params(model)
  )

  assert not differences['missing']
  assert not differences['extra']
  assert not differences['shape']
  assert not differences['dtype']


# Published text parameter counts (PLE included) in billions, each with the
# number of decimals it is printed with. The published PLE count is the table
# `embedder/per_layer_embeddings` alone, which gives 2.35 B for E2B and 2.82 B
# for E4B. Adding `embedder/per_layer_model_projection` (embed_dim x layers x
# 256) would give 2.36 B and 2.85 B.
_PUBLISHED_COUNTS = [
    ('e2b', None, 4.65, 2),
    ('e2b', 'embedder/per_layer_embeddings', 2.35, 2),
    ('e2b', 'embedder/input_embedding', 0.40, 2),
    ('e4b', None, 7.52, 2),
    ('e4b', 'embedder/per_layer_embeddings', 2.82, 2),
    ('26b_a4b', None, 25.2, 1),
    ('31b', None, 30.7, 1),
]


@pytest.mark.parametrize(
    'name, path, billions, decimals',
    _PUBLISHED_COUNTS,
    ids=[f'{row[0]}-{row[1] or "total"}' for row in _PUBLISHED_COUNTS],
)
def test_released_param_count(name, path, billions, decimals):
  params = _released_params(name)
  if path is not None:
    params = {path: params[path]}

  assert round(_num_params(params) / 1e9, decimals) == billions


@pytest.mark.parametrize(
    'alias, name',
    [
        ('26B-A4B', '26b_a4b'),
        ('26b', '26b_a4b'),
        ('Gemma4_26B_A4B', '26b_a4b'),
        ('E2B', 'e2b'),
        ('gemma4_e4b', 'e4b'),
        ('31B', '31b'),
    ],
)
def test_get_preset_alias(alias, name):
  assert config_lib.get_preset(alias) is config_lib.PRESETS[name]


def test_get_preset_unknown():
  with pytest.raises(ValueError, match='unknown Gemma 4 preset'):
    config_lib.get_preset('gemma4_7b')


def test_config_kv_heads_not_divisor():
  with pytest.raises(ValueError, match='num_kv_heads=3'):
    oracle.small_config('e4b_like', num_kv_heads=3)


def test_config_global_kv_heads_not_divisor():
  with pytest.raises(ValueError, match='num_global_kv_heads=3'):
    oracle.small_config('e4b_like', num_global_kv_heads=3)


def test_config_kv_sharing_without_source():
  # With 7 of 12 layers shared, layers 0-4 are unshared and all local, so
  # the shared global layer 11 has no layer to read keys and values from.
  base = oracle.small_config('e4b_like')
  assert base.layer_kinds[:5] == (LOCAL,) * 5
  assert base.layer_kinds[11] == GLOBAL

  with pytest.raises(ValueError, match='num_kv_shared_layers'):
    dataclasses.replace(base, num_kv_shared_layers=7)
