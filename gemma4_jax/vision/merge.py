"""Placing image soft tokens in the text sequence.

The prompt marks each image with one `<|image|>` token. Before embedding,
each mark is expanded to `\\n\\n <|image> P ... P <image|> \\n\\n` with one
placeholder P (id -2, outside the vocabulary) per soft token of that image.
After embedding, the projected soft tokens replace the placeholder rows in
order. On 26B-A4B and 31B, the placeholders of one image also attend to each
other in both directions in sliding-window layers. `image_block_ids` numbers
those runs for the attention mask.

The steps follow the official `gemma` 4.0.1 functions
`gm.vision._token_utils.add_variable_extra_tokens_for_images` and
`merge_flat_embeddings`, and `gm.utils._attention_mask`.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOFT_TOKEN_PLACEHOLDER = -2


# Pieces of the Gemma 4 tokenizer that mark and frame an image, by the
# keyword of `expand_image_placeholders` that takes their id.
IMAGE_PIECES = {
    'image_token': '<|image|>',
    'start_of_image': '<|image>',
    'end_of_image': '<image|>',
    'double_newline': '\n\n',
}


def image_token_ids(tokenizer) -> dict[str, int]:
  """Ids of the image pieces, as keywords of `expand_image_placeholders`.

  Args:
    tokenizer: A `gemma4_jax.text.Tokenizer`. It raises
      `MissingSpecialTokenError` when it lacks a piece.
  """
  return {name: tokenizer.piece_id(piece) for name, piece in IMAGE_PIECES.items()}


def expand_image_placeholders(
    tokens: np.ndarray,
    soft_token_counts: Sequence[Sequence[int]],
    *,
    image_token: int,
    start_of_image: int,
    end_of_image: int,
    double_newline: int,
    pad_id: int = 0,
) -> np.ndarray:
  """Expand each image mark into its placeholder block.

  Args:
    tokens: [B, L] token ids, right-padded with `pad_id`.
    soft_token_counts: For each row, the soft-token count of each of its
      images in order of appearance.
    image_token: Id of `<|image|>`, the mark in the prompt.
    start_of_image: Id of `<|image>`.
    end_of_image: Id of `<image|>`.
    double_newline: Id of `\\n\\n`.
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
    marks = row.count(image_token)
    if marks != len(counts):
      raise ValueError(
          f'a row has {marks} image marks (id {image_token}) but'
          f' {len(counts)} soft-token counts. Pass one count per image'
      )
    expanded = []
    images = iter(counts)
    for token in row:
      if token != image_token:
        expanded.append(token)
        continue
      expanded += [double_newline, start_of_image]
      expanded += [SOFT_TOKEN_PLACEHOLDER] * next(images)
      expanded += [end_of_image, double_newline]
    rows.append(expanded)

  out = np.full((len(rows), max(map(len, rows))), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def merge_soft_embeddings(
    embeddings: jax.Array, tokens: jax.Array, soft_embeddings: jax.Array
) -> jax.Array:
  """Replace the placeholder rows of `embeddings` with soft embeddings.

  Args:
    embeddings: [B, T, D] token embeddings.
    tokens: [B, T] token ids with `SOFT_TOKEN_PLACEHOLDER` marking image rows.
    soft_embeddings: [B, S, D] each row's soft tokens in order. S must be at
      least the row's placeholder count, and soft tokens beyond it are unused.

  Returns:
    [B, T, D] in the dtype of `embeddings`.
  """
  is_placeholder = tokens == SOFT_TOKEN_PLACEHOLDER
  # The k-th placeholder of a row takes that row's k-th soft token.
  soft_index = jnp.cumsum(is_placeholder, axis=-1) - 1
  soft_index = jnp.clip(soft_index, 0, soft_embeddings.shape[1] - 1)
  gathered = jnp.take_along_axis(soft_embeddings, soft_index[..., None], axis=1)
  return jnp.where(
      is_placeholder[..., None], gathered.astype(embeddings.dtype), embeddings
  )


def image_block_ids(tokens: jax.Array) -> jax.Array:
  """Number the runs of placeholders of each row 1, 2, ... and other tokens 0.

  Returns:
    [B, T] int32. Two tokens attend to each other bidirectionally (in the
    sliding-window layers of 26B-A4B and 31B) when they have the same
    non-zero id.
  """
  is_placeholder = tokens == SOFT_TOKEN_PLACEHOLDER
  previous = jnp.pad(is_placeholder[:, :-1], ((0, 0), (1, 0)))
  starts = is_placeholder & ~previous
  return (jnp.cumsum(starts, axis=-1) * is_placeholder).astype(jnp.int32)
