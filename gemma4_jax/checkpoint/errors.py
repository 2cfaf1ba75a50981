"""Errors raised while reading, validating and writing checkpoints.

Each error subclasses `CheckpointError` (a `ValueError`) so that callers can
catch every checkpoint problem at once. Messages name the path or parameter
key, the values found and expected, and what to do next.
"""

from __future__ import annotations


class CheckpointError(ValueError):
  """Base class of the checkpoint errors of this package."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist or contains no Orbax checkpoint."""


class IncompleteCheckpointError(CheckpointError):
  """The checkpoint lacks metadata or array data, or a save was interrupted."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint's parameters do not fit the requested config.

  Attributes:
    missing: Parameter keys the config expects but the checkpoint lacks.
    unexpected: Parameter keys the checkpoint has but the config does not
      expect.
    wrong_shapes: `(key, found_shape, expected_shape)` for each parameter
      whose shape differs.
  """

  def __init__(
      self,
      message: str,
      *,
      missing: tuple[str, ...] = (),
      unexpected: tuple[str, ...] = (),
      wrong_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (),
  ):
    super().__init__(message)
    self.missing = missing
    self.unexpected = unexpected
    self.wrong_shapes = wrong_shapes


class UnknownVariantError(CheckpointError):
  """No preset fits the checkpoint and no custom config can be built."""


class UnsupportedCheckpointError(CheckpointError):
  """The checkpoint is not a Gemma 4 parameter tree (for example Gemma 3)."""
