"""`gemma4-jax chat`: streamed answers, the KV cache kept between turns, /reset.

The expected prefill counts come from the Gemma 4 chat layout written out by
hand: after the first turn, a turn feeds only its own text.
"""

from __future__ import annotations

import pathlib
import re

import jax.numpy as jnp
import pytest

from gemma4_jax import checkpoint
from gemma4_jax import generation_cli
from gemma4_jax.sampling import sampler as sampler_lib
from gemma4_jax.transformer import Transformer
from tests import test_cli_generate

MAX_NEW_TOKENS = 4
_TURN_LOG = re.compile(r'turn (\d+): prefilled (\d+) tokens, generated (\d+)')


@pytest.fixture(scope='module')
def saved(tmp_path_factory, gemma4_tokenizer_path):
  return test_cli_generate.save_tiny_checkpoint(
      tmp_path_factory, gemma4_tokenizer_path
  )


@pytest.fixture(scope='module')
def sampler(saved, gemma4_tokenizer):
  config = generation_cli.config_from_json(pathlib.Path(saved['config']))
  params = checkpoint.load_params(saved['bare'], config=config, dtype=jnp.float32)
  model = Transformer(config=config, dtype=jnp.float32)
  return sampler_lib.Sampler(model, params, gemma4_tokenizer)


def _next_turn_length(tokenizer, text: str, answer_ended_turn: bool) -> int:
  """Tokens a continued turn feeds, by the hand-written chat layout.

  The previous answer's last token comes first: it was generated but not
  yet stored in the cache. `<turn|>` closes the answer unless the model
  wrote it.
  """
  closing = '' if answer_ended_turn else '<turn|>'
  turn = f'{closing}\n<|turn>user\n{text}<turn|>\n<|turn>model\n'
  return 1 + len(tokenizer.encode(turn, add_bos=False))


def _first_turn_length(tokenizer, text: str) -> int:
  turn = f'<|turn>user\n{text}<turn|>\n<|turn>model\n'
  return len(tokenizer.encode(turn, add_bos=True))


def test_chat_cli_streams_three_answers(saved, gemma4_tokenizer):
  result = test_cli_generate.run_cli(
      '-v', 'chat',
      '--ckpt', saved['kaggle'],
      '--model', saved['config'],
      '--dtype', 'float32',
      '--max-new-tokens', str(MAX_NEW_TOKENS),
      stdin='Hello\nHow are you?\n/reset\nHi again\n/exit\n',
  )

  assert result.returncode == 0, result.stderr
  assert result.stdout.strip()
  turns = [tuple(map(int, m)) for m in _TURN_LOG.findall(result.stderr)]
  assert [t[0] for t in turns] == [1, 2, 3], result.stderr
  assert turns[0][1] == _first_turn_length(gemma4_tokenizer, 'Hello')
  # The second turn feeds its own text only, not the first turn again.
  assert turns[1][1] in (
      _next_turn_length(gemma4_tokenizer, 'How are you?', True),
      _next_turn_length(gemma4_tokenizer, 'How are you?', False),
  )
  # After /reset the third turn starts a new conversation.
  assert turns[2][1] == _first_turn_length(gemma4_tokenizer, 'Hi again')
  assert 'error:' not in result.stderr


def test_chat_session_second_turn_feeds_new_text(sampler):
  session = generation_cli.ChatSession(
      sampler, cache_length=256, max_new_tokens=MAX_NEW_TOKENS
  )
  tokenizer = sampler.tokenizer

  first = list(session.send('Hello'))
  first_stats = session.last_stats
  second = list(session.send('How are you?'))

  assert first_stats.prefill_tokens == _first_turn_length(tokenizer, 'Hello')
  assert session.last_stats.prefill_tokens == _next_turn_length(
      tokenizer, 'How are you?', first[-1] == tokenizer.special.end_of_turn
  )
  # Every fed and generated token but the last answer token is in the cache.
  assert session.cache_used == (
      first_stats.prefill_tokens
      + session.last_stats.prefill_tokens
      + len(first) - 1
      + len(second) - 1
  )


def test_chat_session_reset_starts_new_conversation(sampler):
  session = generation_cli.ChatSession(
      sampler, cache_length=256, max_new_tokens=MAX_NEW_TOKENS
  )
  list(session.send('Hello'))

  session.reset()
  list(session.send('Hi again'))

  assert session.last_stats.prefill_tokens == _first_turn_length(
      sampler.tokenizer, 'Hi again'
  )


def test_chat_session_full_cache_raises(sampler):
  first_length = _first_turn_length(sampler.tokenizer, 'Hello')
  session = generation_cli.ChatSession(
      sampler,
      cache_length=first_length + MAX_NEW_TOKENS + 2,
      max_new_tokens=MAX_NEW_TOKENS,
  )
  list(session.send('Hello'))
  used = session.cache_used

  with pytest.raises(generation_cli.CacheFullError, match='/reset'):
    list(session.send('How are you?'))

  assert session.cache_used == used
  session.reset()
  assert list(session.send('Hello'))
