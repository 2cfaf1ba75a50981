"""`trainer.train` on conversations with image and audio parts.

A tiny E2B-like model with tiny towers, a small tokenizer that has the
Gemma 4 media pieces, and a JSONL file whose conversations name PNG and WAV
files. The run must train the decoder only (the towers are frozen and have
no optimizer state), resume from its checkpoint with the towers read again,
and export the towers unchanged beside the trained decoder.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
import soundfile

from gemma4_jax import checkpoint
from gemma4_jax.checkpoint import layouts
from gemma4_jax.training import trainer
from tests.test_audio_features import chirp
from tests.test_training_loop import WORDS
from tests.test_vision_checkpoint import flat

REPO_CONFIG = str(Path(__file__).resolve().parent.parent / 'configs' / 'tiny_smoke.py')


@pytest.fixture(scope='module')
def media_run(tmp_path_factory):
  from gemma4_jax.text.train_tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top

  base = tmp_path_factory.mktemp('media_run')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (96, 160, 3), np.uint8)).save(
      base / 'photo.png'
  )
  soundfile.write(base / 'clip.wav', chirp(0.5), 16_000)
  lines = []
  for i in range(12):
    words = ' '.join(rng.choice(WORDS, size=5))
    part = (
        {'type': 'image', 'path': 'photo.png'} if i % 2 == 0
        else {'type': 'audio', 'path': 'clip.wav'}
    )
    lines.append({'messages': [
        {'role': 'user', 'content': [part, {'type': 'text', 'text': 'Say?'}]},
        {'role': 'model', 'content': words},
    ]})
  train = base / 'train.jsonl'
  train.write_text(''.join(json.dumps(line) + '\n' for line in lines))
  texts = [' '.join(rng.choice(WORDS, size=30)) for _ in range(80)]
  tokenizer = train_tokenizer(
      texts, base / "tokenizer.model", vocab_size=400, digit_pairs=False
  )
  return base, train, tokenizer


def run_config(base, train, tokenizer, workdir, stop_after_steps=0):
  spec = importlib.util.spec_from_file_location('tiny_smoke', REPO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = module.get_config()
  run.workdir = str(workdir)
  run.tokenizer = str(tokenizer)
  run.data.train = str(train)
  run.data.seq_len = 96
  run.data.packing = False
  run.data.media.enabled = True
  run.data.media.image_budget = 70
  run.data.media.max_images_per_row = 1
  run.data.media.max_clips_per_row = 1
  run.data.media.max_clip_seconds = 1.0
  run.model.vision = (
      'embed_dim=16,num_layers=1,num_heads=2,hidden_dim=24,clipped_linears=true'
  )
  run.model.audio = 'embed_dim=16,num_layers=1,num_heads=2,soft_token_dim=12'
  run.optimizer.total_steps = 4
  run.optimizer.warmup_steps = 0
  run.stop_after_steps = stop_after_steps
  run.checkpoint.every_steps = 2
  run.checkpoint.async_save = False
  run.export.layout = 'nested'
  return run


def test_media_run_trains_decoder_and_keeps_towers(media_run, tmp_path):
  base, train, tokenizer = media_run
  workdir = tmp_path / 'run'
  first = trainer.train(run_config(base, train, tokenizer, workdir, 2))
  assert first.last_step == 2
  assert np.isfinite(first.last_metrics['loss'])

  # The train state has the decoder only: no tower in it or its moments.
  metadata = ocp.StandardCheckpointer().metadata(
      workdir / trainer.CHECKPOINT_DIR / '2' / 'state'
  )
  paths = [
      jax.tree_util.keystr(path)
      for path, _ in jax.tree_util.tree_leaves_with_path(
          getattr(metadata, 'item_metadata', metadata)
      )
  ]
  assert any("['mu']['embedder']['input_embedding']" in p for p in paths)
  assert not [p for p in paths if 'vision' in p or 'audio' in p or 'mm_' in p]

  result = trainer.train(run_config(base, train, tokenizer, workdir))
  assert result.start_step == 2
  assert result.last_step == 4
  exported = checkpoint.load_params(result.export_path, text_only=False)
  towers = layouts.split_multimodal(exported)[1]
  assert 'vision_encoder' in towers
  assert 'audio_encoder' in towers

  # Frozen: the exported towers equal those of the seeded initialisation,
  # which the random start and the resumed run both read.
  run = run_config(base, train, tokenizer, workdir)
  cfg = trainer.model_config(run, trainer.Tokenizer(str(tokenizer)))
  initial = trainer.Transformer(config=cfg).init(
      jax.random.key(run.seed), jax.numpy.ones((1, 8), jax.numpy.int32)
  )['params']
  initial_towers = layouts.split_multimodal(initial)[1]
  for key, value in flat(initial_towers).items():
    np.testing.assert_array_equal(flat(towers)[key], value, err_msg=key)
  decoder = flax.traverse_util.flatten_dict(
      layouts.split_multimodal(initial)[0], sep='/'
  )
  moved = [
      key for key, value in flat(layouts.split_multimodal(exported)[0]).items()
      if not np.array_equal(value, decoder[key])
  ]
  assert 'embedder/input_embedding' in moved
