"""Fine-tuning records: JSONL lines read, checked and encoded with loss weights.

Three kinds of line are accepted:

- conversation: `{"messages": [...], "tools": [...]}` with the roles and
  fields of `gemma4_jax.text.chat.format_chat` (`tools` is optional);
- plain text: `{"text": "..."}`;
- prompt/response pair: `{"prompt": "...", "response": "..."}`, trained as
  a user turn followed by a model turn.

A line's kind is found from its keys (`source='auto'`) or fixed for every
line by `source`. Errors name the file, the line number and the problem.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma4_jax.text import chat as chat_lib
from gemma4_jax.text.tokenizer import Tokenizer

CHAT = 'chat'
TEXT = 'text'
PROMPT_RESPONSE = 'prompt_response'
SOURCES = ('auto', CHAT, TEXT, PROMPT_RESPONSE)

# The keys that identify each kind of line.
_KIND_KEYS = {CHAT: ('messages',), TEXT: ('text',), PROMPT_RESPONSE: ('prompt', 'response')}
_ROLES = ('system', 'developer', 'user', 'model', 'assistant', 'tool')


class DataFormatError(ValueError):
  """A training file or one of its lines is malformed."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One training example as read from a JSONL line.

  Attributes:
    path: The file it came from.
    line_number: Its 1-based line number in that file.
    kind: `CHAT`, `TEXT` or `PROMPT_RESPONSE`.
    data: The decoded JSON object.
  """

  path: str
  line_number: int
  kind: str
  data: Mapping[str, Any]

  @property
  def location(self) -> str:
    return f'{self.path}:{self.line_number}'


def _detect_kind(data: Mapping[str, Any]) -> str | None:
  kinds = [kind for kind, keys in _KIND_KEYS.items() if all(k in data for k in keys)]
  if len(kinds) > 1:
    raise ValueError(
        f'the keys {sorted(data)} match more than one kind of example'
        f' ({", ".join(kinds)}); keep the keys of one kind, or pass source='
        f'{kinds[0]!r} to choose'
    )
  return kinds[0] if kinds else None


def _check_string(data: Mapping[str, Any], key: str) -> None:
  if not isinstance(data[key], str):
    raise ValueError(f'"{key}" must be a string, got {type(data[key]).__name__}')


def _check_messages(data: Mapping[str, Any]) -> None:
  messages = data['messages']
  if not isinstance(messages, list) or not messages:
    raise ValueError('"messages" must be a non-empty list of message objects')
  for index, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f'message {index} must be an object, got {type(message).__name__}')
    role = message.get('role')
    if role not in _ROLES:
      raise ValueError(
          f'message {index} has role {role!r}; use one of {", ".join(_ROLES)}'
      )
    calls = message.get('tool_calls')
    if calls is not None and not isinstance(calls, list):
      raise ValueError(f'message {index}: "tool_calls" must be a list')
  tools = data.get('tools')
  if tools is not None and not isinstance(tools, list):
    raise ValueError(f'"tools" must be a list of tool specs, got {type(tools).__name__}')


def _check_record(data: Any, kind: str) -> None:
  """Raise ValueError naming what is wrong with a decoded line of `kind`."""
  missing = [key for key in _KIND_KEYS[kind] if key not in data]
  if missing:
    raise ValueError(f'a {kind} example needs the key(s) {missing}, found {sorted(data)}')
  if kind == CHAT:
    _check_messages(data)
  else:
    for key in _KIND_KEYS[kind]:
      _check_string(data, key)


def parse_line(line: str, *, source: str = 'auto') -> tuple[str, dict[str, Any]] | None:
  """Decode one JSONL line into `(kind, data)`; None for a blank line.

  Raises:
    ValueError: the line is not a JSON object of a known kind.
  """
  if not line.strip():
    return None
  try:
    data = json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f'invalid JSON: {error}') from None
  if not isinstance(data, dict):
    raise ValueError(f'expected a JSON object, got {type(data).__name__}')

  if source == 'auto':
    kind = _detect_kind(data)
    if kind is None:
      raise ValueError(
          f'cannot tell the kind of example from the keys {sorted(data)}; a line'
          ' needs "messages", "text", or "prompt" and "response"'
      )
  else:
    kind = source
  _check_record(data, kind)
  return kind, data


def _expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  expanded = []
  for path in paths:
    path = Path(path)
    if path.is_dir():
      expanded.extend(sorted(path.glob('*.jsonl')))
    elif glob.has_magic(str(path)):
      expanded.extend(Path(match) for match in sorted(glob.glob(str(path))))
    else:
      expanded.append(path)
  if not expanded:
    raise FileNotFoundError(f'no JSONL files found at {paths}')
  return expanded


def read_jsonl(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    source: str = 'auto',
) -> list[Record]:
  """Read and check every line of one or more JSONL files.

  Args:
    paths: A file, a directory (its `*.jsonl` files, sorted), a glob
      pattern, or a list of these. Files are read in the given order.
    source: 'auto' to find each line's kind from its keys, or one of
      'chat', 'text', 'prompt_response' to require that kind on every line.

  Returns:
    The records of all non-blank lines, in file order.

  Raises:
    FileNotFoundError: a path does not exist.
    DataFormatError: a line is malformed; the message names the file and line.
  """
  if source not in SOURCES:
    raise ValueError(f'source={source!r} is not supported; use one of {", ".join(SOURCES)}')

  records = []
  for path in _expand_paths(paths):
    if not path.is_file():
      raise FileNotFoundError(f'training file {path} not found')
    with open(path, encoding='utf-8') as file:
      for line_number, line in enumerate(file, start=1):
        try:
          parsed = parse_line(line, source=source)
        except ValueError as error:
          raise DataFormatError(f'{path}:{line_number}: {error}') from None
        if parsed is not None:
          kind, data = parsed
          records.append(Record(str(path), line_number, kind, data))
  if not records:
    raise DataFormatError(f'no examples found in {paths}: every line is blank')
  return records


def encode_record(record: Record, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Encode a record as token ids and per-token loss weights.

  Conversations and prompt/response pairs take their weights from
  `chat.encode_chat_for_training`: 1.0 on what the model writes in its turns
  (closing `<turn|>` included), 0.0 elsewhere. Plain text is
  `<bos> TEXT <eos>` with weight 1.0 on every token after `<bos>`, so the
  model also learns where a document ends.

  Returns:
    `(ids [N] int32, weights [N] float32)`.

  Raises:
    DataFormatError: the record cannot be formatted (an unknown tool-call
      form, for example); the message names its file and line.
  """
  data = record.data
  try:
    if record.kind == TEXT:
      ids = tokenizer.encode(data['text'], add_bos=True, add_eos=True)
      weights = [0.0] + [1.0] * (len(ids) - 1)
    elif record.kind == PROMPT_RESPONSE:
      messages = [
          {'role': 'user', 'content': data['prompt']},
          {'role': 'model', 'content': data['response']},
      ]
      ids, weights = chat_lib.encode_chat_for_training(tokenizer, messages)
    else:
      ids, weights = chat_lib.encode_chat_for_training(
          tokenizer, data['messages'], tools=data.get('tools') or None
      )
  except (ValueError, TypeError, KeyError) as error:
    raise DataFormatError(f'{record.location}: cannot encode the {record.kind} example: {error}') from error
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)
