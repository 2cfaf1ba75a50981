"""Parameter shapes of a Gemma 4 text decoder, computed from its config.

`expected_param_shapes` gives the NESTED tree of shapes that the model's
`init` creates, without building the model, so that variant detection and
validation can run on checkpoint metadata alone. `expected_vision_shapes`
does the same for the vision tower, by tracing its `init` abstractly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gemma4_jax.config import Gemma4Config
from gemma4_jax.audio import encoder as audio_lib
from gemma4_jax.audio import features as audio_features
from gemma4_jax.vision import encoder as vision_lib

Shape = tuple[int, ...]


def _scale(dim: int) -> dict[str, Shape]:
  return {'scale': (dim,)}


def _weight(*shape: int) -> dict[str, Shape]:
  return {'w': tuple(shape)}


def _embedder_shapes(config: Gemma4Config) -> dict[str, Any]:
  vocab, dim = config.vocab_size, config.embed_dim
  shapes: dict[str, Any] = {'input_embedding': (vocab, dim)}  # [V, D]
  if config.per_layer_input_dim:
    layers, ple_dim = config.num_layers, config.per_layer_input_dim
    shapes['per_layer_embeddings'] = (vocab, layers, ple_dim)  # [V, L, P]
    shapes['per_layer_model_projection'] = _weight(dim, layers, ple_dim)
    shapes['per_layer_projection_norm'] = _scale(ple_dim)
  return shapes


def _attention_shapes(config: Gemma4Config, layer: int) -> dict[str, Any]:
  dim, heads = config.embed_dim, config.num_heads
  head_dim = config.layer_head_dim(layer)
  kv_heads = config.layer_num_kv_heads(layer)
  shapes: dict[str, Any] = {
      'q_einsum': _weight(heads, dim, head_dim),  # [N, D, H]
      'attn_vec_einsum': _weight(heads, head_dim, dim),  # [N, H, D]
      'query_norm': _scale(head_dim),
      'key_norm': _scale(head_dim),
  }
  if config.layer_k_eq_v(layer):
    shapes['k_einsum'] = _weight(kv_heads, dim, head_dim)  # [K, D, H]
  else:
    shapes['kv_einsum'] = _weight(2, kv_heads, dim, head_dim)  # [2, K, D, H]
  return shapes


def _dense_mlp_shapes(dim: int, hidden: int) -> dict[str, Shape]:
  # Bare arrays: the dense MLP has no `w` level in the NESTED tree.
  return {'gating_einsum': (2, hidden, dim), 'linear': (hidden, dim)}


def _layer_shapes(config: Gemma4Config, layer: int) -> dict[str, Any]:
  dim = config.embed_dim
  shapes: dict[str, Any] = {
      'attn': _attention_shapes(config, layer),
      'pre_attention_norm': _scale(dim),
      'post_attention_norm': _scale(dim),
      'pre_ffw_norm': _scale(dim),
      'post_ffw_norm': _scale(dim),
      'skip_scale': (1,),
  }

  if config.is_moe:
    experts, expert_hidden = config.num_experts, config.expert_hidden_dim
    shapes['mlp'] = {
        'gating_einsum': _weight(experts, 2, expert_hidden, dim),  # [E,2,F,D]
        'linear': _weight(experts, expert_hidden, dim),  # [E, F, D]
        'router_logits': _weight(dim, experts),  # [D, E]
        'per_expert_scale': (experts,),
        'router_scale': (dim,),
    }
    shapes['mlp2'] = _dense_mlp_shapes(dim, config.hidden_dim)
    shapes['pre_ffw2_norm'] = _scale(dim)
    shapes['post_ffw1_norm'] = _scale(dim)
    shapes['post_ffw2_norm'] = _scale(dim)
  else:
    shapes['mlp'] = _dense_mlp_shapes(dim, config.layer_hidden_dim(layer))

  if config.per_layer_input_dim:
    ple_dim = config.per_layer_input_dim
    shapes['per_layer_input_gate'] = _weight(dim, ple_dim)  # [D, P]
    shapes['per_layer_projection'] = _weight(ple_dim, dim)  # [P, D]
    shapes['post_per_layer_input_norm'] = _scale(dim)
  return shapes


def expected_param_shapes(config: Gemma4Config) -> dict[str, Any]:
  """Return the NESTED tree of parameter shapes of the text decoder.

  The tree has the keys and shapes of `init(...)['params']` of the text-only
  model for `config`. Multimodal towers are not included.
  """
  shapes: dict[str, Any] = {'embedder': _embedder_shapes(config)}
  for layer in range(config.num_layers):
    shapes[f'layer_{layer}'] = _layer_shapes(config, layer)
  shapes['final_norm'] = _scale(config.embed_dim)
  return shapes


def expected_vision_shapes(config: Gemma4Config) -> dict[str, Any]:
  """Return the NESTED shapes of the vision parameters of `config`.

  The tree has `vision_encoder` and `embedder/mm_input_projection`; it is
  empty when `config.vision` is None.
  """
  vision = config.vision
  if vision is None:
    return {}
  kernel_area = vision.pooling_kernel_size**2
  patches = jax.ShapeDtypeStruct((1, kernel_area, vision.patch_dim), jnp.float32)
  positions = jax.ShapeDtypeStruct((1, kernel_area, 2), jnp.int32)
  encoder = jax.eval_shape(
      vision_lib.VisionEncoder(vision).init, jax.random.key(0), patches,
      positions,
  )['params']
  return {
      'vision_encoder': jax.tree.map(lambda leaf: tuple(leaf.shape), encoder),
      'embedder': {
          'mm_input_projection': _weight(vision.embed_dim, config.embed_dim)
      },
  }


def count_params(shapes: Mapping[str, Any]) -> int:
  """Count the parameters of a tree whose leaves are shapes or arrays."""
  total = 0
  for value in shapes.values():
    if isinstance(value, Mapping):
      total += count_params(value)
    else:
      shape = value if isinstance(value, tuple) else value.shape
      total += math.prod(shape)
  return total


def expected_audio_shapes(config: Gemma4Config) -> dict[str, Any]:
  """Return the NESTED shapes of the audio parameters of `config`.

  The tree has `audio_encoder` and `embedder/audio_input_projection`; it is
  empty when `config.audio` is None.
  """
  audio = config.audio
  if audio is None:
    return {}
  waveforms = jax.ShapeDtypeStruct((1, audio_features.MIN_SAMPLES), jnp.float32)
  lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
  encoder = jax.eval_shape(
      audio_lib.AudioEncoder(audio).init, jax.random.key(0), waveforms,
      lengths,
  )['params']
  return {
      'audio_encoder': jax.tree.map(lambda leaf: tuple(leaf.shape), encoder),
      'embedder': {
          'audio_input_projection': _weight(
              audio.soft_token_dim, config.embed_dim
          )
      },
  }
