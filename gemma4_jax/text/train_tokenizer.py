"""Train a small SentencePiece model that has the Gemma 4 special pieces.

    path = train_tokenizer('train.jsonl', '/tmp/demo/tokenizer.model', vocab_size=1536)
    tokenizer = Tokenizer(path)   # chat formatting and tool-call parsing work

The released Gemma 4 tokenizer has 262144 pieces, too many for a model
trained from scratch in minutes. This trains a BPE model on your own text
with the released layout of the first 109 ids:

- 0 `<pad>`, 1 `<eos>`, 2 `<bos>` are control symbols and 3 `<unk>` the
  unknown piece, as in the release;
- ids 4 to 108 hold the release's pieces as user-defined symbols. Among
  them are the tool markers at 46 to 52, `<|think|>` at 98, the channel
  markers at 100 and 101, the turn markers at 105 and 106, and `\\n`,
  `\\n\\n` at 107 and 108. The gaps hold the release's `<mask>`,
  `[multimodal]` and `<unusedN>` pieces.

Then come, as user-defined symbols too, the image and audio markers at 109
to 114 (the release has them at 255999 and up, beyond a small vocabulary),
by default the space piece `▁` at 115 and the digit pairs `00` to `99` at
116 to 215 (see `train_tokenizer`), then the 256 byte pieces (byte
fallback, so any text encodes) and the learned pieces.

User-defined symbols are split off before BPE runs, so `<|turn>` inside any
text encodes as that one token and a learned piece never spans a marker or a
newline, which `chat.encode_chat_for_training` relies on. The normaliser is
the identity, with no dummy prefix and no whitespace folding, as in the
release, so `decode(encode(text)) == text` for any text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from gemma4_jax.text import chat as chat_lib

# The pieces of the released tokenizer at ids 4 to 108, in id order.
_RELEASED_LOW_PIECES = (
    ['<mask>', '[multimodal]']
    + [f'<unused{i}>' for i in range(0, 40)]  # ids 6 to 45
    + ['<|tool>', '<tool|>', '<|tool_call>', '<tool_call|>', '<|tool_response>', '<tool_response|>', '<|"|>']
    + [f'<unused{i}>' for i in range(40, 85)]  # ids 53 to 97
    + ['<|think|>', '<unused85>', '<|channel>', '<channel|>']
    + ['<unused86>', '<unused87>', '<unused88>']  # ids 102 to 104
    + ['<|turn>', '<turn|>', '\n', '\n\n']
)
# Media markers, which the release keeps at ids 255999 and above.
_MEDIA_PIECES = ['<|image>', '<|audio>', '<|image|>', '<|audio|>', '<image|>', '<audio|>']
USER_DEFINED_PIECES: tuple[str, ...] = tuple(_RELEASED_LOW_PIECES + _MEDIA_PIECES)
# SentencePiece's internal form of a space.
SPACE_PIECE = '\u2581'
DIGIT_PAIR_PIECES: tuple[str, ...] = tuple(f'{n:02d}' for n in range(100))


def _extra_pieces(separate_spaces: bool, digit_pairs: bool) -> list[str]:
  return ([SPACE_PIECE] if separate_spaces else []) + (list(DIGIT_PAIR_PIECES) if digit_pairs else [])


def num_fixed_pieces(separate_spaces: bool = True, digit_pairs: bool = True) -> int:
  """Pieces before the learned ones: reserved, user-defined and 256 bytes."""
  return 4 + len(USER_DEFINED_PIECES) + len(_extra_pieces(separate_spaces, digit_pairs)) + 256


def _chat_texts(path: str | os.PathLike[str]) -> Iterator[str]:
  """The formatted text of every conversation of a JSONL file of records."""
  # Imported here: `training.records` imports the text package.
  from gemma4_jax.training import records as records_lib  # pylint: disable=g-import-not-at-top

  for record in records_lib.read_jsonl(path):
    data = record.data
    if record.kind == records_lib.TEXT:
      yield data['text']
      continue
    if record.kind == records_lib.PROMPT_RESPONSE:
      messages = [
          {'role': 'user', 'content': data['prompt']},
          {'role': 'model', 'content': data['response']},
      ]
      tools = None
    else:
      messages, tools = data['messages'], data.get('tools') or None
    text = chat_lib.format_chat(messages, tools=tools, add_generation_prompt=False)
    # `<bos>` is added by id, never written as text.
    yield text.removeprefix(chat_lib.BOS_TEXT)


def train_tokenizer(
    texts_or_jsonl: str | os.PathLike[str] | Iterable[str],
    out_path: str | os.PathLike[str],
    *,
    vocab_size: int = 2048,
    separate_spaces: bool = True,
    digit_pairs: bool = True,
    seed: int = 0,
) -> Path:
  """Train a BPE SentencePiece model with the Gemma 4 special pieces.

  Args:
    texts_or_jsonl: Training text: an iterable of strings, or the path of a
      JSONL file of `training.records` lines, whose conversations are
      formatted with `chat.format_chat` (tool declarations included).
    out_path: Where to write the `.model` file; its directory is created.
    vocab_size: Number of pieces, the fixed ones (`num_fixed_pieces`)
      included.
    separate_spaces: Make the space a piece of its own (id 115, after the
      media markers), so that no learned piece holds a space. A word then
      has the same tokens in a request (`in Paris`) as between `<|"|>`
      delimiters in a tool call (`<|"|>Paris<|"|>`), and copying a value
      is copying tokens; a model trained from scratch learns that far
      sooner. It costs about one token per word. False keeps the release's
      pieces that start with a space (`▁Paris`).
    digit_pairs: Make the 100 strings `00` to `99` pieces (after the space
      piece), so that a run of digits splits into pairs from its left:
      `2025` is `20 25` and `411` is `41 1`, in a request and in a call
      alike. A model copies a number in half as many tokens, each less
      ambiguous than a single digit. False keeps the release's one piece per
      digit.
    seed: Seed of SentencePiece's random generator. Training runs on one
      thread over all the text in the given order, so the same text and
      seed give a byte-identical file.

  Returns:
    `out_path`, for `Tokenizer(...)`.

  Raises:
    ValueError: `vocab_size` leaves no room for learned pieces, or the text
      has fewer distinct pieces than `vocab_size` asks for.
  """
  fixed = num_fixed_pieces(separate_spaces, digit_pairs)
  if vocab_size <= fixed:
    raise ValueError(
        f'vocab_size={vocab_size} must exceed the {fixed} fixed pieces'
        ' (reserved, special, space, digit-pair and byte pieces)'
    )
  if isinstance(texts_or_jsonl, (str, os.PathLike)):
    texts = list(_chat_texts(texts_or_jsonl))
  else:
    texts = list(texts_or_jsonl)
  if not texts:
    raise ValueError('no training text given')
  # The trainer skips longer sentences; none may be lost.
  max_bytes = max(len(text.encode('utf-8')) for text in texts)

  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type='bpe',
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece='<pad>',
        eos_piece='<eos>',
        bos_piece='<bos>',
        unk_piece='<unk>',
        user_defined_symbols=list(USER_DEFINED_PIECES) + _extra_pieces(separate_spaces, digit_pairs),
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name='identity',
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        # Unlike the release, pieces may join letters and punctuation
        # (`call:`, `},type:`), which shortens tool declarations by about a
        # third. Pieces still never span two words.
        split_by_unicode_script=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_bytes + 1,
        num_threads=1,
        minloglevel=2,
    )
  except RuntimeError as error:
    # SentencePiece raises RuntimeError for a vocabulary larger than the
    # text supports ("Vocabulary size too high").
    raise ValueError(f'SentencePiece training failed for vocab_size={vocab_size}: {error}') from error

  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp_path = out_path.with_name(out_path.name + '.tmp')
  tmp_path.write_bytes(model.getvalue())
  os.replace(tmp_path, out_path)
  return out_path
