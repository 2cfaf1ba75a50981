"""`gemma4-jax generate` and `chat` with `--audio` on a small random checkpoint.

The checkpoint contains an E2B-like decoder with a small audio tower and the
real vocabulary, saved in the FLAT layout. The generated tokens must equal
those of `Sampler.generate` on the same prompt and clip, which
test_audio_sampler checks against the official sampler. Bad audio input
gets one error line each.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from gemma4_jax import checkpoint
from gemma4_jax.audio import features
from gemma4_jax.sampling.sampler import Sampler
from gemma4_jax.text import chat
from gemma4_jax.transformer import Transformer
from tests import oracle
from tests import test_audio_encoder
from tests.test_audio_features import chirp
from tests.test_cli_generate import error_lines, run_cli, save_tiny_checkpoint

MAX_NEW_TOKENS = 6
CONFIG = dataclasses.replace(
    oracle.E2B_LIKE,
    vocab_size=262_144,
    name='tiny_e2b_audio',
    audio=test_audio_encoder.CONFIG,
)


@pytest.fixture(scope='module')
def saved(tmp_path_factory, gemma4_tokenizer_path):
  base = tmp_path_factory.mktemp('audio_cli')
  shapes = jax.eval_shape(
      Transformer(config=CONFIG, dtype=jnp.float32).init,
      jax.random.key(0),
      jnp.ones((1, 8), jnp.int32),
  )['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda leaf: 0.1 * rng.standard_normal(leaf.shape, np.float32), shapes
  )
  params['audio_encoder'] = test_audio_encoder.randomize(
      shapes['audio_encoder']
  )
  checkpoint.save_params(params, base / 'ckpt', layout='flat')
  fields = dataclasses.asdict(CONFIG)
  fields['attention_pattern'] = [kind.value for kind in CONFIG.attention_pattern]
  (base / 'tiny.json').write_text(json.dumps(fields))

  clip = base / 'chirp.wav'
  soundfile.write(clip, chirp(0.6, sample_rate=22_050), 22_050)
  empty = base / 'empty.wav'
  soundfile.write(empty, np.zeros(0, np.float32), 16_000)
  broken = base / 'broken.wav'
  broken.write_bytes(clip.read_bytes()[:30])
  return {
      'ckpt': str(base / 'ckpt'),
      'config': str(base / 'tiny.json'),
      'clip': str(clip),
      'empty': str(empty),
      'broken': str(broken),
      'tokenizer': str(gemma4_tokenizer_path),
      'params': params,
  }


def cli_args(saved, command, *extra, clip=None):
  return [
      command,
      '--ckpt', saved['ckpt'],
      '--model', saved['config'],
      '--tokenizer', saved['tokenizer'],
      '--dtype', 'float32',
      '--max-new-tokens', str(MAX_NEW_TOKENS),
      '--audio', clip or saved['clip'],
      *extra,
  ]


def test_generate_with_audio_matches_sampler(saved, tmp_path, gemma4_tokenizer):
  output = tmp_path / 'out.jsonl'
  result = run_cli(
      *cli_args(saved, 'generate', '--prompt', 'What do you hear?',
                '--output', str(output))
  )
  assert result.returncode == 0, result.stderr
  (record,) = [json.loads(line) for line in output.read_text().splitlines()]

  messages = [{'role': 'user', 'content': [
      {'type': 'audio', 'audio': saved['clip']},
      {'type': 'text', 'text': 'What do you hear?'},
  ]}]
  text_ids = chat.encode_chat(gemma4_tokenizer, messages)
  clip = features.load_audio(saved['clip'])
  # The mark becomes <|audio>, the soft tokens, <audio|>.
  assert record['prompt_tokens'] == (
      len(text_ids) + features.num_soft_tokens(len(clip)) + 1
  )

  sampler = Sampler(
      Transformer(config=CONFIG, dtype=jnp.float32), saved['params'],
      gemma4_tokenizer,
  )
  expected = sampler.generate(
      [text_ids], audio=[chat.message_audio(messages)],
      max_new_tokens=MAX_NEW_TOKENS,
  )
  assert record['tokens'] == expected.tokens[0]


def test_chat_with_audio_answers(saved):
  result = run_cli(*cli_args(saved, 'chat'), stdin='What is it?\nAnd now?\n')
  assert result.returncode == 0, result.stderr
  assert not error_lines(result.stderr)


def test_mark_count_mismatch_is_usage_error(saved):
  result = run_cli(
      *cli_args(saved, 'generate', '--prompt', '<|audio|> and <|audio|>?')
  )
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert '2 <|audio|> marks but 1 --audio files' in line


@pytest.mark.parametrize(
    'clip, message',
    [('empty', 'has 0 samples'), ('broken', 'cannot read audio file'),
     ('missing', 'cannot read audio file')],
)
def test_bad_audio_file_is_one_error_line(saved, tmp_path, clip, message):
  path = saved.get(clip, str(tmp_path / 'missing.wav'))
  result = run_cli(*cli_args(saved, 'generate', '--prompt', 'Hi', clip=path))
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert '--audio' in line
  assert message in line


def test_audio_on_model_without_audio_tower_fails(
    saved, tmp_path_factory, gemma4_tokenizer_path
):
  text_only = save_tiny_checkpoint(tmp_path_factory, gemma4_tokenizer_path)
  result = run_cli(
      'generate', '--ckpt', text_only['kaggle'], '--model',
      text_only['config'], '--prompt', 'Hi', '--audio', saved['clip'],
      '--max-new-tokens', '2',
  )
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert 'only E2B and E4B hear audio' in line
