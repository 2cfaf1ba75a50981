"""Audio in the decoder equals the official `gemma` 4.0.1 model.

A small random E2B-like model (per-layer inputs, KV sharing) with the small
conformer of `test_audio_encoder` reads a batch of two rows: three clips of
different lengths, two in the first row and one in the second. The logits
of the whole forward pass and of the cached prefill must equal the official
`apply` with the same clips.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import config as config_lib
from gemma4_jax.audio import features, merge
from gemma4_jax.sampling.cache import init_cache
from gemma4_jax.transformer import Transformer
from tests import oracle
from tests import test_audio_encoder
from tests.test_audio_features import chirp, noise
from tests.test_vision_model import assert_close, lively_params

CFG = dataclasses.replace(oracle.E2B_LIKE, audio=test_audio_encoder.CONFIG)
# Ids of `<|audio|>`, `<|audio>` and `<audio|>` in the toy vocabulary.
MARKS = {'audio_token': 500, 'start_of_audio': 501, 'end_of_audio': 502}


def official_model():
  from gemma.gm.nn.gemma4 import _gemma4

  official_config = dataclasses.replace(
      oracle.official_config(oracle.E2B_LIKE),
      audio_encoder=test_audio_encoder.official_conformer_config(),
  )
  return _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=official_config, dtype=jnp.float32, text_only=False
  )


def clip_batch() -> features.AudioBatch:
  return features.prepare_audio([chirp(0.5), noise(1.3, seed=3), chirp(0.9)])


def expanded_tokens(batch: features.AudioBatch) -> np.ndarray:
  """Two rows of equal length: clips 0 and 1 in row 0, clip 2 in row 1."""
  rng = np.random.default_rng(4)
  text = lambda n: list(rng.integers(3, 400, n))  # pylint: disable=unnecessary-lambda-assignment
  mark = MARKS['audio_token']
  rows = [
      [2, *text(5), mark, *text(3), mark, *text(4)],
      [2, *text(2), mark, *text(6)],
  ]
  counts = [batch.soft_token_counts[:2], batch.soft_token_counts[2:]]
  lengths = [len(r) + sum(c) + len(c) for r, c in zip(rows, counts)]
  # Text after the last clip evens out the rows, so that neither is padded.
  rows[1] += text(max(lengths) - lengths[1])
  rows[0] += text(max(lengths) - lengths[0])
  return np.concatenate([
      merge.expand_audio_placeholders(np.array([row]), [c], **MARKS)
      for row, c in zip(rows, counts)
  ])


def official_audio(batch: features.AudioBatch, clips: slice) -> dict:
  """Keyword arguments of the official `apply` for some clips of a batch."""
  row = features.prepare_audio(
      [w[:n] for w, n in zip(batch.waveforms[clips], batch.lengths[clips])]
  )
  return {
      'audio': jnp.asarray(row.waveforms)[None],
      'audio_lengths': jnp.asarray(row.lengths)[None],
      'audio_soft_token_counts': row.soft_token_counts,
  }


@functools.cache
def official_setup():
  """Our inputs, the parameters and the official logits [2, T, V].

  The official model takes the clips of one row per call, so each row runs
  alone there.
  """
  batch = clip_batch()
  tokens = expanded_tokens(batch)
  official = official_model()
  row_clips = (slice(0, 2), slice(2, 3))
  shapes = jax.eval_shape(
      lambda: official.init(
          jax.random.key(0),
          jnp.asarray(tokens[:1]),
          **official_audio(batch, row_clips[0]),
      )
  )['params']
  params = lively_params(shapes)
  # The conformer needs values in the ranges where each parameter matters.
  params['audio_encoder'] = test_audio_encoder.randomize(
      shapes['audio_encoder']
  )
  expected = [
      official.apply(
          {'params': params},
          jnp.asarray(tokens[row : row + 1]),
          **official_audio(batch, clips),
      ).logits[0]
      for row, clips in enumerate(row_clips)
  ]
  return batch, tokens, params, np.stack(expected)


def test_param_tree_matches_official():
  _, tokens, params, _ = official_setup()
  ours = jax.eval_shape(
      Transformer(config=CFG, dtype=jnp.float32).init,
      jax.random.key(0),
      jnp.asarray(tokens[:1, :8]),
  )['params']

  def describe(tree):
    return {
        path: tuple(leaf.shape)
        for path, leaf in flax.traverse_util.flatten_dict(tree).items()
    }

  assert describe(ours) == describe(params)
  assert 'audio_encoder' in ours
  assert 'audio_input_projection' in ours['embedder']


def test_logits_match_official():
  batch, tokens, params, expected = official_setup()
  model = Transformer(config=CFG, dtype=jnp.float32)
  out = jax.jit(model.apply)(
      {'params': params}, jnp.asarray(tokens), audio=batch.arrays()
  )
  assert np.abs(expected).max() > 1.0
  assert_close(out.logits, expected)

  # The audio changes the logits from the first soft token on.
  text_only = model.apply(
      {'params': params},
      jnp.where(tokens == merge.AUDIO_SOFT_TOKEN_PLACEHOLDER, 0, tokens),
  )
  first = int(np.argmax(tokens[0] == merge.AUDIO_SOFT_TOKEN_PLACEHOLDER))
  assert np.abs(np.asarray(text_only.logits[0, first]) - expected[0, first]).max() > 1e-2


def test_cached_prefill_matches_official():
  batch, tokens, params, expected = official_setup()
  model = Transformer(config=CFG, dtype=jnp.float32)
  cache = init_cache(CFG, 2, tokens.shape[1] + 8, jnp.float32)
  logits, cache = jax.jit(
      functools.partial(model.apply, method=Transformer.cached, mode='fresh')
  )({'params': params}, jnp.asarray(tokens), cache, audio=batch.arrays())
  assert_close(logits, expected[:, -1])
  np.testing.assert_array_equal(cache.lengths, [tokens.shape[1]] * 2)


def test_placeholder_count_must_match_clips():
  batch, tokens, params, _ = official_setup()
  model = Transformer(config=CFG, dtype=jnp.float32)
  with pytest.raises(ValueError, match='audio placeholders but the clips'):
    model.apply({'params': params}, jnp.asarray(tokens[:1]), audio=batch)


def test_model_without_audio_tower_rejects_audio():
  batch, tokens, _, _ = official_setup()
  model = Transformer(config=oracle.E2B_LIKE, dtype=jnp.float32)
  with pytest.raises(ValueError, match='no audio encoder'):
    model.init(jax.random.key(0), jnp.asarray(tokens), audio=batch)


def test_with_audio_only_for_e_presets():
  e2b = config_lib.with_audio(config_lib.get_preset('e2b'))
  assert e2b.audio == test_audio_encoder.encoder_lib.AudioConfig()
  with pytest.raises(ValueError, match="'31b' has no released audio tower"):
    config_lib.with_audio(config_lib.get_preset('31b'))


def test_empty_clip_is_rejected():
  with pytest.raises(ValueError, match='audio clip 1: .* has 0 samples'):
    features.prepare_audio([chirp(0.5), np.zeros((0,), np.float32)])
