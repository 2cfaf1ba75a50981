"""Fixed-length training rows: next-token examples, truncation, padding, packing.

An encoded example of N ids becomes a next-token example of N - 1 positions:
`tokens = ids[:-1]`, `targets = ids[1:]`, `loss_weights = weights[1:]`, so
position t predicts token t + 1 with the weight of that token. Targets are
computed before rows are filled, so neither a target nor its weight ever
belongs to another example.

A row [L] holds one example (padding mode) or several (packing mode):

- `tokens`, `targets` int32, 0 (`<pad>`) after the last example;
- `loss_weights` float32, 0.0 on padding;
- `segment_ids` int32, 1, 2, ... for the examples in the row, 0 on padding;
- `positions` int32, restarting at 0 for each example, 0 on padding.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

# Per-position features of an example and of a row, besides segment_ids and
# positions.
SEQUENCE_FEATURES = ('tokens', 'targets', 'loss_weights')
ROW_FEATURES = SEQUENCE_FEATURES + ('segment_ids', 'positions')

TRUNCATE = 'truncate'
DROP = 'drop'
OVERLONG_POLICIES = (TRUNCATE, DROP)


def next_token_example(ids: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  """Shift ids [N] and weights [N] into a next-token example of length N - 1."""
  ids = np.asarray(ids, np.int32)
  weights = np.asarray(weights, np.float32)
  if ids.shape != weights.shape or ids.ndim != 1:
    raise ValueError(f'ids {ids.shape} and weights {weights.shape} must be equal 1-D shapes')
  return {
      'tokens': ids[:-1],
      'targets': ids[1:],
      'loss_weights': weights[1:],
  }


def truncate_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Keep the first `seq_len` positions of each feature."""
  return {name: value[:seq_len] for name, value in example.items()}


def pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Place one example of length <= `seq_len` in a row [seq_len], padded with 0."""
  length = len(example['tokens'])
  if length > seq_len:
    raise ValueError(f'example of length {length} does not fit a row of {seq_len}; truncate it first')
  row = {}
  for name, value in example.items():
    row[name] = np.zeros((seq_len,), value.dtype)
    row[name][:length] = value
  row['segment_ids'] = np.zeros((seq_len,), np.int32)
  row['segment_ids'][:length] = 1
  row['positions'] = np.zeros((seq_len,), np.int32)
  row['positions'][:length] = np.arange(length, dtype=np.int32)
  return row


def _rename_packed_row(
    packed: dict[str, Any], features: tuple[str, ...] = SEQUENCE_FEATURES
) -> dict[str, np.ndarray]:
  # Grain gives each packed feature its own `{name}_segment_ids` and
  # `{name}_positions`. The features of one example have equal lengths, so
  # those of `tokens` serve for all.
  row = {name: packed[name] for name in features}
  row['segment_ids'] = packed['tokens_segment_ids'].astype(np.int32)
  row['positions'] = packed['tokens_positions'].astype(np.int32)
  return row


def pack_examples(
    examples: grain.IterDataset,
    *,
    seq_len: int,
    num_packing_bins: int,
    features: tuple[str, ...] = SEQUENCE_FEATURES,
) -> grain.IterDataset:
  """Pack next-token examples of length <= `seq_len` into rows [seq_len].

  Uses grain's first-fit packing: examples fill `num_packing_bins` rows in
  input order, each going to the first row with room, and the rows are
  emitted in order once an example fits none. The iterator state of the
  result restores the exact rows (grain replays from the parent state at
  the start of the current set of bins). `features` are the per-position
  features of each example.
  """
  packed = grain.experimental.FirstFitPackIterDataset(
      examples,
      length_struct={name: seq_len for name in features},
      num_packing_bins=num_packing_bins,
      shuffle_bins=False,
  )
  return packed.map(functools.partial(_rename_packed_row, features=features))
