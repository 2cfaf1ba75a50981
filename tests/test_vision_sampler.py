"""Generation with images equals the official `gemma` 4.0.1 `Gemma4Sampler`.

A small random 31B-like model (bidirectional image attention in sliding
layers) with a standardised vision tower uses the real 262144-piece
vocabulary and tokenizer, so prompts are real text with `<|image|>` marks.
The official sampler preprocesses the images itself, at a 70-token budget
(`max_soft_tokens=70`, its encoder's `output_length` equal to it). Chat
prompts with image parts are also checked against the Hugging Face chat
template.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from gemma4_jax.sampling.sampler import Sampler
from gemma4_jax.text import chat
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import merge, preprocess
from tests import oracle
from tests.test_text_chat import _render_official
from tests.test_vision_encoder import FAMILIES, mixed_images, official_encoder
from tests.test_vision_model import lively_params, official_images

BUDGET = 70
NEW_TOKENS = 20


@functools.cache
def full_vocab_model():
  """Official model, random parameters of every path, real vocabulary."""
  from gemma.gm.nn.gemma4 import _gemma4

  text_config = dataclasses.replace(oracle.DENSE_LIKE, vocab_size=262_144)
  vision_config = FAMILIES['26b_31b_like']
  official = _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=dataclasses.replace(
          oracle.official_config(text_config),
          vision_encoder=official_encoder(vision_config, BUDGET),
      ),
      dtype=jnp.float32,
      text_only=False,
  )
  images = preprocess.preprocess_images(mixed_images()[2:], BUDGET)
  tokens = merge.expand_image_placeholders(
      np.array([[2, 258880, 3]]), [images.soft_token_counts],
      image_token=258880, start_of_image=255999, end_of_image=258882,
      double_newline=108,
  )
  shapes = jax.eval_shape(
      lambda: official.init(
          jax.random.key(0), jnp.asarray(tokens),
          images=official_images(images, slice(0, 1)),
      )
  )
  params = lively_params(shapes['params'])
  cfg = dataclasses.replace(text_config, vision=vision_config)
  return cfg, official, params


def official_tokens(official, params, tokenizer_path, prompt, images):
  from gemma import gm

  sampler = gm.text.Gemma4Sampler(
      model=official,
      params=params,
      tokenizer=gm.text.Gemma4Tokenizer(path=str(tokenizer_path)),
      cache_length=512,
      max_out_length=NEW_TOKENS + 8,
      max_soft_tokens=BUDGET,
  )
  out = sampler.sample(
      prompt, images=images, max_new_tokens=NEW_TOKENS, return_state=True
  )
  return np.asarray(out.state.predicted_tokens)


def assert_row_matches(ours, official_row):
  assert len(ours) >= 1
  assert ours == official_row[: len(ours)].tolist()
  if len(ours) < NEW_TOKENS:
    # The official output is zero after its stop token.
    assert official_row[len(ours)] == 0


@pytest.mark.parametrize(
    'image_indices', [(0, 1), (2,)], ids=['panorama_portrait', 'icon']
)
def test_greedy_tokens_match_official_sampler(
    image_indices, gemma4_tokenizer, gemma4_tokenizer_path
):
  cfg, official, params = full_vocab_model()
  images = [mixed_images()[i] for i in image_indices]
  marks = ' and '.join(['<|image|>'] * len(images))
  prompt = f'Compare {marks} in a few words, please.'
  expected = official_tokens(
      official, params, gemma4_tokenizer_path, prompt, images
  )[0]

  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  ours = sampler.generate(
      [prompt], images=[images], image_budget=BUDGET,
      max_new_tokens=NEW_TOKENS,
  )
  assert_row_matches(ours.tokens[0], expected)
  assert len(ours.tokens[0]) >= 16


def test_batch_rows_match_single_prompts(gemma4_tokenizer):
  """A batch with different images per row equals each row alone."""
  cfg, _, params = full_vocab_model()
  panorama, portrait, icon = mixed_images()
  prompts = ['Describe <|image|> now.', 'No image here at all.',
             'Is <|image|> like <|image|>?']
  images = [[panorama], [], [portrait, icon]]
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  batch = sampler.generate(
      prompts, images=images, image_budget=BUDGET, max_new_tokens=6
  )
  for row, (prompt, row_images) in enumerate(zip(prompts, images)):
    alone = sampler.generate(
        [prompt], images=[row_images], image_budget=BUDGET, max_new_tokens=6
    )
    assert alone.tokens[0] == batch.tokens[row], f'prompt {row} differs'


def test_chat_with_image_parts_matches_official_sampler(
    gemma4_tokenizer, gemma4_tokenizer_path, tmp_path
):
  cfg, official, params = full_vocab_model()
  portrait = mixed_images()[1]
  path = tmp_path / 'portrait.png'
  Image.fromarray(portrait).save(path)
  messages = [{
      'role': 'user',
      'content': [
          {'type': 'text', 'text': 'What is this? '},
          {'type': 'image', 'image': str(path)},
          {'type': 'text', 'text': ' Answer briefly.'},
      ],
  }]
  text = chat.format_chat(messages).removeprefix(chat.BOS_TEXT)
  expected = official_tokens(
      official, params, gemma4_tokenizer_path, text, [portrait]
  )[0]

  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  ours = sampler.generate(
      [text], images=[chat.message_images(messages)], image_budget=BUDGET,
      max_new_tokens=NEW_TOKENS,
  )
  assert_row_matches(ours.tokens[0], expected)


def test_chat_image_parts_match_template():
  icon = Image.fromarray(mixed_images()[2])
  messages = [
      {'role': 'user', 'content': [
          {'type': 'image', 'image': icon},
          {'type': 'text', 'text': '  What is it?  '},
          {'type': 'image', 'path': 'second.png'},
      ]},
      {'role': 'assistant', 'content': 'A square.'},
      {'role': 'user', 'content': 'Thanks.'},
  ]
  # The template is the 31B one, which adds an empty thought.
  ours = chat.format_chat(messages, empty_thought_when_not_thinking=True)
  assert ours == _render_official(messages)
  assert chat.message_images(messages) == [icon, 'second.png']


def test_image_count_must_match_marks(gemma4_tokenizer):
  cfg, _, params = full_vocab_model()
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  with pytest.raises(ValueError, match='1 `<|image|>` marks but 2 images'):
    sampler.generate(
        ['See <|image|>.'], images=[mixed_images()[:2]], max_new_tokens=2
    )


def test_text_only_model_rejects_images(gemma4_tokenizer):
  cfg = dataclasses.replace(oracle.DENSE_LIKE, vocab_size=262_144)
  model = Transformer(config=cfg, dtype=jnp.float32)
  sampler = Sampler(model, {}, gemma4_tokenizer)
  with pytest.raises(ValueError, match='no vision encoder'):
    sampler.generate(
        ['See <|image|>.'], images=[mixed_images()[2:]], max_new_tokens=2
    )
