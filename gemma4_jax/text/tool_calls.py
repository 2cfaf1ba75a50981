"""Gemma 4 tool-call syntax: serialising values and parsing model output.

Gemma 4 writes structured values in a JSON-like syntax of its own: keys are
bare, strings sit between two `<|"|>` tokens and have no escapes, so a string
may contain `{`, `,`, `:` or even `<tool_call|>` but never `<|"|>` itself.
A call reads `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:15}<tool_call|>`.

A model turn may contain, in order, a thought
(`<|channel>thought\\n...<channel|>`), answer text, and one or more tool calls.
It ends with `<turn|>`, or with `<|tool_response>` when the model waits for
tool results. `StreamParser`
splits such text into events while it is generated, `parse_model_output`
does the same for a whole turn at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

STRING_DELIMITER = '<|"|>'
TOOL_CALL_START = '<|tool_call>'
TOOL_CALL_END = '<tool_call|>'
TOOL_RESPONSE_START = '<|tool_response>'
CHANNEL_START = '<|channel>'
CHANNEL_END = '<channel|>'
TURN_END = '<turn|>'
THOUGHT_CHANNEL_NAME = 'thought\n'

# Keys written bare; any other key is written between string delimiters,
# which `parse_value` also accepts.
_BARE_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_.\-]*\Z')
_BARE_KEY_CHAR = re.compile(r'[^\s{}\[\],:<>|"]')
_NUMBER = re.compile(r'-?\d+(\.\d+)?([eE][+-]?\d+)?')


class ToolCallSyntaxError(ValueError):
  """Text that should be a Gemma 4 value or tool call is not well formed."""

  def __init__(self, message: str, text: str, position: int):
    excerpt = text[max(0, position - 20) : position + 20]
    super().__init__(f'{message} at character {position} (near {excerpt!r})')
    self.position = position


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """A tool call: the function name and its typed arguments."""

  name: str
  arguments: dict[str, Any]


# ---------------------------------------------------------------------------
# Serialising.


def format_value(value: Any, *, sort_keys: bool = True) -> str:
  """Serialise a JSON-like value in the Gemma 4 syntax.

  Args:
    value: None, bool, int, float, str, a mapping with string keys, or a
      list or tuple of such values.
    sort_keys: Write mapping keys in the order of the official chat template
      (`dictsort`: case-insensitive). If False, keep the mapping's order.

  Returns:
    The text, for example `{a:<|"|>x<|"|>,b:[1,2.5,true,null]}`.

  Raises:
    ValueError: a string contains `<|"|>`, a float is not finite, a key is
      not a string, or the type is not supported.
  """
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise ValueError(
          f'cannot serialise the float {value!r}: the Gemma 4 syntax has no'
          ' NaN or infinity; pass a finite number, a string or null'
      )
    return repr(value)
  if isinstance(value, str):
    if STRING_DELIMITER in value:
      raise ValueError(
          f'the string {value!r} contains the delimiter {STRING_DELIMITER},'
          ' which Gemma 4 strings cannot escape; remove it or replace it'
      )
    return f'{STRING_DELIMITER}{value}{STRING_DELIMITER}'
  if isinstance(value, Mapping):
    return '{' + _format_items(value, sort_keys=sort_keys) + '}'
  if isinstance(value, (list, tuple)):
    return '[' + ','.join(format_value(v, sort_keys=sort_keys) for v in value) + ']'
  raise ValueError(
      f'cannot serialise a value of type {type(value).__name__} ({value!r});'
      ' convert it to None, bool, int, float, str, list or dict first'
  )


def _format_key(key: Any) -> str:
  if not isinstance(key, str):
    raise ValueError(f'mapping key {key!r} is not a string')
  if _BARE_KEY.match(key):
    return key
  return format_value(key)


def _sorted_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
  # Jinja's `dictsort` compares keys case-insensitively.
  return sorted(mapping.items(), key=lambda item: str(item[0]).lower())


def _format_items(mapping: Mapping[str, Any], *, sort_keys: bool) -> str:
  items = _sorted_items(mapping) if sort_keys else list(mapping.items())
  return ','.join(
      f'{_format_key(k)}:{format_value(v, sort_keys=sort_keys)}'
      for k, v in items
  )


def format_tool_call(
    name: str, arguments: Mapping[str, Any], *, sort_keys: bool = True
) -> str:
  """Write one tool call as the model writes it.

  `format_tool_call('f', {'q': 'x', 'n': 15})` returns
  `<|tool_call>call:f{n:15,q:<|"|>x<|"|>}<tool_call|>`.
  """
  _check_function_name(name)
  body = _format_items(arguments, sort_keys=sort_keys)
  return f'{TOOL_CALL_START}call:{name}{{{body}}}{TOOL_CALL_END}'


def format_tool_response(name: str, response: Any) -> str:
  """Write a tool result as the chat template does.

  A mapping becomes the fields of the response; any other value is wrapped
  as `{value:...}`.
  """
  _check_function_name(name)
  if isinstance(response, Mapping):
    body = _format_items(response, sort_keys=True)
  else:
    body = 'value:' + format_value(response)
  return f'{TOOL_RESPONSE_START}response:{name}{{{body}}}<tool_response|>'


def _check_function_name(name: str) -> None:
  if not name or any(c in name for c in '{}<>'):
    raise ValueError(
        f'invalid tool name {name!r}: it must be non-empty and contain no'
        ' braces or angle brackets'
    )


# ---------------------------------------------------------------------------
# Parsing values.


class _ValueParser:
  """Recursive-descent parser over one string, from a start position."""

  def __init__(self, text: str):
    self.text = text
    self.pos = 0

  def error(self, message: str) -> ToolCallSyntaxError:
    return ToolCallSyntaxError(message, self.text, self.pos)

  def skip_whitespace(self) -> None:
    while self.pos < len(self.text) and self.text[self.pos].isspace():
      self.pos += 1

  def expect(self, literal: str) -> None:
    if not self.text.startswith(literal, self.pos):
      raise self.error(f'expected {literal!r}')
    self.pos += len(literal)

  def value(self) -> Any:
    self.skip_whitespace()
    text, pos = self.text, self.pos
    if pos >= len(text):
      raise self.error('expected a value but the text ended')
    if text.startswith(STRING_DELIMITER, pos):
      return self.string()
    if text[pos] == '{':
      return self.mapping()
    if text[pos] == '[':
      return self.sequence()
    for literal, result in (('true', True), ('false', False), ('null', None)):
      if text.startswith(literal, pos) and not _is_word_char(text, pos + len(literal)):
        self.pos += len(literal)
        return result
    match = _NUMBER.match(text, pos)
    if match and not _is_word_char(text, match.end()):
      self.pos = match.end()
      if match.group(1) or match.group(2):
        return float(match.group(0))
      return int(match.group(0))
    raise self.error('expected a value (string, number, true, false, null, { or [)')

  def string(self) -> str:
    self.expect(STRING_DELIMITER)
    end = self.text.find(STRING_DELIMITER, self.pos)
    if end < 0:
      raise self.error(f'string has no closing {STRING_DELIMITER}')
    result = self.text[self.pos : end]
    self.pos = end + len(STRING_DELIMITER)
    return result

  def key(self) -> str:
    self.skip_whitespace()
    if self.text.startswith(STRING_DELIMITER, self.pos):
      return self.string()
    start = self.pos
    while self.pos < len(self.text) and _BARE_KEY_CHAR.match(self.text[self.pos]):
      self.pos += 1
    if self.pos == start:
      raise self.error('expected a key')
    return self.text[start : self.pos]

  def mapping(self) -> dict[str, Any]:
    self.expect('{')
    result: dict[str, Any] = {}
    self.skip_whitespace()
    if self.text.startswith('}', self.pos):
      self.pos += 1
      return result
    while True:
      key = self.key()
      self.skip_whitespace()
      self.expect(':')
      if key in result:
        raise self.error(f'duplicate key {key!r}')
      result[key] = self.value()
      self.skip_whitespace()
      if self.text.startswith(',', self.pos):
        self.pos += 1
      elif self.text.startswith('}', self.pos):
        self.pos += 1
        return result
      else:
        raise self.error("expected ',' or '}'")

  def sequence(self) -> list[Any]:
    self.expect('[')
    result: list[Any] = []
    self.skip_whitespace()
    if self.text.startswith(']', self.pos):
      self.pos += 1
      return result
    while True:
      result.append(self.value())
      self.skip_whitespace()
      if self.text.startswith(',', self.pos):
        self.pos += 1
      elif self.text.startswith(']', self.pos):
        self.pos += 1
        return result
      else:
        raise self.error("expected ',' or ']'")


def _is_word_char(text: str, pos: int) -> bool:
  return pos < len(text) and (text[pos].isalnum() or text[pos] in '_.')


def parse_value(text: str) -> Any:
  """Parse one value in the Gemma 4 syntax (the inverse of `format_value`).

  Raises:
    ToolCallSyntaxError: the text is not exactly one well-formed value.
  """
  parser = _ValueParser(text)
  result = parser.value()
  parser.skip_whitespace()
  if parser.pos != len(text):
    raise parser.error('unexpected text after the value')
  return result


def parse_tool_call(body: str) -> ToolCall:
  """Parse the text between `<|tool_call>` and `<tool_call|>`.

  Raises:
    ToolCallSyntaxError: the body is not `call:NAME{...}`.
  """
  parser = _ValueParser(body)
  parser.skip_whitespace()
  parser.expect('call:')
  brace = body.find('{', parser.pos)
  if brace < 0:
    raise parser.error("expected '{' after the function name")
  name = body[parser.pos : brace].strip()
  if not name or any(c in name for c in '<>}'):
    raise parser.error(f'invalid function name {name!r}')
  parser.pos = brace
  arguments = parser.mapping()
  parser.skip_whitespace()
  if parser.pos != len(body):
    raise parser.error('unexpected text after the arguments')
  return ToolCall(name=name, arguments=arguments)


# ---------------------------------------------------------------------------
# Parsing model output, streamed or whole.


@dataclasses.dataclass(frozen=True)
class TextDelta:
  """New answer text."""

  text: str


@dataclasses.dataclass(frozen=True)
class ThinkingDelta:
  """New text of the thought channel."""

  text: str


@dataclasses.dataclass(frozen=True)
class ToolCallEvent:
  """A tool call whose closing `<tool_call|>` has arrived."""

  tool_call: ToolCall


@dataclasses.dataclass(frozen=True)
class ParseWarning:
  """Output that was kept as answer text because it was malformed."""

  message: str


Event = TextDelta | ThinkingDelta | ToolCallEvent | ParseWarning


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
  """A model turn split into its parts.

  Attributes:
    thinking: Text of the thought channel without the `thought\\n` header,
      or None when the turn has no channel.
    answer: The remaining text, including the raw text of malformed calls.
    tool_calls: Well-formed calls, in order.
    warnings: One message per malformed or cut-off part.
  """

  thinking: str | None
  answer: str
  tool_calls: list[ToolCall]
  warnings: list[str]


_TEXT, _CHANNEL_HEADER, _THINKING, _CALL, _DONE = range(5)
_TEXT_MARKERS = (CHANNEL_START, TOOL_CALL_START, TURN_END, TOOL_RESPONSE_START)
# Markers that end a call which never got its `<tool_call|>`.
_CALL_BREAKERS = (TOOL_CALL_START, TURN_END, TOOL_RESPONSE_START)


def _partial_marker_length(buffer: str, markers: Iterable[str]) -> int:
  """Length of the longest buffer suffix that is a proper prefix of a marker."""
  longest = 0
  for marker in markers:
    for length in range(min(len(marker) - 1, len(buffer)), longest, -1):
      if buffer.endswith(marker[:length]):
        longest = length
        break
  return longest


def _find_first(buffer: str, markers: Iterable[str], start: int = 0) -> tuple[int, str]:
  best, found = -1, ''
  for marker in markers:
    index = buffer.find(marker, start)
    if index >= 0 and (best < 0 or index < best):
      best, found = index, marker
  return best, found


class StreamParser:
  """Split streamed model text into answer, thinking and tool-call events.

  Feed decoded text pieces of any size with `feed`; each call returns the
  events that the text so far settles. Text that could be the start of a
  marker (`<|tool_c`) is held back until the next piece decides it. Call
  `finish` once at the end: it flushes held text and reports a thought or
  call that the token limit cut off. A malformed or cut-off call never
  raises: its raw text comes back as a `TextDelta`, with a `ParseWarning`
  before it. Everything after `<turn|>` or `<|tool_response>` is ignored.
  """

  def __init__(self):
    self._buffer = ''
    self._state = _TEXT
    # Inside a call: how far the buffer was scanned, and whether that point
    # is inside a `<|"|>` string.
    self._scan_pos = 0
    self._in_string = False
    self._finished = False

  def feed(self, text: str) -> list[Event]:
    if self._finished:
      raise RuntimeError('StreamParser.feed called after finish')
    if self._state == _DONE:
      return []
    self._buffer += text
    events: list[Event] = []
    while self._step(events, final=False):
      pass
    return events

  def finish(self) -> list[Event]:
    if self._finished:
      return []
    self._finished = True
    events: list[Event] = []
    while self._step(events, final=True):
      pass
    if self._state == _CALL:
      _warn(events, 'tool call cut off before ' + TOOL_CALL_END + '; kept as text')
      events.append(TextDelta(TOOL_CALL_START + self._buffer))
    elif self._state in (_THINKING, _CHANNEL_HEADER):
      _warn(events, 'thought cut off before ' + CHANNEL_END)
      if self._buffer:
        events.append(ThinkingDelta(self._buffer))
    elif self._buffer and self._state == _TEXT:
      events.append(TextDelta(self._buffer))
    self._buffer = ''
    return events

  def _step(self, events: list[Event], *, final: bool) -> bool:
    """Consume what the buffer settles in the current state; True to go on."""
    if self._state == _TEXT:
      return self._step_text(events, final)
    if self._state == _CHANNEL_HEADER:
      return self._step_channel_header(events, final)
    if self._state == _THINKING:
      return self._step_thinking(events, final)
    if self._state == _CALL:
      return self._step_call(events)
    return False

  def _step_text(self, events: list[Event], final: bool) -> bool:
    index, marker = _find_first(self._buffer, _TEXT_MARKERS)
    if index < 0:
      keep = 0 if final else _partial_marker_length(self._buffer, _TEXT_MARKERS)
      settled = self._buffer[: len(self._buffer) - keep]
      if settled and not final:
        events.append(TextDelta(settled))
        self._buffer = self._buffer[len(settled) :]
      return False

    if index > 0:
      events.append(TextDelta(self._buffer[:index]))
    self._buffer = self._buffer[index + len(marker) :]
    if marker == CHANNEL_START:
      self._state = _CHANNEL_HEADER
    elif marker == TOOL_CALL_START:
      self._state = _CALL
      self._scan_pos = 0
      self._in_string = False
    else:
      self._state = _DONE
      self._buffer = ''
    return True

  def _step_channel_header(self, events: list[Event], final: bool) -> bool:
    if self._buffer.startswith(THOUGHT_CHANNEL_NAME):
      self._buffer = self._buffer[len(THOUGHT_CHANNEL_NAME) :]
    elif THOUGHT_CHANNEL_NAME.startswith(self._buffer) and not final:
      return False  # Wait for the rest of the channel name.
    events.append(ThinkingDelta(''))  # Marks that the turn has a channel.
    self._state = _THINKING
    return True

  def _step_thinking(self, events: list[Event], final: bool) -> bool:
    index = self._buffer.find(CHANNEL_END)
    if index < 0:
      keep = 0 if final else _partial_marker_length(self._buffer, (CHANNEL_END,))
      settled = self._buffer[: len(self._buffer) - keep]
      if settled and not final:
        events.append(ThinkingDelta(settled))
        self._buffer = self._buffer[len(settled) :]
      return False
    if index > 0:
      events.append(ThinkingDelta(self._buffer[:index]))
    self._buffer = self._buffer[index + len(CHANNEL_END) :]
    self._state = _TEXT
    return True

  def _step_call(self, events: list[Event]) -> bool:
    """Scan the call for its end, skipping `<|"|>` strings."""
    buffer = self._buffer
    while True:
      if self._in_string:
        index = buffer.find(STRING_DELIMITER, self._scan_pos)
        if index < 0:
          self._scan_pos = max(self._scan_pos, len(buffer) - len(STRING_DELIMITER) + 1)
          return False
        self._scan_pos = index + len(STRING_DELIMITER)
        self._in_string = False
        continue

      index, marker = _find_first(
          buffer, (STRING_DELIMITER, TOOL_CALL_END) + _CALL_BREAKERS, self._scan_pos
      )
      if index < 0:
        longest = max(len(m) for m in _CALL_BREAKERS + (TOOL_CALL_END,))
        self._scan_pos = max(self._scan_pos, len(buffer) - longest + 1)
        return False
      if marker == STRING_DELIMITER:
        self._scan_pos = index + len(marker)
        self._in_string = True
        continue

      body = buffer[:index]
      if marker == TOOL_CALL_END:
        self._emit_call(events, body)
        self._buffer = buffer[index + len(marker) :]
      else:
        _warn(
            events,
            f'tool call not closed by {TOOL_CALL_END} before {marker}; kept as text',
        )
        events.append(TextDelta(TOOL_CALL_START + body))
        self._buffer = buffer[index:]
      self._state = _TEXT
      return True

  def _emit_call(self, events: list[Event], body: str) -> None:
    try:
      call = parse_tool_call(body)
    except ToolCallSyntaxError as error:
      _warn(events, f'malformed tool call kept as text: {error}')
      events.append(TextDelta(TOOL_CALL_START + body + TOOL_CALL_END))
      return
    events.append(ToolCallEvent(call))


def _warn(events: list[Event], message: str) -> None:
  logger.warning('%s', message)
  events.append(ParseWarning(message))


def collect_events(events: Sequence[Event]) -> ParsedOutput:
  """Merge a turn's events into one `ParsedOutput`."""
  thinking: list[str] | None = None
  answer: list[str] = []
  calls: list[ToolCall] = []
  warnings: list[str] = []
  for event in events:
    if isinstance(event, TextDelta):
      answer.append(event.text)
    elif isinstance(event, ThinkingDelta):
      thinking = (thinking or []) + [event.text]
    elif isinstance(event, ToolCallEvent):
      calls.append(event.tool_call)
    else:
      warnings.append(event.message)
  return ParsedOutput(
      thinking=None if thinking is None else ''.join(thinking),
      answer=''.join(answer),
      tool_calls=calls,
      warnings=warnings,
  )


def parse_model_output(text: str) -> ParsedOutput:
  """Split a whole model turn into thinking, answer and tool calls.

  `text` is the decoded turn (special tokens as their text). The answer is
  returned unstripped. Malformed or cut-off calls end up in the answer as
  their raw text, with one entry in `warnings` each.
  """
  parser = StreamParser()
  events = parser.feed(text) + parser.finish()
  return collect_events(events)
