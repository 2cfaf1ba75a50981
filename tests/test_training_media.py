"""Fine-tuning steps with images and audio in the batch.

A small E2B-like model with a vision tower and an audio tower trains on a
batch of two rows: row 0 has an image and a clip, row 1 a clip only.
Media travel per row, padded with empty images and clips. The step's loss
must equal the cross-entropy of the official model's logits over the
targets that are not soft-token placeholders, the towers must get no AdamW
moments and stay unchanged, and micro-batches must keep each row's media
with the row.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.audio import features
from gemma4_jax.audio import merge as audio_merge
from gemma4_jax.checkpoint import layouts
from gemma4_jax.training import lora as lora_lib
from gemma4_jax.training import step as step_lib
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import merge as image_merge
from gemma4_jax.vision import preprocess
from tests import oracle
from tests import test_audio_encoder
from tests.test_audio_features import chirp, noise
from tests.test_vision_encoder import FAMILIES, mixed_images, official_encoder
from tests.test_vision_model import lively_params, official_images

BUDGET = 70
CFG = dataclasses.replace(
    oracle.E2B_LIKE,
    vision=FAMILIES['e2b_e4b_like'],
    audio=test_audio_encoder.CONFIG,
)
OPTIMIZER = step_lib.OptimizerConfig(
    learning_rate=1e-3, total_steps=10, warmup_steps=0, max_grad_norm=None
)
IMAGE_IDS = {
    'image_token': 499, 'start_of_image': 498, 'end_of_image': 497,
    'double_newline': 496,
}
AUDIO_IDS = {'audio_token': 500, 'start_of_audio': 501, 'end_of_audio': 502}


def row_tokens(text_lengths, marks, image_counts, audio_counts, length):
  """One row: text runs separated by marks, expanded, right-padded."""
  rng = np.random.default_rng(len(marks))
  row = [2]
  for i, n in enumerate(text_lengths):
    row += list(rng.integers(3, 400, n))
    if i < len(marks):
      row.append(marks[i])
  tokens = np.array([row], np.int32)
  tokens = image_merge.expand_image_placeholders(
      tokens, [image_counts], **IMAGE_IDS
  )
  tokens = audio_merge.expand_audio_placeholders(
      tokens, [audio_counts], **AUDIO_IDS
  )[0]
  assert len(tokens) <= length
  return np.pad(tokens, (0, length - len(tokens)))


@functools.cache
def media_batch():
  """Batch of 2 rows [B, 111] with per-row media; the raw media too."""
  images = preprocess.preprocess_images([mixed_images()[1]], BUDGET)
  clips = features.prepare_audio([chirp(0.6), noise(0.9, seed=2)])
  (image_count,), (clip0, clip1) = (
      images.soft_token_counts, clips.soft_token_counts
  )
  length = 112
  rows = np.stack([
      row_tokens((4, 3, 5), (IMAGE_IDS['image_token'], AUDIO_IDS['audio_token']),
                 [image_count], [clip0], length),
      row_tokens((6, 9), (AUDIO_IDS['audio_token'],), [], [clip1], length),
  ])
  valid = rows != 0
  tokens = rows[:, :-1]
  targets = rows[:, 1:]
  segment_ids = valid[:, :-1].astype(np.int32)
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0)

  num_patches, patch_dim = images.patches.shape[1:]
  image_patches = np.zeros((2, 1, num_patches, patch_dim), np.float32)
  image_positions = np.full((2, 1, num_patches, 2), -1, np.int32)
  image_patches[0, 0] = images.patches[0]
  image_positions[0, 0] = images.positions_xy[0]
  samples = clips.waveforms.shape[1]
  batch = {
      'tokens': tokens,
      'targets': targets,
      # Weight 1 everywhere, placeholders included: the step must drop them.
      'loss_weights': valid[:, 1:].astype(np.float32),
      'positions': positions.astype(np.int32),
      'segment_ids': segment_ids,
      'image_patches': image_patches,
      'image_positions': image_positions,
      'audio_waveforms': clips.waveforms.reshape(2, 1, samples),
      'audio_lengths': clips.lengths.reshape(2, 1),
      'audio_counts': np.array([[clip0], [clip1]], np.int32),
  }
  return batch, images, clips


@functools.cache
def official_setup():
  from gemma.gm.nn.gemma4 import _gemma4

  batch, images, clips = media_batch()
  official_config = dataclasses.replace(
      oracle.official_config(oracle.E2B_LIKE),
      vision_encoder=official_encoder(FAMILIES['e2b_e4b_like'], BUDGET),
      audio_encoder=test_audio_encoder.official_conformer_config(),
  )
  official = _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=official_config, dtype=jnp.float32, text_only=False
  )
  row = rows_of(batch, 0)
  shapes = jax.eval_shape(
      lambda: official.init(jax.random.key(0), row['tokens'], **row['media'])
  )['params']
  params = lively_params(shapes)
  params['audio_encoder'] = test_audio_encoder.randomize(
      shapes['audio_encoder']
  )
  return official, params


def rows_of(batch, row):
  """Official `apply` inputs of one row: its tokens without padding."""
  _, images, clips = media_batch()
  full = np.concatenate([batch['tokens'][row], batch['targets'][row, -1:]])
  length = int(np.sum(full != 0))
  # The clip keeps the padding of the batch: the official encoder's last
  # soft token of a clip depends on the padded length of its batch.
  media = {
      'audio': jnp.asarray(clips.waveforms[row : row + 1])[None],
      'audio_lengths': jnp.asarray(clips.lengths[row : row + 1])[None],
      'audio_soft_token_counts': clips.soft_token_counts[row : row + 1],
  }
  if row == 0:
    media['images'] = official_images(images, slice(0, 1))
  return {'tokens': jnp.asarray(full[None, :length]), 'media': media}


def official_loss(official, params, batch):
  """Mean cross-entropy over targets that are text, from official logits."""
  total, count = 0.0, 0
  for row in range(2):
    inputs = rows_of(batch, row)
    media = dict(inputs['media'])
    counts = media.pop('audio_soft_token_counts')
    apply = functools.partial(official.apply, audio_soft_token_counts=counts)
    logits = jax.jit(apply)(
        {'params': params}, inputs['tokens'], **media
    ).logits[0, :-1]
    targets = np.asarray(inputs['tokens'][0, 1:])
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    for t, target in enumerate(targets):
      if target >= 0:
        total -= float(log_probs[t, target])
        count += 1
  return total / count


def path_names(tree):
  return [
      tuple(getattr(k, 'key', str(k)) for k in path)
      for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  ]


def test_step_loss_matches_official_and_towers_stay_frozen():
  official, params = official_setup()
  batch, _, _ = media_batch()
  expected = official_loss(official, params, batch)

  trainable, towers = step_lib.split_towers(params)
  # The step donates the state, which would delete the cached parameters.
  trainable = jax.tree.map(jnp.array, trainable)
  assert 'vision_encoder' in towers
  assert 'audio_encoder' in towers
  assert set(towers['embedder']) == {'mm_input_projection', 'audio_input_projection'}
  state = step_lib.init_train_state(trainable, OPTIMIZER, jax.random.key(0))
  # No AdamW moment (nor any other optimizer leaf) belongs to a tower.
  assert not any(
      layouts.is_multimodal_path(names[-len(names) + i :])
      for names in path_names(state.opt_state)
      for i in range(len(names))
  )

  train_step = step_lib.make_train_step(
      Transformer(config=CFG, dtype=jnp.float32), OPTIMIZER
  )
  before = jax.tree.map(np.asarray, trainable)
  new_state, metrics = train_step(state, batch, towers)

  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
  # Soft-token placeholders are not counted as weighted targets.
  placeholders = np.sum(batch['targets'] < 0)
  assert placeholders > 0
  assert float(metrics['weight_sum']) == np.sum(batch['loss_weights']) - placeholders
  assert np.isfinite(float(metrics['grad_norm']))
  changed = jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != b)), new_state.params, before
  )
  assert changed['embedder']['input_embedding']
  assert all(jax.tree.leaves(changed['layer_0']))


def test_microbatches_split_media_with_their_rows():
  batch, _, _ = media_batch()
  split = step_lib._split_microbatches(batch, 2)  # pylint: disable=protected-access
  assert set(split) == set(batch)
  for key, value in batch.items():
    assert split[key].shape == (2, 1, *value.shape[1:]), key
    for row in range(2):
      np.testing.assert_array_equal(split[key][row, 0], value[row])


def test_lora_step_keeps_float32_towers_in_base_params():
  _, params = official_setup()
  batch, _, _ = media_batch()
  text, towers = step_lib.split_towers(params)
  base = layouts.merge_trees(
      jax.tree.map(lambda x: x.astype(jnp.bfloat16), text), towers
  )
  lora = lora_lib.LoraConfig(rank=2, alpha=4.0)
  adapters = lora_lib.init_adapters(
      params, lora, jax.random.key(1), model_config=CFG
  )
  assert not any(layouts.is_multimodal_path(n) for n in path_names(adapters))
  state = step_lib.init_train_state(adapters, OPTIMIZER, jax.random.key(0))
  train_step = step_lib.make_train_step(
      Transformer(config=CFG, dtype=jnp.bfloat16), OPTIMIZER, lora=lora
  )
  _, metrics = train_step(state, batch, base)
  assert np.isfinite(float(metrics['loss']))
  assert float(metrics['weight_sum']) == np.sum(
      (batch['loss_weights'] > 0) & (batch['targets'] >= 0)
  )


def test_frozen_tower_tree_has_all_tower_params():
  _, params = official_setup()
  _, towers = step_lib.split_towers(params)
  flat = flax.traverse_util.flatten_dict(params)
  tower_paths = [p for p in flat if layouts.is_multimodal_path(p)]
  assert len(jax.tree.leaves(towers)) == len(tower_paths)
  with pytest.raises(ValueError, match='dtype'):
    step_lib.make_train_step(
        Transformer(config=CFG, dtype=jnp.bfloat16), OPTIMIZER,
        lora=lora_lib.LoraConfig(rank=2, alpha=4.0),
    )(
        step_lib.init_train_state(
            lora_lib.init_adapters(
                params, lora_lib.LoraConfig(rank=2, alpha=4.0),
                jax.random.key(1), model_config=CFG,
            ),
            OPTIMIZER, jax.random.key(0),
        ),
        media_batch()[0],
        params,  # float32 decoder weights, where the step expects bfloat16
    )
