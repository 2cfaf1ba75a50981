"""Train checkpoints: the train state and the data position, saved together.

    checkpointer = TrainCheckpointer(workdir / 'checkpoints', max_to_keep=3)
    step = checkpointer.latest_step()          # None in a fresh workdir
    if step is not None:
      state, data_state = checkpointer.restore(step, abstract_state)
    ...
    checkpointer.save(step, state, iterator.get_state())
    checkpointer.close()                       # waits for a pending save

Each checkpoint is one Orbax `CheckpointManager` step directory with two
items: `state` (the `TrainState` arrays: parameters or LoRA adapters,
optimizer state, step and the raw bits of the PRNG key) and `data` (the JSON
state of the batch iterator). Orbax writes a step into a temporary directory
and renames it when complete, so a run killed during a save leaves the
previous checkpoint as the latest one. Saves are asynchronous by default:
`save` returns once the arrays are copied off the device, and the files are
written in the background while training goes on.

In a multi-process run every process calls `save` and `restore` at the same
step. Each process writes and reads only the array shards its devices hold,
and process 0 alone writes the JSON data position, which every process
reads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from gemma4_jax.training.step import TrainState


def _state_tree(state: TrainState) -> dict[str, Any]:
  return {
      'params': state.params,
      'opt_state': state.opt_state,
      'step': state.step,
      'rng': jax.random.key_data(state.rng),
  }


def _restore_target(abstract_state: TrainState) -> dict[str, Any]:
  """Return the `_state_tree` of `abstract_state` as shape structs.

  Each struct keeps its leaf's sharding (None when the leaf has none), so
  Orbax reads every array straight into its place on the mesh, and each
  process reads only the shards its devices hold.
  """

  def struct(leaf):
    return jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype, sharding=getattr(leaf, 'sharding', None)
    )

  rng = jax.eval_shape(jax.random.key_data, abstract_state.rng)
  return {
      'params': jax.tree.map(struct, abstract_state.params),
      'opt_state': jax.tree.map(struct, abstract_state.opt_state),
      'step': struct(abstract_state.step),
      'rng': jax.ShapeDtypeStruct(
          rng.shape, rng.dtype,
          sharding=getattr(abstract_state.rng, 'sharding', None),
      ),
  }


def _state_from_tree(tree: dict[str, Any], like: TrainState) -> TrainState:
  return TrainState(
      params=tree['params'],
      opt_state=jax.tree.unflatten(
          jax.tree.structure(like.opt_state), jax.tree.leaves(tree['opt_state'])
      ),
      step=tree['step'],
      # Keys are made with the default PRNG implementation (`jax.random.key`).
      rng=jax.random.wrap_key_data(tree['rng']),
  )


class TrainCheckpointer:
  """Saves and restores train checkpoints under one directory.

  Attributes:
    directory: Where the step directories (`<step>/state`, `<step>/data`) are.
  """

  def __init__(
      self,
      directory: str | os.PathLike[str],
      *,
      max_to_keep: int | None = 3,
      async_save: bool = True,
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(
          f'max_to_keep={max_to_keep} must be at least 1, or None to keep all'
      )
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data')
    )

  def latest_step(self) -> int | None:
    """Return the newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(
      self, step: int, state: TrainState, data_state: dict[str, Any]
  ) -> None:
    """Start saving `state` and `data_state` as checkpoint `step`.

    Returns once the arrays are copied, so `state` may be donated to the
    next train step right away. A step that is already saved is skipped.
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_state_tree(state)),
            data=ocp.args.JsonSave(data_state),
        ),
        force=True,
    )
    logging.info('saving checkpoint of step %d to %s', step, self.directory)

  def restore(
      self, step: int, abstract_state: TrainState
  ) -> tuple[TrainState, dict[str, Any]]:
    """Read checkpoint `step` into the structure of `abstract_state`.

    Args:
      step: A step from `all_steps()`.
      abstract_state: A `TrainState` of `jax.ShapeDtypeStruct` (from
        `jax.eval_shape`) or of arrays, giving the tree, shapes, dtypes and
        shardings to restore into. Leaves without a sharding are restored
        by Orbax's default placement, which needs a single process.

    Raises:
      ValueError: the checkpoint's arrays do not fit `abstract_state` (a
        different model, or LoRA settings, than the run that saved it).
    """
    target = _restore_target(abstract_state)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target),
              data=ocp.args.JsonRestore(),
          ),
      )
    except (ValueError, KeyError, TypeError) as error:
      raise ValueError(
          f'checkpoint of step {step} in {self.directory} does not match this'
          f' run\'s model and optimizer ({error}); resume with the settings'
          ' that wrote it, or use a new workdir'
      ) from error
    return _state_from_tree(restored.state, abstract_state), restored.data

  def wait(self) -> None:
    """Block until a pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
