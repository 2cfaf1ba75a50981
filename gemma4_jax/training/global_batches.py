"""Global train batches assembled from data shards, on one or many processes.

    batches = GlobalBatches(make_shard, batch_size=32, seq_len=2048,
                            num_shards=4, sharding=sharding)
    batch = next(batches)          # dict of [32, 2048] arrays
    state = batches.get_state()    # every shard's position (a collective)

A batch of B rows is the concatenation of `num_shards` S shard batches of
B / S rows: rows [s * B / S, (s + 1) * B / S) come from shard s, the
pipeline `make_shard(s)` (`data.make_dataset(..., shard_index=s,
shard_count=S)`). The batches therefore depend on S and never on the number
of processes, so a run on 2 hosts with S = 2 trains on the same batches as
a run on one host with S = 2.

With a `sharding`, each process builds only the pipelines of the shards
whose rows its own devices hold, and the batch arrays are global
`jax.Array`s made with `jax.make_array_from_callback`. Without one (a
single-device run) the batch is a dict of numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import numpy as np

from gemma4_jax.parallel import distributed
from gemma4_jax.training import data as data_lib
from gemma4_jax.training import loss as loss_lib

_MEDIA_KEYS = loss_lib.MEDIA_KEYS


def shards_of_devices(
    sharding: jax.sharding.Sharding,
    shape: tuple[int, ...],
    rows_per_shard: int,
) -> list[int]:
  """Return the shards whose rows this process's devices hold, in order."""
  shards = set()
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows = range(*index[0].indices(shape[0]))
    if len(rows):
      shards.update(range(rows[0] // rows_per_shard,
                          rows[-1] // rows_per_shard + 1))
  return sorted(shards)


class GlobalBatches:
  """Iterator of global batches [B, L] whose data position can be saved.

  Attributes:
    num_shards: Shards S of every batch.
    local_shards: The shards this process reads, in order.
  """

  def __init__(
      self,
      make_shard: Callable[[int], data_lib.TrainingDataset],
      *,
      batch_size: int,
      seq_len: int,
      num_shards: int,
      sharding: jax.sharding.Sharding | None,
  ):
    if num_shards < 1 or batch_size % num_shards:
      raise ValueError(
          f'data.batch_size={batch_size} is not divisible by data.num_shards='
          f'{num_shards}; every shard fills an equal part of each batch'
      )
    if sharding is None and jax.process_count() > 1:
      raise ValueError(
          f'a run of {jax.process_count()} processes needs a mesh; set'
          ' mesh.shape, for example fsdp=<number of devices>'
      )
    self.num_shards = num_shards
    self._rows_per_shard = batch_size // num_shards
    self._shape = (batch_size, seq_len)
    self._sharding = sharding
    if sharding is None:
      self.local_shards = list(range(num_shards))
    else:
      self.local_shards = shards_of_devices(
          sharding, self._shape, self._rows_per_shard
      )
    # NOTE: each pipeline reads and checks the whole training set, so a
    # process serving several shards reads it several times.
    self._iterators = {
        shard: iter(make_shard(shard)) for shard in self.local_shards
    }

  def __iter__(self) -> GlobalBatches:
    return self

  def __next__(self) -> dict[str, Any]:
    local = {shard: next(it) for shard, it in self._iterators.items()}
    first = local[self.local_shards[0]]
    for shard, batch in local.items():
      for key, value in batch.items():
        # Media arrays ([rows, slots, ...]) have their own trailing shape.
        expected = (self._rows_per_shard, self._shape[1])
        if key in _MEDIA_KEYS:
          expected = (self._rows_per_shard, *first[key].shape[1:])
        if value.shape != expected:
          raise ValueError(
              f'shard {shard} yielded {key!r} of shape {value.shape}, expected'
              f' {expected}'
          )
    if self._sharding is None:
      return {
          key: np.concatenate([local[s][key] for s in self.local_shards])
          for key in first
      }
    return {
        key: jax.make_array_from_callback(
            (self._shape[0], *first[key].shape[1:]),
            self._rows_sharding(first[key].ndim),
            functools.partial(self._rows, local, key),
        )
        for key in first
    }

  def _rows_sharding(self, ndim: int) -> jax.sharding.Sharding:
    """Return the batch sharding for an array of `ndim` axes, split by rows."""
    if ndim == 2:
      return self._sharding
    rows_axes = self._sharding.spec[0] if self._sharding.spec else None
    return jax.sharding.NamedSharding(
        self._sharding.mesh,
        jax.sharding.PartitionSpec(rows_axes, *([None] * (ndim - 1))),
    )

  def _rows(
      self, local: dict[int, dict[str, np.ndarray]], key: str, index
  ) -> np.ndarray:
    """Return the block `index` of the global array `key` from the shards."""
    rows = range(*index[0].indices(self._shape[0]))
    size = self._rows_per_shard
    pieces = []
    for shard in range(rows.start // size, (rows.stop - 1) // size + 1):
      start = max(rows.start, shard * size) - shard * size
      stop = min(rows.stop, (shard + 1) * size) - shard * size
      pieces.append(local[shard][key][start:stop])
    block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return block[(slice(None),) + tuple(index[1:])]

  def get_state(self) -> dict[str, Any]:
    """Return the position of every shard, gathered from all processes.

    A collective in a multi-process run: every process must call it at the
    same step, and every process gets the same state.
    """
    local = {
        str(shard): it.get_state() for shard, it in self._iterators.items()
    }
    merged: dict[str, Any] = {}
    for states in distributed.allgather_json(local):
      merged.update(states)
    return {
        'num_shards': self.num_shards,
        'shards': [merged[str(shard)] for shard in range(self.num_shards)],
    }

  def set_state(self, state: dict[str, Any]) -> None:
    """Continue after the position `get_state` returned.

    Also accepts the state of a single `data.BatchIterator`, which runs with
    one shard saved before batches were assembled from shards.

    Raises:
      ValueError: the state has another number of shards, or a shard's
        pipeline settings differ from those that saved it.
    """
    shards = [state] if 'grain' in state else state['shards']
    if len(shards) != self.num_shards:
      raise ValueError(
          f'the data position was saved with {len(shards)} data shards, but'
          f' this run has data.num_shards={self.num_shards}; resume with'
          f' --config.data.num_shards={len(shards)}'
      )
    for shard, iterator in self._iterators.items():
      iterator.set_state(shards[shard])
