"""Generation with audio equals the official `gemma` 4.0.1 `Gemma4Sampler`.

A small random E2B-like model with the small conformer of
`test_audio_encoder` uses the real 262144-piece vocabulary and tokenizer, so
prompts are real text with `<|audio|>` marks. Chat prompts with audio parts
are also checked against the Hugging Face chat template.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from gemma4_jax.audio import features
from gemma4_jax.sampling.sampler import Sampler
from gemma4_jax.text import chat
from gemma4_jax.transformer import Transformer
from tests import oracle
from tests import test_audio_encoder
from tests.test_audio_features import chirp, noise
from tests.test_text_chat import _render_official
from tests.test_vision_model import lively_params
from tests.test_vision_sampler import assert_row_matches

NEW_TOKENS = 20


@functools.cache
def full_vocab_model():
  """Official model, random parameters of every path, real vocabulary."""
  from gemma.gm.nn.gemma4 import _gemma4

  text_config = dataclasses.replace(oracle.E2B_LIKE, vocab_size=262_144)
  official = _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=dataclasses.replace(
          oracle.official_config(text_config),
          audio_encoder=test_audio_encoder.official_conformer_config(),
      ),
      dtype=jnp.float32,
      text_only=False,
  )
  clips = features.prepare_audio([chirp(0.5)])
  # `<bos>`, `<|audio>`, 12 placeholders, `<audio|>`.
  tokens = jnp.asarray([[2, 256000] + [-4] * 12 + [258883]])
  shapes = jax.eval_shape(
      lambda: official.init(
          jax.random.key(0),
          tokens,
          audio=jnp.asarray(clips.waveforms)[None],
          audio_lengths=jnp.asarray(clips.lengths)[None],
          audio_soft_token_counts=clips.soft_token_counts,
      )
  )['params']
  params = lively_params(shapes)
  params['audio_encoder'] = test_audio_encoder.randomize(
      shapes['audio_encoder']
  )
  cfg = dataclasses.replace(text_config, audio=test_audio_encoder.CONFIG)
  return cfg, official, params


def official_tokens(official, params, tokenizer_path, prompt, clips):
  from gemma import gm

  sampler = gm.text.Gemma4Sampler(
      model=official,
      params=params,
      tokenizer=gm.text.Gemma4Tokenizer(path=str(tokenizer_path)),
      cache_length=512,
      max_out_length=NEW_TOKENS + 8,
  )
  out = sampler.sample(
      prompt, audio=clips, max_new_tokens=NEW_TOKENS, return_state=True
  )
  return np.asarray(out.state.predicted_tokens)


def our_sampler(tokenizer):
  cfg, _, params = full_vocab_model()
  return Sampler(Transformer(config=cfg, dtype=jnp.float32), params, tokenizer)


def test_greedy_tokens_match_official_sampler(
    gemma4_tokenizer, gemma4_tokenizer_path
):
  _, official, params = full_vocab_model()
  clips = [chirp(0.5), noise(1.3, seed=1)]
  marks = ' then '.join(['<|audio|>'] * len(clips))
  prompt = f'Transcribe {marks} word for word.'
  expected = official_tokens(
      official, params, gemma4_tokenizer_path, prompt, clips
  )[0]

  ours = our_sampler(gemma4_tokenizer).generate(
      [prompt], audio=[clips], max_new_tokens=NEW_TOKENS
  )
  assert_row_matches(ours.tokens[0], expected)
  assert len(ours.tokens[0]) >= 16


def test_chat_with_audio_file_matches_official_sampler(
    gemma4_tokenizer, gemma4_tokenizer_path, tmp_path
):
  """A 44.1 kHz stereo FLAC file in a chat message, resampled to 16 kHz."""
  _, official, params = full_vocab_model()
  left = chirp(0.8, sample_rate=44_100)
  stereo = np.stack([left, 0.5 * left], axis=1)
  path = tmp_path / 'clip.flac'
  soundfile.write(path, stereo, 44_100)
  messages = [{
      'role': 'user',
      'content': [
          {'type': 'audio', 'audio': str(path)},
          {'type': 'text', 'text': ' What is this sound?'},
      ],
  }]
  text = chat.format_chat(messages).removeprefix(chat.BOS_TEXT)
  clip = features.load_audio(path)
  expected = official_tokens(
      official, params, gemma4_tokenizer_path, text, [clip]
  )[0]

  ours = our_sampler(gemma4_tokenizer).generate(
      [text], audio=[chat.message_audio(messages)], max_new_tokens=NEW_TOKENS
  )
  assert_row_matches(ours.tokens[0], expected)


def test_batch_rows_match_single_prompts(gemma4_tokenizer):
  """A batch with different clips per row equals each row alone."""
  sampler = our_sampler(gemma4_tokenizer)
  prompts = ['Hear <|audio|> now.', 'No audio here.', '<|audio|> or <|audio|>?']
  # One clip at 8 kHz, given with its rate.
  audio = [[chirp(0.7)], [], [(chirp(1.1, sample_rate=8000), 8000), noise(0.4)]]
  batch = sampler.generate(prompts, audio=audio, max_new_tokens=6)
  for row, (prompt, clips) in enumerate(zip(prompts, audio)):
    alone = sampler.generate([prompt], audio=[clips], max_new_tokens=6)
    assert alone.tokens[0] == batch.tokens[row], f'prompt {row} differs'


def test_chat_audio_parts_match_template():
  messages = [
      {'role': 'user', 'content': [
          {'type': 'text', 'text': 'Listen:  '},
          {'type': 'audio', 'audio': 'a.wav'},
          {'type': 'image', 'path': 'b.png'},
          {'type': 'audio', 'path': 'c.flac'},
      ]},
      {'role': 'assistant', 'content': 'Two sounds.'},
      {'role': 'user', 'content': 'Thanks.'},
  ]
  ours = chat.format_chat(messages, empty_thought_when_not_thinking=True)
  assert ours == _render_official(messages)
  assert chat.message_audio(messages) == ['a.wav', 'c.flac']
  assert chat.message_images(messages) == ['b.png']


def test_audio_part_without_clip_is_rejected():
  messages = [{'role': 'user', 'content': [{'type': 'audio'}]}]
  with pytest.raises(ValueError, match='audio part .* has no audio'):
    chat.format_chat(messages)


def test_clip_count_must_match_marks(gemma4_tokenizer):
  with pytest.raises(ValueError, match='1 `<|audio|>` marks but 2 audio clips'):
    our_sampler(gemma4_tokenizer).generate(
        ['Hear <|audio|>.'], audio=[[chirp(0.5), chirp(0.6)]],
        max_new_tokens=2,
    )


def test_empty_clip_is_rejected(gemma4_tokenizer):
  with pytest.raises(ValueError, match='audio clip 0: .* 0 samples'):
    our_sampler(gemma4_tokenizer).generate(
        ['Hear <|audio|>.'], audio=[[np.zeros(0, np.float32)]],
        max_new_tokens=2,
    )


def test_model_without_audio_tower_rejects_audio(gemma4_tokenizer):
  cfg = dataclasses.replace(oracle.DENSE_LIKE, vocab_size=262_144)
  sampler = Sampler(Transformer(config=cfg, dtype=jnp.float32), {},
                    gemma4_tokenizer)
  with pytest.raises(ValueError, match='no audio encoder'):
    sampler.generate(['Hear <|audio|>.'], audio=[[chirp(0.5)]],
                     max_new_tokens=2)
