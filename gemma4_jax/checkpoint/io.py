"""Loading and saving Gemma 4 parameters with Orbax.

`load_params` reads NESTED, FLAT and STACKED checkpoints and always returns
the NESTED tree; `save_params` writes any of the three layouts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gemma4_jax.checkpoint import files, layouts, variants
from gemma4_jax.checkpoint.errors import IncompleteCheckpointError
from gemma4_jax.checkpoint.layouts import Layout
from gemma4_jax.config import Gemma4Config

logger = logging.getLogger(__name__)

# The multimodal towers are kept in float32 whatever `dtype` requests. The
# official `gemma` 4.0.1 loader does the same because bfloat16 image
# embeddings give wrong outputs on older GPUs (T4, V100).
MULTIMODAL_DTYPE = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class _LeafRef:
  """A NESTED parameter's place in the checkpoint tree.

  Attributes:
    key: Path of the checkpoint leaf (a STACKED leaf contains several layers).
    shape: Shape of the NESTED parameter.
    dtype: Stored dtype.
    index: Slice of the leading axis for a STACKED leaf, else None.
  """

  key: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  index: int | None = None

  def __getitem__(self, index: int) -> _LeafRef:
    # Called by `layouts.stacked_to_flat` to take one layer of a stack.
    return _LeafRef(self.key, self.shape[1:], self.dtype, index)


def _leaf_refs(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  refs = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      refs[key] = _leaf_refs(value, (*prefix, key))
    else:
      refs[key] = _LeafRef((*prefix, key), tuple(value.shape), value.dtype)
  return refs


def _get(tree: Mapping[str, Any], key: tuple[str, ...]) -> Any:
  for part in key:
    tree = tree[part]
  return tree


def _set(tree: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
  for part in key[:-1]:
    tree = tree.setdefault(part, {})
  tree[key[-1]] = value


def _stacked_sharding(
    sharding: jax.sharding.Sharding, key: tuple[str, ...]
) -> jax.sharding.Sharding:
  """Sharding of a stack of layers that each have `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = jax.sharding.PartitionSpec(None, *sharding.spec)
    return jax.sharding.NamedSharding(sharding.mesh, spec)
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  raise NotImplementedError(
      f'cannot restore the STACKED checkpoint leaf {"/".join(key)} with a'
      f' {type(sharding).__name__}; pass NamedSharding or SingleDeviceSharding'
      ' values in `sharding`'
  )


def _default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


@dataclasses.dataclass
class _Plan:
  """Restore instructions for each checkpoint leaf.

  Attributes:
    checkpoint_tree: The restore target in the checkpoint's own layout:
      ShapeDtypeStructs carrying the dtype and sharding to restore with.
    nested_refs: NESTED tree of `_LeafRef`s naming the source of each
      returned parameter.
    shardings: Requested sharding of each returned parameter, by NESTED path.
    partial: Whether some checkpoint leaves are left unread.
  """

  checkpoint_tree: dict[str, Any]
  nested_refs: dict[str, Any]
  shardings: dict[str, jax.sharding.Sharding]
  partial: bool


def _plan_restore(
    abstract: Mapping[str, Any],
    *,
    dtype: np.dtype | None,
    towers: frozenset[str],
    sharding: Mapping[str, Any] | None,
) -> _Plan:
  refs = layouts.to_nested(_leaf_refs(abstract))
  text_refs, multimodal_refs = layouts.split_multimodal(refs)
  flat_text = layouts.flatten_paths(text_refs)
  flat_multimodal = {
      path: ref
      for path, ref in layouts.flatten_paths(multimodal_refs).items()
      if layouts.multimodal_tower(path) in towers
  }

  requested = layouts.flatten_paths(sharding) if sharding is not None else {}
  if sharding is not None:
    missing = sorted(set(flat_text) - set(requested))
    if missing:
      raise ValueError(
          f'`sharding` has no entry for {len(missing)} text parameters, e.g.'
          f' {missing[0]!r}; pass a tree with the keys of the NESTED text'
          ' parameters'
      )

  # Per checkpoint leaf: the dtype and, per slice, the sharding requested.
  leaf_dtypes: dict[tuple[str, ...], np.dtype] = {}
  leaf_shardings: dict[tuple[str, ...], dict[int | None, Any]] = {}
  shardings: dict[str, jax.sharding.Sharding] = {}
  for path, ref in [*flat_text.items(), *flat_multimodal.items()]:
    if path in flat_text:
      target_dtype = np.dtype(dtype) if dtype is not None else ref.dtype
    else:
      target_dtype = MULTIMODAL_DTYPE
    target_sharding = requested.get(path) or _default_sharding()
    shardings[path] = target_sharding
    leaf_dtypes[ref.key] = target_dtype
    leaf_shardings.setdefault(ref.key, {})[ref.index] = target_sharding

  checkpoint_tree: dict[str, Any] = {}
  for key, by_slice in leaf_shardings.items():
    leaf = _get(abstract, key)
    if None in by_slice:
      leaf_sharding = by_slice[None]
    else:
      distinct = set(by_slice.values())
      if len(distinct) != 1:
        raise NotImplementedError(
            f'the layers stacked in checkpoint leaf {"/".join(key)} ask for'
            f' {len(distinct)} different shardings; a STACKED leaf is'
            ' restored with one sharding for all its layers'
        )
      leaf_sharding = _stacked_sharding(distinct.pop(), key)
    _set(
        checkpoint_tree,
        key,
        jax.ShapeDtypeStruct(
            leaf.shape, leaf_dtypes[key], sharding=leaf_sharding
        ),
    )

  num_leaves = len(layouts.flatten_paths(abstract))
  return _Plan(
      checkpoint_tree=checkpoint_tree,
      nested_refs=layouts.merge_trees(
          text_refs, layouts.unflatten_paths(flat_multimodal)
      ),
      shardings=shardings,
      partial=len(leaf_dtypes) < num_leaves,
  )


def _restore(orbax_dir: Path, plan: _Plan) -> dict[str, Any]:
  target = plan.checkpoint_tree
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  args = ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=plan.partial
  )
  try:
    return ocp.PyTreeCheckpointer().restore(orbax_dir, args=args)
  # Orbax 0.12.8 wraps tensorstore read failures in a bare `Exception`; any
  # other failure is re-raised unchanged.
  except Exception as error:  # pylint: disable=broad-exception-caught
    cause = files.describe_data_error(error)
    if cause is None:
      raise
    raise IncompleteCheckpointError(
        f'checkpoint {orbax_dir} is incomplete or corrupt: {cause}. A data'
        ' file is missing or truncated; download or save the checkpoint again'
    ) from error


def _assemble(restored: Mapping[str, Any], plan: _Plan) -> dict[str, Any]:
  """Build the NESTED tree from the restored checkpoint-layout tree."""
  params: dict[str, Any] = {}
  stacked_keys = set()
  for path, ref in layouts.flatten_paths(plan.nested_refs).items():
    array = _get(restored, ref.key)
    if ref.index is not None:
      array = array[ref.index]
      stacked_keys.add(ref.key)
    requested = plan.shardings[path]
    if array.sharding != requested:
      array = jax.device_put(array, requested)
    params[path] = array

  # Every layer has its own copy now; free the stacks.
  for key in stacked_keys:
    _get(restored, key).delete()
  return layouts.unflatten_paths(params)


def _describe_variant(shapes: variants.ShapeMap) -> str:
  preset = variants.match_preset(shapes)
  return preset.name if preset is not None else 'custom'


def load_params(
    path: str | os.PathLike[str],
    *,
    config: Gemma4Config | None = None,
    dtype: Any = None,
    text_only: bool = True,
    sharding: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Restore the NESTED parameters of a Gemma 4 checkpoint.

  Reads the checkpoint metadata first, checks the text parameters against
  `config`, then restores only the arrays that are returned: with
  `text_only`, the vision and audio arrays are not read at all.

  Args:
    path: The Orbax checkpoint directory, or a directory that contains it
      (e.g. a Kaggle download with `tokenizer.model` beside it). Layouts
      NESTED, FLAT and STACKED are read.
    config: When given, every text parameter must have the key and shape that
      this config expects, and so must the parameters of each tower it has
      (vision, audio) when `text_only` is False. Towers the config lacks
      are not read. When None, the checkpoint need only be a Gemma 4
      decoder, and every tower it has is read.
    dtype: Dtype of the returned text parameters, cast while restoring; None
      keeps the stored dtype. Multimodal parameters are always float32.
    text_only: Skip the vision and audio towers and their embedder
      projections.
    sharding: A NESTED tree of `jax.sharding.Sharding` with (at least) the
      keys of the text parameters. Multimodal parameters without an entry go
      to the first local device, as does everything when `sharding` is None.
      Arrays are restored directly into these shardings. A STACKED leaf is
      restored with the stacked form of its layers' sharding, then sliced.

  Returns:
    The NESTED parameter tree, as `jax.Array`s.

  Raises:
    CheckpointNotFoundError: `path` does not exist.
    IncompleteCheckpointError: metadata or array data are missing.
    UnsupportedCheckpointError: not a Gemma 4 checkpoint (e.g. Gemma 3).
    CheckpointMismatchError: keys or shapes do not fit `config`.
  """
  if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(
        f'dtype={dtype!r} is not a floating-point type; pass jnp.bfloat16,'
        ' jnp.float32 or None to keep the stored dtype'
    )
  start = time.perf_counter()
  checkpoint = files.resolve_checkpoint(path)
  abstract = files.read_abstract_tree(checkpoint.orbax_dir)
  layout = layouts.detect_layout(abstract)

  shapes = variants.text_shapes(abstract)
  if config is not None:
    variants.validate_shapes(shapes, config, source=str(checkpoint.orbax_dir))
  else:
    variants.check_is_gemma4(shapes)
  towers = frozenset() if text_only else frozenset(('vision', 'audio'))
  if config is not None and not text_only:
    towers = frozenset(
        tower
        for tower, tower_config in (
            ('vision', config.vision), ('audio', config.audio)
        )
        if tower_config is not None
    )
    if config.vision is not None:
      variants.validate_vision_shapes(
          variants.vision_shapes(abstract),
          config,
          source=str(checkpoint.orbax_dir),
      )
    if config.audio is not None:
      variants.validate_audio_shapes(
          variants.audio_shapes(abstract),
          config,
          source=str(checkpoint.orbax_dir),
      )

  plan = _plan_restore(
      abstract, dtype=dtype, towers=towers, sharding=sharding
  )
  restored = _restore(checkpoint.orbax_dir, plan)
  params = _assemble(restored, plan)

  leaves = jax.tree.leaves(params)
  logger.info(
      'restored %s parameters (%.1f MB, %s layout, variant %s) from %s in'
      ' %.1f s',
      f'{sum(math.prod(leaf.shape) for leaf in leaves):,}',
      sum(leaf.nbytes for leaf in leaves) / 1e6,
      layout.value,
      config.name if config is not None else _describe_variant(shapes),
      checkpoint.orbax_dir,
      time.perf_counter() - start,
  )
  return params


def _write(tree: Mapping[str, Any], path: Path) -> None:
  # Orbax writes into `<path>.orbax-checkpoint-tmp...` and renames it to
  # `path` once every file is written, so `path` never contains a partial
  # save.
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
  finally:
    checkpointer.close()


def save_params(
    params: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    layout: Layout | str = Layout.NESTED,
    pattern_len: int | None = None,
    overwrite: bool = False,
) -> Path:
  """Write NESTED parameters as an Orbax checkpoint in `layout`.

  The checkpoint directory appears only once it is complete. With
  `overwrite`, the new checkpoint is written beside the old one and swapped
  in by two renames. A save interrupted between the renames leaves both
  checkpoints complete, under the names `<path>.old-*` and `<path>.new-*`.

  Args:
    params: The NESTED tree (text, optionally with multimodal towers).
    path: The checkpoint directory to create; its parent is created if needed.
    layout: 'nested', 'flat' or 'stacked'.
    pattern_len: Attention-pattern length for 'stacked'. When None it is read
      from the layer head widths, which fails if they are all equal.
    overwrite: Replace an existing checkpoint at `path`.

  Returns:
    The absolute checkpoint path.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
  """
  layout = Layout(layout)
  if 'params' in params and 'embedder' not in params:
    raise ValueError(
        'save_params expects the parameter tree itself, but got a dict with'
        " a top-level 'params' key (the whole output of model.init); pass"
        " variables['params']"
    )
  if layouts.detect_layout(params) != Layout.NESTED:
    raise ValueError(
        'save_params expects NESTED parameters (the Flax tree, e.g. from'
        ' load_params); convert FLAT or STACKED trees with'
        ' layouts.to_nested first'
    )
  if layout == Layout.STACKED and pattern_len is None:
    text, _ = layouts.split_multimodal(params)
    pattern = variants.infer_attention_pattern(variants.shape_map(text))
    if pattern is None:
      raise ValueError(
          'cannot read the attention pattern from the parameters (all layers'
          ' have the same head width and none has k_einsum); pass'
          ' pattern_len=len(config.attention_pattern)'
      )
    pattern_len = len(pattern)
  tree = layouts.from_nested(params, layout, pattern_len=pattern_len)

  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
        f'checkpoint path {path} already exists; pass overwrite=True to'
        ' replace it, or choose another path'
    )
  path.parent.mkdir(parents=True, exist_ok=True)

  start = time.perf_counter()
  if not path.exists():
    _write(tree, path)
  else:
    suffix = uuid.uuid4().hex[:8]
    staged = path.with_name(f'{path.name}.new-{suffix}')
    retired = path.with_name(f'{path.name}.old-{suffix}')
    _write(tree, staged)
    os.rename(path, retired)
    os.rename(staged, path)
    shutil.rmtree(retired)

  leaves = jax.tree.leaves(params)
  logger.info(
      'saved %s parameters (%.1f MB, %s layout) to %s in %.1f s',
      f'{sum(math.prod(leaf.shape) for leaf in leaves):,}',
      sum(leaf.nbytes for leaf in leaves) / 1e6,
      layout.value,
      path,
      time.perf_counter() - start,
  )
  return path
