"""Audio soft-token placement equals the official `gemma` 4.0.1 helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.audio import merge


def _official_special_tokens():
  from gemma.gm.text import _tokenizer

  return _tokenizer.Gemma4Tokenizer.special_tokens


def _expand_ids():
  special = _official_special_tokens()
  return dict(
      audio_token=special.AUDIO_PLACEHOLDER,
      start_of_audio=special.START_OF_AUDIO,
      end_of_audio=special.END_OF_AUDIO,
  )


def _prompts() -> np.ndarray:
  """Two right-padded rows with two audio marks each."""
  mark = _official_special_tokens().AUDIO_PLACEHOLDER
  return np.array(
      [
          [2, 10, mark, 11, 12, mark, 13, 0, 0],
          [2, mark, 14, mark, 15, 16, 17, 18, 19],
      ],
      np.int32,
  )


def test_expansion_matches_official():
  from gemma.gm.vision import _token_utils

  tokens, counts = _prompts(), [3, 5]

  # The official function applies the same counts to every row.
  expected = _token_utils.add_variable_extra_tokens_for_audio(
      tokens, soft_token_counts=counts
  )
  ours = merge.expand_audio_placeholders(
      tokens, [counts, counts], **_expand_ids()
  )

  np.testing.assert_array_equal(ours, expected)


def test_expansion_uses_each_rows_counts():
  special = _official_special_tokens()
  tokens = _prompts()

  ours = merge.expand_audio_placeholders(
      tokens, [[1, 2], [4, 1]], **_expand_ids()
  )

  a = merge.AUDIO_SOFT_TOKEN_PLACEHOLDER
  start, end = special.START_OF_AUDIO, special.END_OF_AUDIO
  np.testing.assert_array_equal(
      ours[0, :12], [2, 10, start, a, end, 11, 12, start, a, a, end, 13]
  )
  assert (ours[1] == a).sum() == 5


def test_mark_count_mismatch_is_rejected():
  with pytest.raises(ValueError, match='2 audio marks .* 1 soft-token counts'):
    merge.expand_audio_placeholders(_prompts(), [[1], [1, 2]], **_expand_ids())


def test_row_count_mismatch_is_rejected():
  with pytest.raises(ValueError, match='1 rows but tokens has 2'):
    merge.expand_audio_placeholders(_prompts(), [[1, 2]], **_expand_ids())


def test_merge_matches_official():
  from gemma.gm.vision import _token_utils

  tokens = merge.expand_audio_placeholders(
      _prompts()[:1], [[3, 5]], **_expand_ids()
  )
  embeddings = jax.random.normal(jax.random.key(0), tokens.shape + (6,))
  audio = jax.random.normal(jax.random.key(1), (1, 8, 6))

  expected = _token_utils.merge_flat_embeddings(
      text_embeddings=embeddings,
      multimodal_embeddings=audio,
      mask=jnp.asarray(tokens) == merge.AUDIO_SOFT_TOKEN_PLACEHOLDER,
  )
  ours = merge.merge_audio_embeddings(embeddings, jnp.asarray(tokens), audio)

  np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))
