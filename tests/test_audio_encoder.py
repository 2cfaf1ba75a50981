"""The audio encoder and its projection equal the official `gemma` 4.0.1 ones.

A small random tower (2 conformer layers, width 32, 4 heads, soft tokens of
width 24) gets the official parameter tree. Its random values make every path
matter, with finite clip bounds that cut some activations and norm scales
away from one. Both encoders run on the same clips: a batch of a
0.5 s chirp and 7 s of noise, a 30 s clip (the maximum) and, where
`espeak-ng` is installed, real speech. Outputs must agree to within
1e-4 * max(1, max |official|) in float32.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.audio import encoder as encoder_lib
from gemma4_jax.audio import features
from tests import oracle
from tests import test_audio_features as clips

CONFIG = encoder_lib.AudioConfig(
    embed_dim=32, num_layers=2, num_heads=4, soft_token_dim=24
)
TEXT_DIM = 40


def official_conformer_config():
  from gemma.gm.nn.gemma4.audio import _modules

  return _modules.ConformerConfig(
      num_layers=CONFIG.num_layers,
      model_dims=CONFIG.embed_dim,
      lm_model_dims=CONFIG.soft_token_dim,
      atten_num_heads=CONFIG.num_heads,
  )


def official_encoder():
  from gemma.gm.nn.gemma4.audio import _model

  return _model.AudioTokenizer(config=official_conformer_config())


def randomize(params, seed=0):
  """Random values for every leaf, in ranges where each one changes outputs."""
  flat = flax.traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {}
  for key, (path, value) in zip(keys, sorted(flat.items())):
    name = path[-1]
    if name.startswith('clip_'):
      bound = jax.random.uniform(key, (), minval=0.5, maxval=2.0)
      out[path] = -bound if name.endswith('_min') else bound
    elif name == 'kernel':
      fan_in = int(np.prod(value.shape[:-1]))
      if path[-2] == 'depthwise_conv1d':
        fan_in = value.shape[0]
      out[path] = jax.random.normal(key, value.shape) / np.sqrt(fan_in)
    elif name in ('scale', 'per_dim_scale'):
      out[path] = 1.0 + 0.3 * jax.random.normal(key, value.shape)
    else:  # biases
      out[path] = 0.1 * jax.random.normal(key, value.shape)
  return flax.traverse_util.unflatten_dict(out)


@pytest.fixture(scope='module')
def official_params():
  waveforms, lengths = features.batch_clips([clips.chirp(0.5)])
  shapes = jax.eval_shape(
      lambda w: official_encoder().init(jax.random.key(0), w, lengths),
      waveforms,
  )
  return randomize(shapes['params'])


def assert_close_to_official(ours, expected):
  ours, expected = np.asarray(ours), np.asarray(expected)
  assert ours.shape == expected.shape
  bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
  np.testing.assert_array_less(np.abs(ours - expected).max(), bound)


def run_both(params, waveforms, lengths):
  ours = encoder_lib.AudioEncoder(CONFIG).apply(
      {'params': params}, waveforms, lengths
  )
  expected = official_encoder().apply({'params': params}, waveforms, lengths)
  return ours, expected


def test_parameter_tree_matches_official(official_params):
  waveforms, lengths = features.batch_clips([clips.chirp(0.5)])
  ours = jax.eval_shape(
      lambda w: encoder_lib.AudioEncoder(CONFIG).init(
          jax.random.key(0), w, lengths
      ),
      waveforms,
  )['params']

  def describe(tree):
    return {
        path: (leaf.shape, leaf.dtype)
        for path, leaf in flax.traverse_util.flatten_dict(tree).items()
    }

  assert describe(ours) == describe(official_params)


def test_clip_bounds_are_active(official_params):
  # Guards the premise of the parity tests: with these bounds the clipping
  # changes the official output, so a missing clip would be caught.
  waveforms, lengths = features.batch_clips([clips.noise(1.0)])
  unclipped = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.sign(leaf) * jnp.inf
      if str(path[-1].key).startswith('clip_')
      else leaf,
      official_params,
  )

  clipped_out, _ = official_encoder().apply(
      {'params': official_params}, waveforms, lengths
  )
  free_out, _ = official_encoder().apply(
      {'params': unclipped}, waveforms, lengths
  )

  assert np.abs(np.asarray(clipped_out) - np.asarray(free_out)).max() > 1e-2


def test_batch_of_short_and_long_clips_matches_official(official_params):
  waveforms, lengths = features.batch_clips(
      [clips.chirp(0.5), clips.noise(7.0)]
  )

  (ours, ours_padding), (expected, expected_padding) = run_both(
      official_params, waveforms, lengths
  )

  assert_close_to_official(ours, expected)
  np.testing.assert_array_equal(
      np.asarray(ours_padding), np.asarray(expected_padding)
  )


def test_batch_valid_tokens_cover_soft_token_counts(official_params):
  waveforms, lengths = features.batch_clips(
      [clips.chirp(0.5), clips.noise(7.0)]
  )

  _, (_, expected_padding) = run_both(official_params, waveforms, lengths)

  valid = (~np.asarray(expected_padding)).sum(axis=1)
  counts = [features.num_soft_tokens(int(n)) for n in lengths]
  assert counts == [12, 175]
  # The official mask can keep one token fewer or more for a clip shorter
  # than the batch. The counts decide how many tokens reach the text model.
  np.testing.assert_array_less(np.abs(valid - np.array(counts)), 2)


def test_maximum_length_clip_matches_official(official_params):
  waveform = clips.synthetic_clips()['chirp_noise_30s']
  waveforms, lengths = features.batch_clips([waveform])

  (ours, ours_padding), (expected, _) = run_both(
      official_params, waveforms, lengths
  )

  assert ours.shape == (1, features.MAX_SOFT_TOKENS, CONFIG.soft_token_dim)
  assert not np.asarray(ours_padding).any()
  assert_close_to_official(ours, expected)


@clips.needs_espeak
def test_speech_matches_official(official_params, tmp_path):
  path = tmp_path / 'speech.wav'
  clips.speak('Gemma listens to this sentence and encodes it.', path)
  waveforms, lengths = features.batch_clips([features.load_audio(path)])

  (ours, _), (expected, _) = run_both(official_params, waveforms, lengths)

  assert ours.shape[1] == features.num_soft_tokens(int(lengths[0]))
  assert_close_to_official(ours, expected)


def test_projection_matches_official_embedder():
  from gemma.gm.nn.gemma4 import _modules

  embedder = _modules.Embedder(
      vocab_size=16, embed_dim=TEXT_DIM, audio_proj_dim=CONFIG.soft_token_dim
  )
  soft_tokens = jax.random.normal(
      jax.random.key(1), (2, 5, CONFIG.soft_token_dim)
  )
  params = embedder.init(
      jax.random.key(2), soft_tokens, method=_modules.Embedder.encode_audio
  )['params']
  projection = params['audio_input_projection']

  ours = encoder_lib.AudioSoftTokenProjection(
      CONFIG.soft_token_dim, TEXT_DIM
  ).apply({'params': projection}, soft_tokens)
  expected = embedder.apply(
      {'params': params}, soft_tokens, method=_modules.Embedder.encode_audio
  )

  assert set(projection) == {'w'}
  assert_close_to_official(ours, expected)


def test_projected_clips_match_official_transformer(official_params):
  # The official model encodes, projects and concatenates each clip's
  # leading soft tokens in `Transformer._encode_audio`.
  from gemma.gm.nn.gemma4 import _gemma4

  official_config = dataclasses.replace(
      oracle.official_config(oracle.E2B_LIKE),
      audio_encoder=official_conformer_config(),
  )
  model = _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=official_config, dtype=jnp.float32, text_only=True
  )
  projection = jax.random.normal(
      jax.random.key(3), (CONFIG.soft_token_dim, oracle.E2B_LIKE.embed_dim)
  )

  waveforms, lengths = features.batch_clips(
      [clips.noise(1.0), clips.chirp(0.5)]
  )
  counts = tuple(features.num_soft_tokens(int(n)) for n in lengths)
  # The text embedder's setup needs its own tables, but the audio path does
  # not read them, so zeros do.
  text_shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )['params']['embedder']
  embedder = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), text_shapes)
  embedder['audio_input_projection'] = {'w': projection}
  params = {'audio_encoder': official_params, 'embedder': embedder}
  def official_encode_audio(module, audio, audio_lengths, soft_token_counts):
    return module._encode_audio(  # pylint: disable=protected-access
        audio, audio_lengths, soft_token_counts
    )

  expected = model.apply(
      {'params': params},
      waveforms[None],
      lengths[None],
      counts,
      method=official_encode_audio,
  )

  soft_tokens, _ = encoder_lib.AudioEncoder(CONFIG).apply(
      {'params': official_params}, waveforms, lengths
  )
  ours = encoder_lib.project_audio_soft_tokens(
      encoder_lib.concatenate_audio_soft_tokens(soft_tokens, counts),
      projection,
  )

  assert_close_to_official(ours[None], expected)


def test_soft_token_count_mismatch_is_rejected():
  with pytest.raises(ValueError, match='1 soft-token counts for 2 clips'):
    encoder_lib.concatenate_audio_soft_tokens(jnp.zeros((2, 5, 3)), (5,))


def test_head_count_must_divide_width():
  with pytest.raises(ValueError, match='embed_dim 30 is not a multiple'):
    encoder_lib.AudioConfig(embed_dim=30, num_heads=4)
