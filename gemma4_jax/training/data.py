"""The fine-tuning input pipeline: JSONL files to fixed-shape numpy batches.

    dataset = make_dataset('train.jsonl', tokenizer, seq_len=2048, batch_size=8, seed=0)
    batches = iter(dataset)
    batch = next(batches)        # dict of numpy arrays [8, 2048]
    state = batches.get_state()  # JSON-serialisable dict, saved with the model
    ...
    batches = iter(dataset)
    batches.set_state(state)     # continues with exactly the next batch

Steps, in order (grain `MapDataset`, then `IterDataset`):

1. read and check every line (`records.read_jsonl`);
2. keep this process's shard: records `shard_index, shard_index +
   shard_count, ...` of the files' order;
3. shuffle the shard with `seed`, a new order in every epoch, and repeat
   for `num_epochs` (forever when None);
4. encode each record with loss weights and shift it into a next-token
   example (`packing.next_token_example`);
5. truncate or drop examples longer than `seq_len`, and drop examples
   with no weighted token;
6. pack several examples into each row (`packing=True`) or pad each
   example to a row of its own;
7. batch rows; a last, partial batch is padded with empty rows (all
   weights 0) unless `drop_remainder`.

A batch is a dict of numpy arrays [batch_size, seq_len]: `tokens`,
`targets` (int32), `loss_weights` (float32), `positions`, `segment_ids`
(int32), as described in `gemma4_jax.training.packing`. Feed `positions`,
`segment_ids` and `input_mask = segment_ids != 0` to `Transformer`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import media as media_lib
from gemma4_jax.training import packing as packing_lib
from gemma4_jax.training import records as records_lib

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Settings that decide which batches a pipeline yields, in which order.

  A saved iterator state is only valid for a pipeline with equal settings.
  """

  seq_len: int
  batch_size: int
  packing: bool
  seed: int
  shuffle: bool
  num_epochs: int | None
  shard_index: int
  shard_count: int
  overlong: str
  drop_remainder: bool
  num_packing_bins: int
  num_records: int
  media: media_lib.MediaConfig | None = None


class LengthStats:
  """Counts of examples seen, truncated and dropped, logged as they grow.

  A count is logged when it reaches a power of two, so a log stays short
  however many examples are affected. The counts cover every iterator of
  the dataset since it was built, not the examples before a restored state.
  """

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self.seen = 0
    self.truncated = 0
    self.dropped_overlong = 0
    self.dropped_unweighted = 0

  def _log(self, count: int, event: str) -> None:
    if count & (count - 1) == 0:
      logging.info(
          '%s %d of the %d examples seen so far (seq_len=%d positions)',
          event, count, self.seen, self.seq_len,
      )

  def count_truncated(self) -> None:
    self.truncated += 1
    self._log(self.truncated, 'truncated longer than seq_len:')

  def count_dropped_overlong(self) -> None:
    self.dropped_overlong += 1
    self._log(self.dropped_overlong, 'dropped longer than seq_len:')

  def count_dropped_unweighted(self) -> None:
    self.dropped_unweighted += 1
    self._log(self.dropped_unweighted, 'dropped with no weighted token after truncation:')


def _fit_length(
    example: dict[str, np.ndarray], *, seq_len: int, overlong: str, stats: LengthStats
) -> dict[str, np.ndarray] | None:
  """Truncate or drop an example longer than `seq_len`; None drops it."""
  stats.seen += 1
  if len(example['tokens']) > seq_len:
    # Cutting into the media's placeholders would leave an image or clip
    # without all its soft tokens, so such an example is dropped.
    cuts_media = np.any(example['tokens'][seq_len:] < 0) or np.any(
        example['targets'][seq_len - 1 :] < 0
    )
    if overlong == packing_lib.DROP or cuts_media:
      stats.count_dropped_overlong()
      return None
    example = packing_lib.truncate_example(example, seq_len)
    stats.count_truncated()
  if not np.any(example['loss_weights'] > 0):
    stats.count_dropped_unweighted()
    return None
  return example


class BatchIterator:
  """Iterator of batches whose position can be saved and restored.

  `get_state()` returns a JSON-serialisable dict. After `set_state(state)`,
  an iterator of a pipeline with an equal `DataConfig` yields the batches
  that followed the saved position.
  """

  def __init__(self, grain_iterator: grain.DatasetIterator, config: DataConfig):
    self._iterator = grain_iterator
    self._config = config

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {
        'version': _STATE_VERSION,
        'config': dataclasses.asdict(self._config),
        'grain': self._iterator.get_state(),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Restore a position saved by `get_state`.

    Raises:
      ValueError: the state comes from another version or another pipeline
        configuration, whose batches would differ.
    """
    if state.get('version') != _STATE_VERSION:
      raise ValueError(
          f'data iterator state has version {state.get("version")!r}, expected'
          f' {_STATE_VERSION}; it was saved by another version of gemma4_jax'
      )
    saved = state['config']
    current = dataclasses.asdict(self._config)
    differences = {
        key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value
    }
    if differences:
      details = ', '.join(f'{k}: saved {s!r}, now {c!r}' for k, (s, c) in differences.items())
      raise ValueError(
          f'data iterator state was saved by a pipeline with other settings'
          f' ({details}); restore with the settings of the saved run'
      )
    self._iterator.set_state(state['grain'])


@dataclasses.dataclass(frozen=True)
class TrainingDataset:
  """A configured pipeline; `iter()` starts a new `BatchIterator`.

  Attributes:
    dataset: The grain dataset of batches.
    config: The settings that decide its batches.
    stats: Truncation and drop counts, shared by all its iterators.
  """

  dataset: grain.IterDataset
  config: DataConfig
  stats: LengthStats

  def __iter__(self) -> BatchIterator:
    return BatchIterator(iter(self.dataset), self.config)


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None:
    shard_index = jax.process_index()
  if shard_count is None:
    shard_count = jax.process_count()
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(
        f'shard_index={shard_index} must be in [0, shard_count={shard_count})'
    )
  return shard_index, shard_count


def batch_examples(
    examples: grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = True,
    overlong: str = packing_lib.TRUNCATE,
    drop_remainder: bool = False,
    num_packing_bins: int | None = None,
    stats: LengthStats | None = None,
    features: tuple[str, ...] = packing_lib.SEQUENCE_FEATURES,
) -> grain.IterDataset:
  """Turn next-token examples into batches (steps 5 to 7 of the module doc).

  Args:
    examples: Dicts of `packing.SEQUENCE_FEATURES`, each [N] for N >= 1.
    seq_len: Row length L.
    batch_size: Rows per batch B.
    packing: Pack several examples per row; else one example per row.
    overlong: 'truncate' keeps the first `seq_len` positions of a longer
      example; 'drop' skips it.
    drop_remainder: Drop a last batch of fewer than `batch_size` rows
      instead of padding it with empty rows.
    num_packing_bins: Rows filled at once by first-fit packing; more rows
      waste less padding but mix examples from further apart. Defaults to
      `batch_size`.
    stats: Receives the truncation and drop counts.
    features: The per-position features of each example.

  Returns:
    A dataset of batch dicts [B, L].
  """
  if overlong not in packing_lib.OVERLONG_POLICIES:
    raise ValueError(f'overlong={overlong!r} is not supported; use "truncate" or "drop"')
  stats = stats or LengthStats(seq_len)
  fit = functools.partial(_fit_length, seq_len=seq_len, overlong=overlong, stats=stats)

  # The counting runs in the consumer's thread, after any prefetching.
  rows = examples.to_iter_dataset().map(fit).filter(lambda example: example is not None)
  if packing:
    rows = packing_lib.pack_examples(
        rows,
        seq_len=seq_len,
        num_packing_bins=num_packing_bins or batch_size,
        features=features,
    )
  else:
    rows = rows.map(functools.partial(packing_lib.pad_example, seq_len=seq_len))

  if drop_remainder:
    return rows.batch(batch_size, drop_remainder=True)
  return rows.batch(
      batch_size,
      batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size),
  )


def make_dataset(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    packing: bool = True,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    source: str = 'auto',
    overlong: str = packing_lib.TRUNCATE,
    drop_remainder: bool = False,
    num_packing_bins: int | None = None,
    media: media_lib.MediaConfig | None = None,
) -> TrainingDataset:
  """Build the batch pipeline over JSONL training files.

  Args:
    path: A JSONL file, a directory of `*.jsonl` files, a glob pattern, or a
      list of these.
    tokenizer: The Gemma 4 tokenizer.
    seq_len: Positions per row L.
    batch_size: Rows per batch B on this process.
    seed: Seed of the example order; every epoch has its own order.
    packing: Pack several examples per row; else pad each to its own row.
    shuffle: Shuffle the examples; else keep the files' order.
    num_epochs: Passes over the data; None repeats forever.
    shard_index: This process's shard; defaults to `jax.process_index()`.
    shard_count: Number of shards; defaults to `jax.process_count()`.
    source: 'auto' (each line's kind from its keys), 'chat', 'text' or
      'prompt_response'.
    overlong: 'truncate' (keep the first `seq_len` positions) or 'drop' for
      examples longer than `seq_len`; both are counted in the log.
    drop_remainder: Drop a last partial batch instead of padding it.
    num_packing_bins: Rows filled at once when packing; defaults to
      `batch_size`.
    media: Read the image and audio parts of conversations (see
      `training.media`); each batch then also holds the media arrays of its
      rows. Without it, media parts are rejected.

  Returns:
    A `TrainingDataset`; `iter()` on it gives a `BatchIterator`.

  NOTE: with `num_epochs` set, shards of unequal size (or packing into
  unequal numbers of rows) give processes unequal numbers of batches, so a
  multi-host loop should stop after a fixed number of steps.
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be positive')
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)

  records = records_lib.read_jsonl(path, source=source)
  if len(records) < shard_count:
    raise ValueError(
        f'{len(records)} examples cannot fill {shard_count} shards; add data'
        ' or use fewer shards'
    )
  logging.info(
      'read %d examples from %s; shard %d of %d', len(records), path, shard_index, shard_count
  )

  features = packing_lib.SEQUENCE_FEATURES
  if media is None:
    examples = grain.MapDataset.source(records)[shard_index::shard_count]
  else:
    # Record indices travel with the tokens, so that packed rows can find
    # the media of their examples.
    features += (media_lib.EXAMPLE_IDS,)
    examples = grain.MapDataset.range(len(records))[shard_index::shard_count]
  if shuffle:
    examples = examples.shuffle(seed=seed)
  examples = examples.repeat(num_epochs)
  if media is None:
    examples = examples.map(
        lambda record: packing_lib.next_token_example(
            *_encode_text_only(record, tokenizer)
        )
    )
  else:
    examples = examples.map(
        functools.partial(
            _encode_with_media, records=records, tokenizer=tokenizer,
            media=media,
        )
    )

  config = DataConfig(
      seq_len=seq_len,
      batch_size=batch_size,
      packing=packing,
      seed=seed,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_index=shard_index,
      shard_count=shard_count,
      overlong=overlong,
      drop_remainder=drop_remainder,
      num_packing_bins=(num_packing_bins or batch_size) if packing else 0,
      num_records=len(records),
      media=media,
  )
  stats = LengthStats(seq_len)
  batches = batch_examples(
      examples,
      seq_len=seq_len,
      batch_size=batch_size,
      packing=packing,
      overlong=overlong,
      drop_remainder=drop_remainder,
      num_packing_bins=num_packing_bins,
      stats=stats,
      features=features,
  )
  if media is not None:
    batches = batches.map(
        functools.partial(media_lib.attach_media, records=records, config=media)
    )
  return TrainingDataset(batches, config, stats)


def _encode_text_only(
    record: records_lib.Record, tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
  ids, weights = records_lib.encode_record(record, tokenizer)
  marks = [
      mark
      for mark in (
          tokenizer.special.image_placeholder,
          tokenizer.special.audio_placeholder,
      )
      if mark is not None
  ]
  if record.kind == records_lib.CHAT and np.isin(ids, marks).any():
    raise records_lib.DataFormatError(
        f'{record.location}: the example has image or audio parts; pass'
        ' media=MediaConfig(...) to make_dataset to train with them'
    )
  return ids, weights


def _encode_with_media(
    index: int,
    *,
    records: Sequence[records_lib.Record],
    tokenizer: Tokenizer,
    media: media_lib.MediaConfig,
) -> dict[str, np.ndarray]:
  record = records[index]
  ids, weights = records_lib.encode_record(record, tokenizer)
  try:
    ids, weights = media_lib.encode_media(
        record.data, record.path, ids, weights, tokenizer, media
    )
  except (OSError, ValueError) as error:
    raise records_lib.DataFormatError(
        f'{record.location}: {error}'
    ) from error
  example = packing_lib.next_token_example(ids, weights)
  example[media_lib.EXAMPLE_IDS] = np.full(
      len(example['tokens']), index + 1, np.int32
  )
  return example
