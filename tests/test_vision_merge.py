"""Soft-token placement equals the official `gemma` 4.0.1 token utilities."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.vision import merge


def _official_special_tokens():
  from gemma.gm.text import _tokenizer

  return _tokenizer.Gemma4Tokenizer.special_tokens


def _expand_ids():
  special = _official_special_tokens()
  return dict(
      image_token=special.IMAGE_PLACEHOLDER,
      start_of_image=special.START_OF_IMAGE,
      end_of_image=special.END_OF_IMAGE,
      double_newline=108,
  )


def _prompts() -> np.ndarray:
  """Two right-padded rows with two image marks each."""
  mark = _official_special_tokens().IMAGE_PLACEHOLDER
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
  expected = _token_utils.add_variable_extra_tokens_for_images(
      tokens, soft_token_counts=counts
  )
  ours = merge.expand_image_placeholders(
      tokens, [counts, counts], **_expand_ids()
  )

  np.testing.assert_array_equal(ours, expected)


def test_expansion_per_row_counts():
  tokens = _prompts()
  ours = merge.expand_image_placeholders(
      tokens, [[1, 2], [4, 1]], **_expand_ids()
  )
  placeholders = (ours == merge.SOFT_TOKEN_PLACEHOLDER).sum(axis=1)
  assert placeholders.tolist() == [3, 5]


def test_expansion_count_mismatch_rejected():
  with pytest.raises(ValueError, match='one count per image'):
    merge.expand_image_placeholders(_prompts(), [[1], [1, 2]], **_expand_ids())


def test_merge_matches_official():
  from gemma.gm.vision import _token_utils

  tokens = merge.expand_image_placeholders(
      _prompts(), [[3, 5], [3, 5]], **_expand_ids()
  )
  rng = np.random.default_rng(0)
  embeddings = jnp.asarray(
      rng.standard_normal((*tokens.shape, 6)), jnp.bfloat16
  )
  soft = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)

  expected = _token_utils.merge_flat_embeddings(
      text_embeddings=embeddings,
      # The official scatter casts to the embedding dtype too, with a warning.
      multimodal_embeddings=soft.astype(jnp.bfloat16),
      mask=jnp.asarray(tokens == merge.SOFT_TOKEN_PLACEHOLDER),
  )
  ours = merge.merge_soft_embeddings(embeddings, jnp.asarray(tokens), soft)

  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(ours, np.float32), np.asarray(expected, np.float32)
  )


def test_bidirectional_mask_matches_official():
  from gemma.gm.utils import _attention_mask

  tokens = jnp.asarray(
      merge.expand_image_placeholders(
          _prompts(), [[3, 5], [2, 4]], **_expand_ids()
      )
  )
  valid = tokens != 0

  expected = _attention_mask.make_causal_bidirectional_attention_mask(
      valid, bidirectional_mask=tokens == merge.SOFT_TOKEN_PLACEHOLDER
  )

  blocks = merge.image_block_ids(tokens)
  length = tokens.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))[None] & valid[:, None, :]
  same_image = (blocks[:, :, None] == blocks[:, None, :]) & (
      blocks[:, :, None] > 0
  )
  np.testing.assert_array_equal(causal | same_image, expected)
  assert int(blocks.max()) == 2
