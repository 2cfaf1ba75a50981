"""Locating an Orbax checkpoint on disk and reading its metadata.

Reads only the small metadata files, never array data, so everything here is
fast for checkpoints of any size.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from gemma4_jax.checkpoint.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    UnsupportedCheckpointError,
)

logger = logging.getLogger(__name__)

# Orbax's PyTree metadata: the tree structure with every array's shape and
# dtype. Loading cannot work without it.
METADATA_FILE = '_METADATA'
# Orbax's step metadata. Orbax 0.12 creates it with the temporary directory
# and adds the commit time when the save completes. It is not required:
# checkpoints written by older Orbax versions may lack it and still load.
CHECKPOINT_METADATA_FILE = '_CHECKPOINT_METADATA'
REQUIRED_FILES = (METADATA_FILE,)
# Orbax saves into `<name>.orbax-checkpoint-tmp...` and renames it to `<name>`
# on success, so a directory with this in its name is an unfinished save.
TMP_DIR_MARKER = '.orbax-checkpoint-tmp'
TOKENIZER_FILE = 'tokenizer.model'

# Fragments of tensorstore messages about missing or unreadable array data
# (as opposed to a programming error in the caller).
_DATA_ERROR_MARKERS = ('NOT_FOUND', 'DATA_LOSS', 'Error reading', 'Error opening')
_ARRAY_NAME_RE = re.compile(r'"([^"]+?)/(?:\.zarray|zarr\.json|[\d.]+)"')
_LOCAL_FILE_RE = re.compile(r'local file "([^"]+)"')
_STATUS_RE = re.compile(r'\b([A-Z][A-Z_]{4,})\b')

# Search depth, in directory levels below the given path, for the Orbax
# directory. A Kaggle download contains it one level down, next to
# `tokenizer.model`.
_SEARCH_DEPTH = 2


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
  """Locations of the parts of a checkpoint.

  Attributes:
    path: The path the caller gave.
    orbax_dir: The Orbax checkpoint directory (contains `_METADATA`).
    tokenizer: `tokenizer.model` inside or beside the Orbax directory, else
      None.
  """

  path: Path
  orbax_dir: Path
  tokenizer: Path | None


def _is_tmp_dir(path: Path) -> bool:
  return TMP_DIR_MARKER in path.name


def _looks_like_orbax_dir(path: Path) -> bool:
  markers = (*REQUIRED_FILES, 'manifest.ocdbt')
  return any((path / marker).exists() for marker in markers)


def _interrupted_saves(path: Path) -> list[Path]:
  """List the temporary directories that an unfinished save to `path` left."""
  if not path.parent.is_dir():
    return []
  pattern = glob.escape(str(path)) + TMP_DIR_MARKER + '*'
  return sorted(Path(p) for p in glob.glob(pattern))


def _candidate_dirs(root: Path) -> tuple[list[Path], list[Path]]:
  """List Orbax directories and unfinished-save directories below `root`."""
  complete, unfinished = [], []
  frontier = [root]
  for _ in range(_SEARCH_DEPTH):
    next_frontier = []
    for directory in frontier:
      for child in sorted(directory.iterdir()):
        if not child.is_dir():
          continue
        if _is_tmp_dir(child):
          unfinished.append(child)
        elif _looks_like_orbax_dir(child):
          complete.append(child)
        else:
          next_frontier.append(child)
    frontier = next_frontier
  return complete, unfinished


def _find_orbax_dir(path: Path) -> Path:
  if _looks_like_orbax_dir(path):
    return path

  complete, unfinished = _candidate_dirs(path)
  if len(complete) == 1:
    logger.info('using the Orbax checkpoint %s found inside %s', complete[0], path)
    return complete[0]
  if len(complete) > 1:
    listing = ', '.join(str(p) for p in complete)
    raise CheckpointNotFoundError(
        f'{path} contains several Orbax checkpoints ({listing}); pass one of'
        ' them'
    )
  if unfinished:
    raise IncompleteCheckpointError(
        f'checkpoint {path} is incomplete: it contains only {unfinished[0]}, the'
        ' temporary directory of an Orbax save that did not finish. Delete it'
        ' and save again, or check the path'
    )
  entries = sorted(p.name for p in path.iterdir())
  listed = ', '.join(entries[:10]) + (' ...' if len(entries) > 10 else '')
  raise IncompleteCheckpointError(
      f'{path} is not a complete Orbax checkpoint: {METADATA_FILE} is'
      f' missing there and in its subdirectories (it contains: {listed or "nothing"}). Check the path,'
      ' or download or save the checkpoint again'
  )


def _check_required_files(orbax_dir: Path) -> None:
  missing = [name for name in REQUIRED_FILES if not (orbax_dir / name).is_file()]
  if missing:
    raise IncompleteCheckpointError(
        f'checkpoint {orbax_dir} is incomplete or corrupt: missing'
        f' {", ".join(missing)}, which Orbax writes for every saved'
        ' checkpoint. Download or save the checkpoint again'
    )


def resolve_checkpoint(path: str | os.PathLike[str]) -> CheckpointFiles:
  """Find the Orbax directory and tokenizer of a checkpoint path.

  `path` may be the Orbax directory itself or a directory that contains it
  (up to two levels down), as in a Kaggle download where `tokenizer.model`
  sits beside the Orbax directory.

  Raises:
    CheckpointNotFoundError: `path` does not exist or is ambiguous.
    IncompleteCheckpointError: no complete Orbax checkpoint is there (missing
      metadata files, or only the temporary directory of an interrupted save).
  """
  path = Path(path).expanduser()
  if not path.exists():
    leftovers = _interrupted_saves(path)
    if leftovers:
      raise IncompleteCheckpointError(
          f'checkpoint {path} does not exist, but {leftovers[0]} does: a save'
          ' to this path did not finish. Delete the temporary directory and'
          ' save again'
      )
    raise CheckpointNotFoundError(
        f'checkpoint path {path} does not exist; check the path'
    )
  if not path.is_dir():
    raise CheckpointNotFoundError(
        f'checkpoint path {path} is a file; pass the Orbax checkpoint'
        f' directory (the one that contains {METADATA_FILE}) or the directory'
        ' above it'
    )
  if _is_tmp_dir(path):
    raise IncompleteCheckpointError(
        f'{path} is the temporary directory of an Orbax save that did not'
        ' finish, so its checkpoint is incomplete; save again'
    )

  orbax_dir = _find_orbax_dir(path)
  _check_required_files(orbax_dir)

  tokenizer = None
  for directory in (orbax_dir, orbax_dir.parent, path):
    if (directory / TOKENIZER_FILE).is_file():
      tokenizer = directory / TOKENIZER_FILE
      break
  return CheckpointFiles(path=path, orbax_dir=orbax_dir, tokenizer=tokenizer)


def _to_shape_dtype(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  abstract = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else key
    if isinstance(value, Mapping):
      abstract[key] = _to_shape_dtype(value, path)
    elif hasattr(value, 'shape') and hasattr(value, 'dtype'):
      abstract[key] = jax.ShapeDtypeStruct(
          tuple(value.shape), np.dtype(value.dtype)
      )
    else:
      raise UnsupportedCheckpointError(
          f'checkpoint entry {path!r} is a {type(value).__name__}, not an'
          ' array; a Gemma parameter checkpoint contains arrays only'
      )
  return abstract


def _error_chain_text(error: BaseException) -> str:
  """Join the messages of `error` and of the errors that caused it."""
  messages = []
  while error is not None and len(messages) < 10:
    messages.append(str(error))
    error = error.__cause__ or error.__context__
  return '\n'.join(messages)


def describe_data_error(error: BaseException) -> str | None:
  """Describe a failure to read array data, or None for other errors.

  Orbax 0.12.8 reports a missing or truncated data file through tensorstore
  messages, sometimes wrapped in a bare `Exception`. The description names
  the array and the file that these messages mention.
  """
  message = _error_chain_text(error)
  if not any(marker in message for marker in _DATA_ERROR_MARKERS):
    return None

  array = _ARRAY_NAME_RE.search(message)
  data_files = [
      f for f in _LOCAL_FILE_RE.findall(message) if not f.endswith('/')
  ]
  status = _STATUS_RE.search(message)
  parts = []
  if array:
    name = array.group(1)
    if os.path.isabs(name):
      # Without OCDBT the message contains the array's directory path.
      name = os.path.basename(name)
    parts.append(f'array {name!r}')
  if data_files:
    parts.append(f'data file {data_files[-1]}')
  subject = ' in '.join(parts) or 'array data'
  return f'{subject} cannot be read ({status.group(1) if status else "error"})'


def read_abstract_tree(orbax_dir: str | os.PathLike[str]) -> dict[str, Any]:
  """Return the checkpoint's tree, in its own layout, as ShapeDtypeStructs.

  Reads `_METADATA` and each array's small zarr header, never array data.
  The caller checks that the metadata files exist first (see
  `resolve_checkpoint`).
  """
  orbax_dir = Path(orbax_dir)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    metadata = handler.metadata(epath.Path(orbax_dir))
  # Orbax raises ValueError, OSError or a bare Exception here depending on
  # which file is damaged.
  except Exception as error:  # pylint: disable=broad-exception-caught
    cause = describe_data_error(error) or f'{METADATA_FILE}: {error}'
    raise IncompleteCheckpointError(
        f'checkpoint {orbax_dir} is incomplete or corrupt: {cause}. Download'
        ' or save the checkpoint again'
    ) from error
  finally:
    handler.close()

  tree = getattr(metadata, 'tree', metadata)
  if not tree:
    raise IncompleteCheckpointError(
        f'checkpoint {orbax_dir} is incomplete or corrupt: {METADATA_FILE}'
        ' describes no arrays; download or save the checkpoint again'
    )
  return _to_shape_dtype(tree)


def directory_size(path: str | os.PathLike[str]) -> int:
  """Return the total size in bytes of the files under `path`."""
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      total += os.path.getsize(os.path.join(root, name))
  return total
