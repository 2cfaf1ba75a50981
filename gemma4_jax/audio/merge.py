"""Placing audio soft tokens in the text sequence.

The prompt marks each clip with one `<|audio|>` token. Before embedding, each
mark is expanded to `<|audio> A ... A <audio|>` with one placeholder A (id -4,
outside the vocabulary) per soft token of that clip, and no blank lines
around it, unlike images. After embedding, the projected soft tokens
(`encoder.project_audio_soft_tokens`) replace the placeholder rows in order.
Audio placeholders attend causally, like text, in every model.

The steps follow the official `gemma` 4.0.1 functions
`gm.vision._token_utils.add_variable_extra_tokens_for_audio` and
`merge_flat_embeddings`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

AUDIO_SOFT_TOKEN_PLACEHOLDER = -4

# Pieces of the Gemma 4 tokenizer that mark and frame a clip, by the keyword
# of `expand_audio_placeholders` that takes their id.
AUDIO_PIECES = {
    'audio_token': '<|audio|>',
    'start_of_audio': '<|audio>',
    'end_of_audio': '<audio|>',
}


def audio_token_ids(tokenizer) -> dict[str, int]:
  """Return the audio pieces' ids, as keywords of `expand_audio_placeholders`.

  Args:
    tokenizer: A `gemma4_jax.text.Tokenizer`. It raises
      `MissingSpecialTokenError` when it lacks a piece.
  """
  return {
      name: tokenizer.piece_id(piece) for name, piece in AUDIO_PIECES.items()
  }


def expand_audio_placeholders(
    tokens: np.ndarray,
    soft_token_counts: Sequence[Sequence[int]],
    *,
    audio_token: int,
    start_of_audio: int,
    end_of_audio: int,
    pad_id: int = 0,
) -> np.ndarray:
  """Expand each audio mark into its placeholder block.

  Args:
    tokens: [B, L] token ids, right-padded with `pad_id`.
    soft_token_counts: For each row, the soft-token count of each of its
      clips in order of appearance (`features.num_soft_tokens`).
    audio_token: Id of `<|audio|>`, the mark in the prompt.
    start_of_audio: Id of `<|audio>`.
    end_of_audio: Id of `<audio|>`.
    pad_id: Id that pads rows to the same length.

  Returns:
    [B, L'] token ids, right-padded with `pad_id` to the longest row.
  """
  if len(soft_token_counts) != len(tokens):
    raise ValueError(
        f'soft_token_counts has {len(soft_token_counts)} rows but tokens has'
        f' {len(tokens)}. Pass one list of counts per row'
    )
  rows = []
  for row, counts in zip(np.asarray(tokens).tolist(), soft_token_counts):
    marks = row.count(audio_token)
    if marks != len(counts):
      raise ValueError(
          f'a row has {marks} audio marks (id {audio_token}) but'
          f' {len(counts)} soft-token counts. Pass one count per clip'
      )
    expanded = []
    clips = iter(counts)
    for token in row:
      if token != audio_token:
        expanded.append(token)
        continue
      expanded.append(start_of_audio)
      expanded += [AUDIO_SOFT_TOKEN_PLACEHOLDER] * next(clips)
      expanded.append(end_of_audio)
    rows.append(expanded)

  out = np.full((len(rows), max(map(len, rows))), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def merge_audio_embeddings(
    embeddings: jax.Array, tokens: jax.Array, audio_embeddings: jax.Array
) -> jax.Array:
  """Replace the audio placeholder rows of `embeddings` with audio embeddings.

  Args:
    embeddings: [B, T, E] token embeddings.
    tokens: [B, T] token ids with `AUDIO_SOFT_TOKEN_PLACEHOLDER` at audio rows.
    audio_embeddings: [B, S, E] each row's projected soft tokens in order. S
      must be at least the row's placeholder count, and the rest are unused.

  Returns:
    [B, T, E] in the dtype of `embeddings`.
  """
  is_placeholder = tokens == AUDIO_SOFT_TOKEN_PLACEHOLDER
  # The k-th placeholder of a row takes that row's k-th soft token.
  index = jnp.cumsum(is_placeholder, axis=-1) - 1
  index = jnp.clip(index, 0, audio_embeddings.shape[1] - 1)
  gathered = jnp.take_along_axis(audio_embeddings, index[..., None], axis=1)
  return jnp.where(
      is_placeholder[..., None], gathered.astype(embeddings.dtype), embeddings
  )
