"""JSONL conversations with image and audio parts, through the data pipeline.

Real tokenizer, real PNG and WAV files beside the JSONL file (named by
relative paths). Packed rows must carry the media of their own examples in
the order of their placeholder runs, every media token must have loss
weight 0, and the batch must run through the model's loss.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import soundfile

from gemma4_jax.audio import features
from gemma4_jax.audio import merge as audio_merge
from gemma4_jax.training import data
from gemma4_jax.training import loss as loss_lib
from gemma4_jax.training import media as media_lib
from gemma4_jax.training import records as records_lib
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import merge as image_merge
from gemma4_jax.vision import preprocess
from tests import oracle
from tests import test_audio_encoder
from tests.test_audio_features import chirp, noise
from tests.test_vision_encoder import FAMILIES

MEDIA = media_lib.MediaConfig(
    image_budget=70, max_images_per_row=2, max_clips_per_row=2,
    max_clip_seconds=2.0,
)


def user(*parts):
  return {'role': 'user', 'content': list(parts)}


def write_dataset(base, lines):
  path = base / 'train.jsonl'
  path.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  return path


@pytest.fixture
def media_files(tmp_path):
  rng = np.random.default_rng(0)
  (tmp_path / 'img').mkdir()
  for name, shape in (('wide', (120, 400)), ('tall', (300, 90))):
    Image.fromarray(rng.integers(0, 256, (*shape, 3), np.uint8)).save(
        tmp_path / 'img' / f'{name}.png'
    )
  soundfile.write(tmp_path / 'hi.wav', chirp(0.6), 16_000)
  soundfile.write(tmp_path / 'noise.wav', noise(1.1, seed=3), 16_000)
  lines = [
      {'messages': [
          user({'type': 'image', 'path': 'img/wide.png'},
               {'type': 'text', 'text': 'What is this?'}),
          {'role': 'model', 'content': 'Stripes.'}]},
      {'messages': [
          user({'type': 'audio', 'path': 'hi.wav'},
               {'type': 'image', 'path': 'img/tall.png'},
               {'type': 'text', 'text': 'Describe both.'}),
          {'role': 'model', 'content': 'A chirp and a tall picture.'}]},
      {'messages': [
          user({'type': 'text', 'text': 'No media here.'}),
          {'role': 'model', 'content': 'Fine.'}]},
      {'messages': [
          user({'type': 'audio', 'path': 'noise.wav'},
               {'type': 'text', 'text': 'Noise?'}),
          {'role': 'model', 'content': 'Yes.'}]},
  ]
  return tmp_path, write_dataset(tmp_path, lines)


def first_batches(path, tokenizer, count=2, **options):
  dataset = data.make_dataset(
      path, tokenizer, seq_len=120, batch_size=2, seed=0, shuffle=False,
      num_epochs=1, media=MEDIA, **options,
  )
  iterator = iter(dataset)
  return [next(iterator) for _ in range(count)], iterator


def test_expansion_matches_the_sampler_layout(gemma4_tokenizer):
  ids = gemma4_tokenizer.encode('A <|image|> B <|audio|> C', add_bos=True)
  weights = np.linspace(0.0, 1.0, len(ids))
  out_ids, out_weights = media_lib.expand_media_marks(
      ids, weights, gemma4_tokenizer, [5], [3]
  )
  expected = image_merge.expand_image_placeholders(
      np.array([ids]), [[5]], **image_merge.image_token_ids(gemma4_tokenizer)
  )
  expected = audio_merge.expand_audio_placeholders(
      expected, [[3]],
      audio_token=gemma4_tokenizer.piece_id('<|audio|>'),
      start_of_audio=gemma4_tokenizer.piece_id('<|audio>'),
      end_of_audio=gemma4_tokenizer.piece_id('<audio|>'),
  )[0]
  np.testing.assert_array_equal(out_ids, expected)
  # Text tokens keep their weights, a mark's weight moves to the first
  # token of its run, and every other added token has weight 0.
  marks = [gemma4_tokenizer.piece_id(p) for p in ('<|image|>', '<|audio|>')]
  added = [gemma4_tokenizer.piece_id(p)
           for p in ('\n\n', '<|image>', '<image|>', '<|audio>', '<audio|>')]
  is_text = ~np.isin(out_ids, added) & (out_ids >= 0)
  np.testing.assert_allclose(
      out_weights[is_text], weights[~np.isin(ids, marks)], rtol=1e-6
  )
  assert np.all(out_weights[out_ids < 0] == 0)
  assert np.sum(out_weights) == pytest.approx(np.sum(weights), rel=1e-6)


def test_rows_carry_their_media_in_order(media_files, gemma4_tokenizer):
  base, path = media_files
  batches, _ = first_batches(path, gemma4_tokenizer)
  images = {
      name: preprocess.preprocess_images([str(base / 'img' / f'{name}.png')], 70)
      for name in ('wide', 'tall')
  }
  clips = {
      name: features.load_audio(base / f'{name}.wav') for name in ('hi', 'noise')
  }
  seen_images, seen_clips = set(), set()
  for batch in batches:
    assert media_lib.EXAMPLE_IDS not in batch
    tokens, targets, weights = (
        batch['tokens'], batch['targets'], batch['loss_weights']
    )
    # No weight on any placeholder, as input or as target.
    assert np.all(weights[(tokens < 0) | (targets < 0)] == 0)
    for row in range(len(tokens)):
      runs = run_lengths(tokens[row], image_merge.SOFT_TOKEN_PLACEHOLDER)
      slots = [
          int(np.sum(batch['image_positions'][row, i, :, 0] >= 0)) // 9
          for i in range(MEDIA.max_images_per_row)
      ]
      assert [s for s in slots if s] == runs
      for slot, count in enumerate(slots[: len(runs)]):
        name = next(
            n for n, b in images.items()
            if np.array_equal(b.patches[0], batch['image_patches'][row, slot])
        )
        assert images[name].soft_token_counts[0] == count
        seen_images.add(name)
      audio_runs = run_lengths(tokens[row], audio_merge.AUDIO_SOFT_TOKEN_PLACEHOLDER)
      counts = [int(c) for c in batch['audio_counts'][row] if c]
      assert counts == audio_runs
      for slot in range(len(counts)):
        length = int(batch['audio_lengths'][row, slot])
        name = next(
            n for n, c in clips.items()
            if len(c) == length
            and np.array_equal(c, batch['audio_waveforms'][row, slot, :length])
        )
        assert features.num_soft_tokens(length) == counts[slot]
        seen_clips.add(name)
  assert seen_images == {'wide', 'tall'}
  assert seen_clips == {'hi', 'noise'}


def run_lengths(row, value):
  runs, count = [], 0
  for token in list(row) + [0]:
    if token == value:
      count += 1
    elif count:
      runs.append(count)
      count = 0
  return runs


def test_batch_runs_through_the_model_loss(media_files, gemma4_tokenizer):
  _, path = media_files
  (batch, _), _ = first_batches(path, gemma4_tokenizer)
  cfg = dataclasses.replace(
      oracle.E2B_LIKE, vocab_size=262_144, vision=FAMILIES['e2b_e4b_like'],
      audio=test_audio_encoder.CONFIG,
  )
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
  loss, metrics = jax.jit(
      lambda p, b: loss_lib.model_loss(model, p, b, chunk_size=64)
  )(params, batch)
  assert np.isfinite(float(loss))
  assert float(metrics['weight_sum']) == float(np.sum(batch['loss_weights']))


def test_resume_restores_the_next_batch(media_files, gemma4_tokenizer):
  _, path = media_files
  (first, second), _ = first_batches(path, gemma4_tokenizer)
  dataset = data.make_dataset(
      path, gemma4_tokenizer, seq_len=120, batch_size=2, seed=0, shuffle=False,
      num_epochs=1, media=MEDIA,
  )
  iterator = iter(dataset)
  next(iterator)
  state = iterator.get_state()
  resumed = iter(dataset)
  resumed.set_state(json.loads(json.dumps(state)))
  batch = next(resumed)
  assert set(batch) == set(second)
  for key in second:
    np.testing.assert_array_equal(batch[key], second[key], err_msg=key)


def test_missing_media_file_names_the_line(media_files, gemma4_tokenizer):
  base, _ = media_files
  path = write_dataset(base, [{'messages': [
      user({'type': 'image', 'path': 'img/nowhere.png'}),
      {'role': 'model', 'content': 'No.'}]}])
  with pytest.raises(records_lib.DataFormatError, match=r'train.jsonl:1: .*nowhere.png'):
    first_batches(path, gemma4_tokenizer, count=1)


def test_too_many_images_for_the_slots(media_files, gemma4_tokenizer):
  base, _ = media_files
  image = {'type': 'image', 'path': 'img/wide.png'}
  path = write_dataset(base, [{'messages': [
      user(image, image, image), {'role': 'model', 'content': 'Three.'}]}])
  with pytest.raises(records_lib.DataFormatError, match='max_images_per_row=2'):
    first_batches(path, gemma4_tokenizer, count=1)


def test_media_parts_need_a_media_config(media_files, gemma4_tokenizer):
  _, path = media_files
  dataset = data.make_dataset(
      path, gemma4_tokenizer, seq_len=120, batch_size=2, seed=0, shuffle=False,
  )
  with pytest.raises(records_lib.DataFormatError, match='media=MediaConfig'):
    next(iter(dataset))
