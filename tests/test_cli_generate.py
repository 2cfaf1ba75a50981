"""`gemma4-jax generate` on a small random checkpoint with the real tokenizer.

The model is random, so the tests check the structure of the output (exit
status, JSONL fields, token counts) and compare prompt lengths with the
Gemma 4 chat layout written out by hand here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import checkpoint
from gemma4_jax.transformer import Transformer
from tests import oracle

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 5
PROMPTS = ('Hello', 'Write a haiku about the sea.')

# The saved checkpoint, shared by the CLI test modules of one session.
_SAVED: dict[str, dict[str, str]] = {}


def save_tiny_checkpoint(tmp_path_factory, tokenizer_path) -> dict[str, str]:
  """Save a small random model once per session; return its paths.

  Keys: 'kaggle' (a directory with the checkpoint and tokenizer.model beside
  it), 'bare' (the checkpoint alone), 'config' (JSON of its Gemma4Config).
  """
  if _SAVED:
    return _SAVED
  config = dataclasses.replace(
      oracle.DENSE_LIKE, vocab_size=262_144, name='tiny_31b_like'
  )
  params = Transformer(config=config, dtype=jnp.float32).init(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']
  base = tmp_path_factory.mktemp('cli_checkpoint')
  checkpoint.save_params(params, base / 'bare' / 'ckpt')

  kaggle = base / 'kaggle'
  kaggle.mkdir()
  (kaggle / 'ckpt').symlink_to(base / 'bare' / 'ckpt')
  shutil.copy(tokenizer_path, kaggle / 'tokenizer.model')

  fields = dataclasses.asdict(config)
  fields['attention_pattern'] = [kind.value for kind in config.attention_pattern]
  (base / 'tiny.json').write_text(json.dumps(fields))
  _SAVED.update(
      kaggle=str(kaggle), bare=str(base / 'bare'), config=str(base / 'tiny.json')
  )
  return _SAVED


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_REPO_ROOT)
  return subprocess.run(
      [sys.executable, '-m', 'gemma4_jax.cli', *args],
      input=stdin,
      capture_output=True,
      text=True,
      env=env,
      cwd=_REPO_ROOT,
      timeout=300,
  )


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if 'error:' in line]


@pytest.fixture(scope='module')
def saved(tmp_path_factory, gemma4_tokenizer_path):
  return save_tiny_checkpoint(tmp_path_factory, gemma4_tokenizer_path)


def _generate_args(saved, *extra: str) -> list[str]:
  return [
      'generate',
      '--ckpt', saved['kaggle'],
      '--model', saved['config'],
      '--dtype', 'float32',
      '--max-new-tokens', str(MAX_NEW_TOKENS),
      *extra,
  ]


@pytest.fixture(scope='module')
def chat_records(saved, tmp_path_factory):
  """JSONL records of PROMPTS in the chat format, read from a JSONL file."""
  directory = tmp_path_factory.mktemp('generate_chat')
  prompts_file = directory / 'prompts.jsonl'
  prompts_file.write_text(
      ''.join(json.dumps({'prompt': p}) + '\n' for p in PROMPTS)
  )
  output = directory / 'out.jsonl'
  result = run_cli(
      *_generate_args(
          saved, '--prompts-file', str(prompts_file), '--output', str(output)
      )
  )
  assert result.returncode == 0, result.stderr
  return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.fixture(scope='module')
def raw_records(saved, tmp_path_factory):
  """JSONL records of PROMPTS sent raw, read from a one-per-line file."""
  directory = tmp_path_factory.mktemp('generate_raw')
  prompts_file = directory / 'prompts.txt'
  prompts_file.write_text('\n'.join(PROMPTS) + '\n')
  output = directory / 'out.jsonl'
  result = run_cli(
      *_generate_args(
          saved,
          '--raw',
          '--prompts-file', str(prompts_file),
          '--output', str(output),
      )
  )
  assert result.returncode == 0, result.stderr
  return [json.loads(line) for line in output.read_text().splitlines()]


def test_generate_prints_answers(saved, chat_records):
  args = []
  for prompt in PROMPTS:
    args += ['--prompt', prompt]
  result = run_cli(*_generate_args(saved, *args))

  assert result.returncode == 0, result.stderr
  assert result.stdout.strip()
  assert result.stdout.count('--- prompt ') == len(PROMPTS)
  # Greedy decoding: the printed answers are those of the JSONL run.
  for record in chat_records:
    assert record['answer'] in result.stdout


def test_generate_jsonl_fields(chat_records):
  assert [r['prompt'] for r in chat_records] == list(PROMPTS)
  for record in chat_records:
    for field in ('text', 'answer', 'thinking', 'tool_calls', 'num_tokens'):
      assert field in record
    assert 1 <= record['num_tokens'] <= MAX_NEW_TOKENS
    assert record['num_tokens'] == len(record['tokens'])


def test_generate_jsonl_tokens_decode_to_text(chat_records, gemma4_tokenizer):
  for record in chat_records:
    assert gemma4_tokenizer.decode(record['tokens']) == record['text']


def test_generate_chat_format_prompt_length(chat_records, gemma4_tokenizer):
  for record in chat_records:
    turn = f'<|turn>user\n{record["prompt"]}<turn|>\n<|turn>model\n'
    expected = len(gemma4_tokenizer.encode(turn, add_bos=True))
    assert record['prompt_tokens'] == expected


def test_generate_raw_prompt_length(raw_records, chat_records, gemma4_tokenizer):
  for raw, chat in zip(raw_records, chat_records):
    assert raw['prompt_tokens'] == len(gemma4_tokenizer.encode(raw['prompt']))
    assert raw['prompt_tokens'] < chat['prompt_tokens']


def test_generate_missing_tokenizer_error(saved):
  result = run_cli(
      'generate', '--ckpt', saved['bare'], '--model', saved['config'],
      '--prompt', 'Hello',
  )

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert saved['bare'] in lines[0]
  assert '--tokenizer' in lines[0]
  assert 'fetch-tokenizer' in lines[0]
  assert 'Traceback' not in result.stderr


def test_generate_wrong_checkpoint_error(saved, tmp_path):
  missing = tmp_path / 'no_such_checkpoint'
  result = run_cli('generate', '--ckpt', str(missing), '--prompt', 'Hello')

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert str(missing) in lines[0]
  assert 'check the path' in lines[0]
  assert 'Traceback' not in result.stderr


def test_generate_overlong_prompt_error(saved):
  prompt = 'one two three four five six seven eight nine ten'
  result = run_cli(
      *_generate_args(saved, '--cache-length', '16', '--prompt', prompt)
  )

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert '--cache-length is 16' in lines[0]
  assert 'raise --cache-length' in lines[0]
  assert 'Traceback' not in result.stderr


def test_generate_undetected_model_error(saved):
  result = run_cli('generate', '--ckpt', saved['kaggle'], '--prompt', 'Hello')

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert '--model' in lines[0]
  assert 'Traceback' not in result.stderr


def test_generate_prompt_flags_exclusive(saved, tmp_path):
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('Hello\n')
  result = run_cli(
      *_generate_args(
          saved, '--prompt', 'Hi', '--prompts-file', str(prompts_file)
      )
  )

  assert result.returncode == 2
  assert len(error_lines(result.stderr)) == 1, result.stderr
