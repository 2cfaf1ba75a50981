"""`gemma4-jax generate` and `chat` with `--image` on a small random checkpoint.

The checkpoint contains a 31B-like decoder with a small vision tower and the
real vocabulary. The generated tokens must equal those of `Sampler.generate`
on the same prompt and image, which test_vision_sampler checks against the
official sampler, and the prompt length must equal the chat layout plus the
image's expansion, counted here by hand.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from gemma4_jax import checkpoint
from gemma4_jax.sampling.sampler import Sampler
from gemma4_jax.text import chat
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import preprocess
from tests import oracle
from tests.test_cli_generate import error_lines, run_cli, save_tiny_checkpoint
from tests.test_vision_encoder import FAMILIES

MAX_NEW_TOKENS = 6
BUDGET = 70
CONFIG = dataclasses.replace(
    oracle.DENSE_LIKE,
    vocab_size=262_144,
    name='tiny_31b_vision',
    vision=FAMILIES['26b_31b_like'],
)


@pytest.fixture(scope='module')
def saved(tmp_path_factory, gemma4_tokenizer_path):
  base = tmp_path_factory.mktemp('vision_cli')
  shapes = jax.eval_shape(
      Transformer(config=CONFIG, dtype=jnp.float32).init,
      jax.random.key(0),
      jnp.ones((1, 8), jnp.int32),
  )['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda leaf: 0.1 * rng.standard_normal(leaf.shape, np.float32), shapes
  )
  checkpoint.save_params(params, base / 'ckpt', layout='flat')
  fields = dataclasses.asdict(CONFIG)
  fields['attention_pattern'] = [kind.value for kind in CONFIG.attention_pattern]
  (base / 'tiny.json').write_text(json.dumps(fields))

  rng = np.random.default_rng(0)
  image = base / 'portrait.png'
  Image.fromarray(rng.integers(0, 256, (200, 120, 3), np.uint8)).save(image)
  return {
      'ckpt': str(base / 'ckpt'),
      'config': str(base / 'tiny.json'),
      'image': str(image),
      'tokenizer': str(gemma4_tokenizer_path),
      'params': params,
  }


def cli_args(saved, command, *extra):
  return [
      command,
      '--ckpt', saved['ckpt'],
      '--model', saved['config'],
      '--tokenizer', saved['tokenizer'],
      '--dtype', 'float32',
      '--max-new-tokens', str(MAX_NEW_TOKENS),
      '--image', saved['image'],
      '--image-budget', str(BUDGET),
      *extra,
  ]


def test_generate_with_image_matches_sampler(saved, tmp_path, gemma4_tokenizer):
  output = tmp_path / 'out.jsonl'
  result = run_cli(
      *cli_args(saved, 'generate', '--prompt', 'What is shown?', '--output',
                str(output))
  )
  assert result.returncode == 0, result.stderr
  (record,) = [json.loads(line) for line in output.read_text().splitlines()]

  messages = [{'role': 'user', 'content': [
      {'type': 'image', 'image': saved['image']},
      {'type': 'text', 'text': 'What is shown?'},
  ]}]
  # A custom model gets no empty thought (only the 26B-A4B and 31B presets).
  text_ids = chat.encode_chat(gemma4_tokenizer, messages)
  soft_tokens = preprocess.soft_token_count(200, 120, BUDGET)
  # The mark becomes \n\n, <|image>, the soft tokens, <image|>, \n\n.
  assert record['prompt_tokens'] == len(text_ids) + soft_tokens + 3

  sampler = Sampler(
      Transformer(config=CONFIG, dtype=jnp.float32), saved['params'],
      gemma4_tokenizer,
  )
  expected = sampler.generate(
      [text_ids], images=[chat.message_images(messages)],
      image_budget=BUDGET, max_new_tokens=MAX_NEW_TOKENS,
  )
  assert record['tokens'] == expected.tokens[0]


def test_chat_with_image_answers(saved):
  result = run_cli(
      *cli_args(saved, 'chat'), stdin='Describe it.\nAnd now?\n'
  )
  assert result.returncode == 0, result.stderr
  assert not error_lines(result.stderr)


def test_mark_count_mismatch_is_usage_error(saved):
  result = run_cli(
      *cli_args(saved, 'generate', '--prompt', 'A <|image|> and <|image|>.')
  )
  assert result.returncode == 2
  (line,) = error_lines(result.stderr)
  assert '2 <|image|> marks but 1 --image files' in line


def test_image_on_text_only_checkpoint_fails(
    saved, tmp_path_factory, gemma4_tokenizer_path
):
  text_only = save_tiny_checkpoint(tmp_path_factory, gemma4_tokenizer_path)
  vision = dataclasses.asdict(FAMILIES['26b_31b_like'])
  fields = json.loads(open(text_only['config']).read())
  fields['vision'] = vision
  config = tmp_path_factory.mktemp('vision_json') / 'with_vision.json'
  config.write_text(json.dumps(fields))
  result = run_cli(
      'generate', '--ckpt', text_only['kaggle'], '--model', str(config),
      '--prompt', 'Hi', '--image', saved['image'], '--max-new-tokens', '2',
  )
  assert result.returncode != 0
  assert 'no vision tower' in result.stderr
  assert 'drop --image' in result.stderr
