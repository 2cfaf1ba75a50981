"""Bad checkpoints raise errors that name the problem and the fix.

Each case starts from a good checkpoint written by the official
`gm.ckpts.save_params` and breaks one thing the way it breaks in practice: a
wrong path, a deleted file, an interrupted save, a config for another model,
a Gemma 3 checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import glob
import os
import shutil

from gemma import gm
from gemma.gm.nn import _transformer as official_gemma3
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
import pytest

from gemma4_jax import config as config_lib
from gemma4_jax.checkpoint import errors, io, variants
from tests import oracle

_TOKENS = jnp.ones((1, 4), jnp.int32)

# After a failed restore, metadata read or save, Orbax 0.12.8 leaves futures
# and coroutines behind that raise "Event loop is closed" or "never awaited"
# when garbage-collected. Every test here provokes such a failure, and the
# `gc.collect()` calls make them surface in the test that caused them.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning'
)


def _random_fill(abstract, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32)),
      abstract,
  )


@functools.cache
def _abstract(name: str):
  model = oracle.official_model(oracle.SMALL_CONFIGS[name])
  return jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']


def _save_official(path, name='e4b_like', edit=None):
  params = _random_fill(_abstract(name))
  if edit is not None:
    edit(params)
  gm.ckpts.save_params(params, path, wait_until_finished=True)
  return path


# ------------------------------------------------------------- paths, files


def test_missing_path_names_path(tmp_path):
  missing = tmp_path / 'no_such_checkpoint'
  with pytest.raises(errors.CheckpointNotFoundError) as info:
    io.load_params(missing)
  assert str(missing) in str(info.value)
  assert 'check the path' in str(info.value)


def test_directory_without_orbax_metadata(tmp_path):
  (tmp_path / 'weights').mkdir()
  (tmp_path / 'weights' / 'model.safetensors').write_bytes(b'not orbax')
  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(tmp_path / 'weights')
  message = str(info.value)
  assert 'not a complete Orbax checkpoint' in message
  assert '_METADATA' in message
  assert 'model.safetensors' in message


def test_deleted_metadata_file_named(tmp_path):
  path = _save_official(tmp_path / 'ckpt')
  os.remove(path / '_METADATA')
  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(path)
  message = str(info.value)
  assert 'incomplete or corrupt' in message
  assert 'missing _METADATA' in message


def test_missing_step_metadata_still_loads(tmp_path):
  """Checkpoints from older Orbax versions have no _CHECKPOINT_METADATA."""
  path = _save_official(tmp_path / 'ckpt')
  os.remove(path / '_CHECKPOINT_METADATA')
  params = io.load_params(path)
  assert 'layer_0' in params


def test_deleted_array_file_reported(tmp_path):
  path = _save_official(tmp_path / 'ckpt')
  # Orbax merges the OCDBT data of all processes into `d/` when it finalizes
  # a save; those files hold the arrays and their zarr headers.
  data_files = sorted(glob.glob(str(path / 'd' / '*')))
  assert data_files
  os.remove(data_files[0])
  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(path)
  message = str(info.value)
  assert 'incomplete or corrupt' in message
  assert data_files[0] in message
  assert 'save the checkpoint again' in message
  gc.collect()


def test_truncated_array_data_reported(tmp_path):
  # Without OCDBT each array has its own directory: a missing data chunk
  # leaves the metadata readable and fails when the array is read.
  params = _random_fill(_abstract('e4b_like'))
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
  ocp.Checkpointer(handler).save(tmp_path / 'ckpt', args=ocp.args.PyTreeSave(params))
  array_dir = tmp_path / 'ckpt' / 'layer_3.attn.kv_einsum.w'
  chunks = [name for name in os.listdir(array_dir) if not name.startswith('.')]
  for chunk in chunks:
    os.remove(array_dir / chunk)
  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(tmp_path / 'ckpt')
  message = str(info.value)
  assert "array 'layer_3.attn.kv_einsum.w'" in message
  assert 'incomplete or corrupt' in message
  gc.collect()


def _crash_before_rename(monkeypatch):
  """Make Orbax fail after writing a save but before renaming it into place.

  Orbax 0.12 writes into `<path>.orbax-checkpoint-tmp` and renames that to
  `<path>` in `AtomicRenameTemporaryPath.finalize`; a process killed before
  then leaves only the temporary directory.
  """

  async def crash(*args, **kwargs):
    del args, kwargs
    raise RuntimeError('simulated crash before the rename')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', crash)


def test_interrupted_save_reported(tmp_path, monkeypatch):
  params = _random_fill(_abstract('e4b_like'))
  _crash_before_rename(monkeypatch)
  with pytest.raises(RuntimeError, match='simulated crash'):
    io.save_params(params, tmp_path / 'ckpt')
  monkeypatch.undo()

  leftover = tmp_path / 'ckpt.orbax-checkpoint-tmp'
  assert os.listdir(tmp_path) == [leftover.name]
  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(tmp_path / 'ckpt')
  assert str(leftover) in str(info.value)
  assert 'did not finish' in str(info.value)

  with pytest.raises(errors.IncompleteCheckpointError) as info:
    io.load_params(leftover)
  assert 'did not finish' in str(info.value)
  gc.collect()


def test_interrupted_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
  old = _random_fill(_abstract('e4b_like'), seed=0)
  io.save_params(old, tmp_path / 'ckpt')
  _crash_before_rename(monkeypatch)
  with pytest.raises(RuntimeError, match='simulated crash'):
    io.save_params(
        _random_fill(_abstract('e4b_like'), seed=1),
        tmp_path / 'ckpt',
        overwrite=True,
    )
  monkeypatch.undo()

  loaded = io.load_params(tmp_path / 'ckpt')
  np.testing.assert_array_equal(
      loaded['embedder']['input_embedding'], old['embedder']['input_embedding']
  )
  gc.collect()


def test_interrupted_save_inside_kaggle_directory(tmp_path):
  _save_official(tmp_path / 'download' / 'gemma4')
  os.rename(
      tmp_path / 'download' / 'gemma4',
      tmp_path / 'download' / 'gemma4.orbax-checkpoint-tmp',
  )
  with pytest.raises(errors.IncompleteCheckpointError, match='did not finish'):
    io.load_params(tmp_path / 'download')


def test_two_checkpoints_in_one_directory(tmp_path):
  _save_official(tmp_path / 'download' / 'a')
  shutil.copytree(tmp_path / 'download' / 'a', tmp_path / 'download' / 'b')
  with pytest.raises(errors.CheckpointNotFoundError, match='pass one of them'):
    io.load_params(tmp_path / 'download')


# ----------------------------------------------------------- config mismatch


def test_wrong_shape_names_key_shapes_and_fix(tmp_path):
  path = _save_official(tmp_path / 'ckpt')
  cfg = oracle.E4B_LIKE
  other = dataclasses.replace(cfg, name='e4b_like_mqa', num_kv_heads=1)
  found = _abstract('e4b_like')['layer_3']['attn']['kv_einsum']['w'].shape
  # [2, K, D, H] for K = 1 local KV head.
  expected = (2, 1, cfg.embed_dim, cfg.head_dim)

  with pytest.raises(errors.CheckpointMismatchError) as info:
    io.load_params(path, config=other)
  message = str(info.value)
  assert (
      f'`layer_3/attn/kv_einsum/w` has shape {found} but e4b_like_mqa'
      f' expects {expected}'
  ) in message
  assert 'config_from_checkpoint(path)' in message
  assert 'check the path' in message
  assert ('layer_3/attn/kv_einsum/w', found, expected) in info.value.wrong_shapes


def test_preset_suggested_for_preset_checkpoint():
  # A checkpoint of the 31B release checked against the E4B config.
  model = oracle.official_preset_model('31b')
  abstract = jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']
  with pytest.raises(errors.CheckpointMismatchError) as info:
    variants.validate_shapes(
        variants.text_shapes(abstract), config_lib.PRESETS['e4b'], source='x'
    )
  message = str(info.value)
  assert "matches preset '31b'" in message
  assert "config=get_preset('31b')" in message
  assert '... and' in message  # Long lists are cut short.


def test_missing_and_unexpected_keys_listed(tmp_path):
  def edit(params):
    del params['final_norm']
    del params['layer_2']['attn']['key_norm']
    params['layer_0']['adapter'] = {'w': jnp.ones((4, 4))}

  path = _save_official(tmp_path / 'ckpt', edit=edit)
  with pytest.raises(errors.CheckpointMismatchError) as info:
    io.load_params(path, config=oracle.E4B_LIKE)
  message = str(info.value)
  assert '`final_norm/scale` is missing' in message
  assert '`layer_2/attn/key_norm/scale` is missing' in message
  assert '`layer_0/adapter/w` is not a parameter of e4b_like' in message
  assert set(info.value.missing) == {'final_norm/scale', 'layer_2/attn/key_norm/scale'}
  assert info.value.unexpected == ('layer_0/adapter/w',)


def test_unknown_variant_lists_closest_preset_keys():
  # Layers whose MLP widths follow no Gemma 4 rule cannot be read as a
  # custom config; the error shows where the closest preset differs.
  abstract = dict(_abstract('31b_like'))
  layer = dict(abstract['layer_1'])
  layer['mlp'] = {
      'gating_einsum': jax.ShapeDtypeStruct((2, 8, 64), jnp.float32),
      'linear': jax.ShapeDtypeStruct((8, 64), jnp.float32),
  }
  abstract['layer_1'] = layer
  with pytest.raises(errors.UnknownVariantError) as info:
    variants.config_from_checkpoint(abstract)
  message = str(info.value)
  assert 'MLP widths' in message
  assert "closest preset '31b'" in message
  assert '`layer_0/attn/q_einsum/w` has shape (4, 64, 16) but 31b expects (32, 5376, 256)' in message


# -------------------------------------------------------------- other models


def _gemma3_abstract():
  """A Gemma 3 text model at toy size, from the official Gemma 3 classes."""
  base = gm.nn.Gemma3_270M.config
  small = dataclasses.replace(
      base,
      num_embed=512,
      embed_dim=64,
      hidden_dim=128,
      num_heads=2,
      head_dim=16,
      num_kv_heads=1,
      attention_types=base.attention_types[:6],
  )
  model = official_gemma3.Transformer(config=small)
  return jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']


def test_gemma3_checkpoint_rejected(tmp_path):
  gm.ckpts.save_params(
      _random_fill(_gemma3_abstract()), tmp_path / 'gemma3', wait_until_finished=True
  )
  with pytest.raises(errors.UnsupportedCheckpointError) as info:
    io.load_params(tmp_path / 'gemma3')
  message = str(info.value)
  assert 'looks like a Gemma 3' in message
  assert 'skip_scale' in message
  assert 'Gemma 4 checkpoints only' in message

  with pytest.raises(errors.UnsupportedCheckpointError, match='Gemma 3'):
    variants.config_from_checkpoint(tmp_path / 'gemma3')


def test_tree_without_embedder_rejected():
  with pytest.raises(errors.UnsupportedCheckpointError, match='input_embedding'):
    variants.config_from_checkpoint(
        {'encoder': {'w': jax.ShapeDtypeStruct((2, 2), jnp.float32)}}
    )


# ------------------------------------------------------------- caller mistakes


def test_save_whole_variables_dict_rejected(tmp_path):
  variables = {'params': _random_fill(_abstract('e4b_like'))}
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    io.save_params(variables, tmp_path / 'ckpt')
  assert not (tmp_path / 'ckpt').exists()


def test_integer_load_dtype_rejected(tmp_path):
  path = _save_official(tmp_path / 'ckpt')
  with pytest.raises(ValueError, match='not a floating-point type'):
    io.load_params(path, dtype=jnp.int32)
