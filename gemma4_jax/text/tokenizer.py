"""The Gemma 4 SentencePiece tokenizer.

Special tokens are looked up by their piece, so a tokenizer with other ids
works as long as it has the pieces. In the released tokenizer the turn,
tool, channel and media markers are user-defined symbols: SentencePiece
encodes their text inside any string as the single token, so a prompt
written as text (`'<|turn>user\\n...'`) encodes correctly. `<bos>`, `<eos>`
and `<pad>` are control symbols: their text encodes as ordinary characters
and they decode to the empty string, so they are added by id.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm


class TokenizerError(ValueError):
  """Base class of the tokenizer errors of this package."""


class MissingSpecialTokenError(TokenizerError):
  """The tokenizer lacks a special piece that the requested feature needs."""


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the Gemma 4 special pieces; None where the tokenizer lacks one."""

  pad: int | None
  eos: int | None
  bos: int | None
  unk: int | None
  start_of_turn: int | None  # <|turn>
  end_of_turn: int | None  # <turn|>
  start_of_tool: int | None  # <|tool>
  end_of_tool: int | None  # <tool|>
  start_of_tool_call: int | None  # <|tool_call>
  end_of_tool_call: int | None  # <tool_call|>
  start_of_tool_response: int | None  # <|tool_response>
  end_of_tool_response: int | None  # <tool_response|>
  string_delimiter: int | None  # <|"|>
  start_of_channel: int | None  # <|channel>
  end_of_channel: int | None  # <channel|>
  think: int | None  # <|think|>
  start_of_image: int | None  # <|image>
  image_placeholder: int | None  # <|image|>
  end_of_image: int | None  # <image|>
  start_of_audio: int | None  # <|audio>
  audio_placeholder: int | None  # <|audio|>
  end_of_audio: int | None  # <audio|>


# Field of `SpecialTokens` -> piece in the released Gemma 4 tokenizer.
SPECIAL_PIECES: dict[str, str] = {
    'pad': '<pad>',
    'eos': '<eos>',
    'bos': '<bos>',
    'unk': '<unk>',
    'start_of_turn': '<|turn>',
    'end_of_turn': '<turn|>',
    'start_of_tool': '<|tool>',
    'end_of_tool': '<tool|>',
    'start_of_tool_call': '<|tool_call>',
    'end_of_tool_call': '<tool_call|>',
    'start_of_tool_response': '<|tool_response>',
    'end_of_tool_response': '<tool_response|>',
    'string_delimiter': '<|"|>',
    'start_of_channel': '<|channel>',
    'end_of_channel': '<channel|>',
    'think': '<|think|>',
    'start_of_image': '<|image>',
    'image_placeholder': '<|image|>',
    'end_of_image': '<image|>',
    'start_of_audio': '<|audio>',
    'audio_placeholder': '<|audio|>',
    'end_of_audio': '<audio|>',
}

# Pieces without which no Gemma 4 prompt can be built.
REQUIRED_PIECES = ('<pad>', '<eos>', '<bos>', '<|turn>', '<turn|>')
# Pieces that the tool-use format needs.
TOOL_PIECES = (
    '<|tool>', '<tool|>', '<|tool_call>', '<tool_call|>', '<|tool_response>',
    '<tool_response|>', '<|"|>',
)
THINKING_PIECES = ('<|think|>', '<|channel>', '<channel|>')

_BYTE_PIECE_PREFIX = '<0x'


class Tokenizer:
  """A SentencePiece model with the Gemma 4 special tokens located by piece.

  Attributes:
    path: The `.model` file.
    special: Ids of the special pieces.
    vocab_size: Number of pieces.
  """

  def __init__(self, path: str | os.PathLike[str]):
    self.path = Path(path)
    if not self.path.is_file():
      raise FileNotFoundError(
          f'tokenizer model {self.path} not found; run `gemma4-jax'
          ' fetch-tokenizer` to download the Gemma 4 tokenizer'
      )
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self.vocab_size = self._sp.GetPieceSize()
    self.special = SpecialTokens(
        **{name: self._find_piece(piece) for name, piece in SPECIAL_PIECES.items()}
    )
    self.require(REQUIRED_PIECES, feature='every Gemma 4 prompt')

  def _find_piece(self, piece: str) -> int | None:
    # PieceToId returns the unknown id for a missing piece.
    token_id = self._sp.PieceToId(piece)
    if self._sp.IdToPiece(token_id) != piece:
      return None
    return token_id

  def require(self, pieces: Iterable[str], *, feature: str) -> None:
    """Check that the tokenizer has each piece, as one token in text.

    Raises:
      MissingSpecialTokenError: naming the first missing piece.
    """
    for piece in pieces:
      token_id = self._find_piece(piece)
      if token_id is None:
        raise MissingSpecialTokenError(
            f'tokenizer {self.path} has no piece {piece!r}, which {feature}'
            ' needs. Use the Gemma 4 tokenizer (`gemma4-jax fetch-tokenizer`),'
            ' or retrain the SentencePiece model with'
            f' user_defined_symbols including {piece!r}.'
        )
      # Control, unknown and byte pieces never come from text. For the
      # others, a model with add_dummy_prefix may put a space piece in front.
      from_text = not (
          self._sp.IsControl(token_id)
          or self._sp.IsUnknown(token_id)
          or self._sp.IsByte(token_id)
      )
      if from_text and token_id not in self._sp.EncodeAsIds(piece):
        raise MissingSpecialTokenError(
            f'tokenizer {self.path} has the piece {piece!r} (id {token_id}) but'
            ' does not encode its text as that one token, which'
            f' {feature} needs. Retrain the SentencePiece model with {piece!r}'
            ' among its user_defined_symbols.'
        )

  def piece_id(self, piece: str) -> int:
    """Return the id of a piece, raising if the tokenizer lacks it."""
    self.require([piece], feature=f'looking up {piece!r}')
    return self._sp.PieceToId(piece)

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))

  def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Encode text; special-token text such as `<|turn>` becomes that token.

    Args:
      text: The text. `<bos>`, `<eos>` and `<pad>` in it stay plain text.
      add_bos: Prepend `<bos>`, as a raw-text prompt needs. Pass False for a
        piece of text that continues a sequence.
      add_eos: Append `<eos>`.
    """
    ids = list(self._sp.EncodeAsIds(text))
    if add_bos:
      ids.insert(0, self.special.bos)
    if add_eos:
      ids.append(self.special.eos)
    return ids

  def decode(self, ids: int | Sequence[int] | np.ndarray) -> str:
    """Decode ids to text; control tokens (`<bos>`, `<eos>`, `<pad>`) vanish."""
    if isinstance(ids, (int, np.integer)):
      ids = [int(ids)]
    elif isinstance(ids, np.ndarray) or hasattr(ids, '__array__'):
      array = np.asarray(ids)
      if array.ndim > 1:
        raise ValueError(f'decode takes a 0- or 1-D array of ids, got shape {array.shape}')
      ids = array.reshape(-1).tolist()
    return self._sp.DecodeIds([int(i) for i in ids])

  def is_byte_piece(self, token_id: int) -> bool:
    return self._sp.IsByte(int(token_id))

  def incremental_detokenizer(self) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
  """Turn ids fed one at a time into text deltas for streaming.

  Joining the deltas gives `tokenizer.decode(all_ids)` for valid UTF-8. A
  delta never ends inside a UTF-8 character: bytes from byte-fallback pieces
  are held until the character is complete. `flush` returns what is still
  held at the end (a lone invalid byte decodes to U+FFFD, as in `decode`).
  """

  # A UTF-8 character is at most 4 bytes, so more held byte pieces than this
  # cannot complete one.
  _MAX_HELD_BYTES = 4

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer
    self._ids: list[int] = []
    # Text of ids[_prefix:_read] was already returned. Decoding from
    # `_prefix` rather than from 0 keeps each step short while giving the
    # decoder one piece of context for its whitespace handling.
    self._prefix = 0
    self._read = 0

  def push(self, token_id: int) -> str:
    """Add one id; return the newly settled text (possibly empty)."""
    self._ids.append(int(token_id))
    return self._settle(final=False)

  def flush(self) -> str:
    """Return the text still held back, such as an incomplete UTF-8 byte run."""
    return self._settle(final=True)

  def _settle(self, *, final: bool) -> str:
    if self._read == len(self._ids):
      return ''
    done = self._tokenizer.decode(self._ids[self._prefix : self._read])
    full = self._tokenizer.decode(self._ids[self._prefix :])
    held_bytes = 0
    for token_id in reversed(self._ids[self._read :]):
      if not self._tokenizer.is_byte_piece(token_id):
        break
      held_bytes += 1
    incomplete = full.endswith('\ufffd') and 0 < held_bytes < self._MAX_HELD_BYTES
    if incomplete and not final:
      return ''
    self._prefix, self._read = self._read, len(self._ids)
    # NOTE: if a new piece changed already returned text (no SentencePiece
    # model seen so far does), only the part after the common prefix is new.
    return full[len(os.path.commonprefix([done, full])) :]

