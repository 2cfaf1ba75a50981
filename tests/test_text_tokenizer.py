"""The Gemma 4 tokenizer wrapper, checked against the released tokenizer."""

from __future__ import annotations

import sentencepiece as spm
import pytest

from gemma4_jax.text import tokenizer as tokenizer_lib

# Ids of the released tokenizer, as published with the model.
_RELEASED_IDS = {
    'pad': 0, 'eos': 1, 'bos': 2, 'unk': 3,
    'start_of_tool': 46, 'end_of_tool': 47, 'start_of_tool_call': 48,
    'end_of_tool_call': 49, 'start_of_tool_response': 50,
    'end_of_tool_response': 51, 'string_delimiter': 52,
    'start_of_channel': 100, 'end_of_channel': 101,
    'start_of_turn': 105, 'end_of_turn': 106,
    'start_of_image': 255999, 'image_placeholder': 258880, 'end_of_image': 258882,
    'start_of_audio': 256000, 'audio_placeholder': 258881, 'end_of_audio': 258883,
}


def test_special_ids_match_release(gemma4_tokenizer):
  special = gemma4_tokenizer.special
  for name, expected in _RELEASED_IDS.items():
    assert getattr(special, name) == expected, name
  assert gemma4_tokenizer.vocab_size == 262144


def test_think_piece_found(gemma4_tokenizer):
  assert gemma4_tokenizer.id_to_piece(gemma4_tokenizer.special.think) == '<|think|>'


def test_encode_adds_bos_by_default(gemma4_tokenizer):
  assert gemma4_tokenizer.encode('Hi')[0] == 2
  assert gemma4_tokenizer.encode('Hi', add_bos=False)[0] != 2
  assert gemma4_tokenizer.encode('Hi', add_eos=True)[-1] == 1


def test_special_text_encodes_as_token(gemma4_tokenizer):
  ids = gemma4_tokenizer.encode('<|turn>user\nhi<turn|>\n', add_bos=False)
  assert ids[0] == 105
  assert ids[1:3] != [105]
  assert ids[2] == 107  # '\n'
  assert ids[-2:] == [106, 107]


def test_decode_keeps_special_text(gemma4_tokenizer):
  assert gemma4_tokenizer.decode([2, 48, 52, 1]) == '<|tool_call><|"|>'


def test_decode_accepts_numpy(gemma4_tokenizer):
  import numpy as np

  ids = gemma4_tokenizer.encode('Hello world', add_bos=False)
  assert gemma4_tokenizer.decode(np.asarray(ids, np.int32)) == 'Hello world'


@pytest.mark.parametrize(
    'text',
    [
        'Hello 😀 world',
        '日本語のテキストです。',
        'rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🫨 𓀀 ꙮ and \x01 control',
        'mix <|tool_call>call:f{a:<|"|>é<|"|>}<tool_call|> ok',
    ],
)
def test_incremental_detokenizer_equals_decode(gemma4_tokenizer, text):
  ids = gemma4_tokenizer.encode(text, add_bos=True)
  detokenizer = gemma4_tokenizer.incremental_detokenizer()
  deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
  assert ''.join(deltas) == gemma4_tokenizer.decode(ids)
  for delta in deltas:
    assert '\ufffd' not in delta


def test_incremental_detokenizer_holds_partial_bytes(gemma4_tokenizer):
  ids = gemma4_tokenizer.encode('𓀀', add_bos=False)
  byte_ids = [i for i in ids if gemma4_tokenizer.is_byte_piece(i)]
  assert len(byte_ids) == 4, 'test needs a character that falls back to bytes'
  detokenizer = gemma4_tokenizer.incremental_detokenizer()
  deltas = [detokenizer.push(i) for i in ids]
  assert deltas[:-1] == [''] * (len(ids) - 1)
  assert deltas[-1] == '𓀀'


def _train_tiny_model(tmp_path, user_defined_symbols):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(['hello world', 'the quick brown fox', 'tools and turns'] * 50))
  prefix = tmp_path / 'tiny'
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(prefix), vocab_size=60,
      model_type='bpe', pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      pad_piece='<pad>', eos_piece='<eos>', bos_piece='<bos>', unk_piece='<unk>',
      user_defined_symbols=user_defined_symbols, minloglevel=2,
  )
  return prefix.with_suffix('.model')


def test_custom_tokenizer_missing_tool_piece(tmp_path):
  path = _train_tiny_model(tmp_path, ['<|turn>', '<turn|>'])
  tokenizer = tokenizer_lib.Tokenizer(path)
  assert tokenizer.special.start_of_tool_call is None
  with pytest.raises(tokenizer_lib.MissingSpecialTokenError) as error:
    tokenizer.require(tokenizer_lib.TOOL_PIECES, feature='tool use')
  message = str(error.value)
  assert "'<|tool>'" in message
  assert 'user_defined_symbols' in message
  assert 'fetch-tokenizer' in message


def test_custom_tokenizer_missing_turn_piece(tmp_path):
  path = _train_tiny_model(tmp_path, ['<|tool_call>'])
  with pytest.raises(tokenizer_lib.MissingSpecialTokenError, match=r"'<\|turn>'"):
    tokenizer_lib.Tokenizer(path)


def test_missing_model_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='fetch-tokenizer'):
    tokenizer_lib.Tokenizer(tmp_path / 'absent.model')
