"""Training metrics written to a JSONL file and to TensorBoard event files.

    writer = MetricWriter(workdir, resume_step=0)
    writer.write(step, {'loss': 2.31, 'learning_rate': 1e-4})
    writer.close()

`metrics.jsonl` contains one JSON object per write, `{"step": ..., name:
value, ...}`. `tensorboard/events.out.tfevents.*` holds the same scalars for
`tensorboard --logdir WORKDIR/tensorboard`. The event files are written here
(TFRecord framing of `Event` protocol buffers), so training needs neither
TensorFlow nor the tensorboard package.

A run that resumes from a checkpoint at step k passes `resume_step=k`: the
JSONL file is rewritten without the records of steps after k (the killed
run's steps that are about to run again), so the file reads as one
uninterrupted run. TensorBoard shows the newest event of a step.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """Return the CRC-32C (Castagnoli) checksum of `data`."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  """Return the checksum as TFRecord stores it (rotated and offset)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Mapping[str, float] | None = None,
) -> bytes:
  """Serialise a `tensorflow.Event` with a file version or scalar values.

  Fields: Event.wall_time = 1 (double), step = 2 (int64), file_version = 3
  (string), summary = 5 (Summary); Summary.value = 1 (repeated Value);
  Value.tag = 1 (string), simple_value = 2 (float).
  """
  out = _field(1, 1) + struct.pack('<d', wall_time)
  out += _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    summary = b''
    for tag, value in scalars.items():
      entry = _length_delimited(1, tag.encode())
      entry += _field(2, 5) + struct.pack('<f', value)
      summary += _length_delimited(1, entry)
    out += _length_delimited(5, summary)
  return out


def _tfrecord(payload: bytes) -> bytes:
  length = struct.pack('<Q', len(payload))
  return (
      length
      + struct.pack('<I', _masked_crc(length))
      + payload
      + struct.pack('<I', _masked_crc(payload))
  )


class EventFileWriter:
  """Appends scalar summaries to a new TensorBoard event file in `directory`."""

  def __init__(self, directory: str | os.PathLike[str]):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = directory / name
    self._file = open(self.path, 'ab')
    self._file.write(_tfrecord(_event(time.time(), 0, file_version='brain.Event:2')))
    self._file.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._file.write(_tfrecord(_event(time.time(), step, scalars=scalars)))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _to_python(value) -> float | int | str:
  if isinstance(value, (str, int)):
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f'metric values must be scalars, got shape {array.shape}')
  item = array.item()
  return float(item) if isinstance(item, float) else item


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict]:
  """Return the records of `WORKDIR/metrics.jsonl`, oldest first."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes each step's scalar metrics to `metrics.jsonl` and TensorBoard.

  Only process 0 of a multi-process run should create one.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, resume_step: int = 0):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.jsonl_path = workdir / METRICS_FILE
    kept = [r for r in read_metrics(workdir) if r.get('step', 0) <= resume_step]
    tmp_path = self.jsonl_path.with_suffix('.jsonl.tmp')
    with open(tmp_path, 'w') as f:
      for record in kept:
        f.write(json.dumps(record) + '\n')
    os.replace(tmp_path, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, 'a')
    self._events = EventFileWriter(workdir / TENSORBOARD_DIR)

  def write(self, step: int, metrics: Mapping[str, object]) -> None:
    """Append `metrics` (scalars: floats, ints, numpy or JAX values) of `step`."""
    record = {'step': int(step)}
    record.update({name: _to_python(value) for name, value in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    numbers = {
        name: float(value)
        for name, value in record.items()
        if name != 'step' and isinstance(value, (int, float))
    }
    if numbers:
      self._events.write_scalars(int(step), numbers)

  def close(self) -> None:
    self._jsonl.close()
    self._events.close()
