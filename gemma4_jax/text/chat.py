"""Gemma 4 chat prompts: messages and tools to the exact prompt text and ids.

The layout follows the official Gemma 4 chat template (`chat_template.jinja`
of the Hugging Face release):

  <bos><|turn>system\\n[<|think|>\\n]SYSTEM[<|tool>declaration:...<tool|>...]<turn|>\\n
  <|turn>user\\nTEXT<turn|>\\n
  <|turn>model\\n[<|channel>thought\\nTHOUGHT\\n<channel|>]<|tool_call>call:f{...}<tool_call|>
      <|tool_response>response:f{...}<tool_response|>ANSWER<turn|>\\n
  <|turn>model\\n

The system turn appears when there is a system message, tools, or thinking.
Tool calls, their responses and the answer that follows share one model
turn. Earlier thoughts are dropped from history; a model message's
`reasoning` is kept only for tool-calling messages after the last user turn.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gemma4_jax.text import tool_calls as tool_calls_lib
from gemma4_jax.text import tools as tools_lib
from gemma4_jax.text.tokenizer import THINKING_PIECES, TOOL_PIECES, Tokenizer

BOS_TEXT = '<bos>'
# The marks a prompt contains where an image or an audio clip goes. The
# sampler expands them.
IMAGE_MARK = '<|image|>'
AUDIO_MARK = '<|audio|>'
_MEDIA_MARKS = {'image': IMAGE_MARK, 'audio': AUDIO_MARK}
# The prompt suffix that the 26B-A4B and 31B templates add when thinking is
# off: an empty, closed thought. The E2B and E4B templates do not add it.
EMPTY_THOUGHT = '<|channel>thought\n<channel|>'

Message = Mapping[str, Any]
_ROLE_ALIASES = {'assistant': 'model', 'developer': 'system'}
_ROLES = ('system', 'user', 'model', 'tool')


def _role(message: Message) -> str:
  role = message.get('role')
  role = _ROLE_ALIASES.get(role, role)
  if role not in _ROLES:
    raise ValueError(
        f'message role {message.get("role")!r} is not supported; use one of'
        ' system, user, model (or assistant), tool'
    )
  return role


def content_text(message: Message) -> str:
  """Return a message's text: its string content or its joined text parts."""
  content = message.get('content')
  if content is None:
    return ''
  if isinstance(content, str):
    return content
  if isinstance(content, Sequence):
    parts = []
    for item in content:
      if not isinstance(item, Mapping) or item.get('type') != 'text':
        raise ValueError(
            f'content item {item!r} is not supported: only text parts'
            " ({'type': 'text', 'text': ...}) can be formatted here"
        )
      parts.append(item.get('text', ''))
    return ''.join(parts)
  raise ValueError(f'message content must be a string, got {type(content).__name__}')


def _is_media_part(item: Any) -> bool:
  return isinstance(item, Mapping) and item.get('type') in _MEDIA_MARKS


def _media_of(item: Mapping[str, Any]) -> Any:
  """Return the medium of a part: its `image` or `audio` value, else `path`."""
  kind = item['type']
  medium = item.get(kind, item.get('path'))
  if medium is None:
    example = (
        'PATH_OR_PIL_IMAGE_OR_ARRAY' if kind == 'image'
        else 'PATH_OR_16KHZ_ARRAY_OR_(ARRAY, SAMPLE_RATE)'
    )
    raise ValueError(
        f'{kind} part {item!r} has no {kind}; pass {{"type": "{kind}",'
        f' "{kind}": {example}}}'
    )
  return medium


def _message_media(messages: Sequence[Message], kind: str) -> list[Any]:
  media = []
  for message in messages:
    content = message.get('content')
    if isinstance(content, Sequence) and not isinstance(content, str):
      media.extend(
          _media_of(item)
          for item in content
          if isinstance(item, Mapping) and item.get('type') == kind
      )
  return media


def message_images(messages: Sequence[Message]) -> list[Any]:
  """Collect the images of all image parts of `messages`, in prompt order.

  An image part is `{'type': 'image', 'image': X}` (or `'path': X`), where X
  is a file path, a PIL image or an array. `format_chat` writes `<|image|>`
  for each part; pass these images, in this order, to `Sampler.generate`.
  """
  return _message_media(messages, 'image')


def message_audio(messages: Sequence[Message]) -> list[Any]:
  """Collect the clips of all audio parts of `messages`, in prompt order.

  An audio part is `{'type': 'audio', 'audio': X}` (or `'path': X`), where X
  is a file path, a 16 kHz array or a (samples, sample_rate) pair.
  `format_chat` writes `<|audio|>` for each part; pass these clips, in this
  order, to `Sampler.generate(audio=...)`.
  """
  return _message_media(messages, 'audio')


def _turn_text(message: Message, role: str) -> str:
  """Render the text of a turn, with a mark for each image or audio part.

  Like the official template, each text part is trimmed (model turns: its
  thinking stripped) on its own, and the parts are joined without a space.
  """
  content = message.get('content')
  if not isinstance(content, Sequence) or isinstance(content, str):
    text = content_text(message)
    return strip_thinking(text) if role == 'model' else text.strip()
  if not any(_is_media_part(item) for item in content):
    text = content_text(message)
    return strip_thinking(text) if role == 'model' else text.strip()
  parts = []
  for item in content:
    if _is_media_part(item):
      _media_of(item)
      parts.append(_MEDIA_MARKS[item['type']])
    elif isinstance(item, Mapping) and item.get('type') == 'text':
      text = item.get('text', '')
      parts.append(strip_thinking(text) if role == 'model' else text.strip())
    else:
      raise ValueError(
          f'content item {item!r} is not supported: use text parts'
          " ({'type': 'text', 'text': ...}), image parts"
          " ({'type': 'image', 'image': ...}) and audio parts"
          " ({'type': 'audio', 'audio': ...})"
      )
  return ''.join(parts)


def strip_thinking(text: str) -> str:
  """Remove `<|channel>...<channel|>` sections and surrounding whitespace."""
  pieces = []
  for part in text.split(tool_calls_lib.CHANNEL_END):
    if tool_calls_lib.CHANNEL_START in part:
      part = part.split(tool_calls_lib.CHANNEL_START)[0]
    pieces.append(part)
  return ''.join(pieces).strip()


def call_name_and_arguments(call: Any) -> tuple[str, Any]:
  """Return the name and arguments of an OpenAI-style call, a mapping with
  `name` and `arguments`, or a `ToolCall`."""
  if isinstance(call, tool_calls_lib.ToolCall):
    return call.name, call.arguments
  if isinstance(call, Mapping):
    function = call.get('function', call)
    if isinstance(function, Mapping) and 'name' in function:
      arguments = function.get('arguments', {})
      if isinstance(arguments, str):
        # OpenAI clients send JSON text. NOTE: the official template pastes
        # such text between the braces unchanged. Here it is decoded, so the
        # call comes out in the Gemma 4 syntax.
        arguments = json.loads(arguments) if arguments.strip() else {}
      return function['name'], arguments
  raise ValueError(
      f'tool call {call!r} is not supported; pass {{"function": {{"name": ...,'
      ' "arguments": {...}}}}, {"name": ..., "arguments": {...}} or a ToolCall'
  )


def _tool_response_name(message: Message, calls: Sequence[Any]) -> str:
  call_id = message.get('tool_call_id')
  name = message.get('name') or 'unknown'
  for call in calls:
    if isinstance(call, Mapping) and call_id is not None and call.get('id') == call_id:
      name = call_name_and_arguments(call)[0]
  return name


def _tool_response_value(message: Message) -> Any:
  content = message.get('content')
  if isinstance(content, (Mapping, str)) or content is None:
    return '' if content is None else content
  return content_text(message)


def format_chat(
    messages: Sequence[Message],
    *,
    tools: Sequence[tools_lib.ToolLike] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    empty_thought_when_not_thinking: bool = False,
) -> str:
  """Render a conversation as the Gemma 4 prompt text, starting with `<bos>`.

  Args:
    messages: Dicts with `role` (system, developer, user, model, assistant,
      tool), `content` (text, a list of text, image and audio parts, or for tool
      messages also a mapping; see `message_images`),
      optionally `tool_calls`, and for a tool message `name` or
      `tool_call_id`. A model message's `reasoning` (or
      `reasoning_content`, `thinking`) is its thought.
    tools: JSON-schema specs (OpenAI or bare) or Python functions.
    thinking: Switch thinking on with `<|think|>` in the system turn.
    add_generation_prompt: End with `<|turn>model\\n` so the model answers.
      Nothing is added while the last model turn awaits tool results.
    empty_thought_when_not_thinking: Append `<|channel>thought\\n<channel|>`
      to the generation prompt when thinking is off, as the 26B-A4B and 31B
      templates do. Leave False for E2B and E4B.

  Returns:
    The prompt text; `encode_chat` turns it into ids.
  """
  spans = _render_chat_spans(
      messages,
      tools=tools,
      thinking=thinking,
      add_generation_prompt=add_generation_prompt,
      empty_thought_when_not_thinking=empty_thought_when_not_thinking,
  )
  return ''.join(text for text, _ in spans)


def _render_chat_spans(
    messages: Sequence[Message],
    *,
    tools: Sequence[tools_lib.ToolLike] | None,
    thinking: bool,
    add_generation_prompt: bool,
    empty_thought_when_not_thinking: bool,
) -> list[tuple[str, bool]]:
  """Render a conversation as `(text, written_by_model)` spans.

  The texts joined are the `format_chat` output. `written_by_model` is True
  for the text that the model writes in its own turns (see
  `encode_chat_for_training`).
  """
  if not messages and not tools and not thinking:
    raise ValueError('format_chat needs at least one message, tool, or thinking=True')
  messages = list(messages)
  out = [(BOS_TEXT, False)]
  # What the last rendered message ended with: decides the generation prompt.
  last_kind = None

  first_is_system = bool(messages) and _role(messages[0]) == 'system'
  if thinking or tools or first_is_system:
    out.append(('<|turn>system\n', False))
    if thinking:
      out.append(('<|think|>\n', False))
    if first_is_system:
      out.append((content_text(messages[0]).strip(), False))
      messages = messages[1:]
    for tool in tools or ():
      out.append((tools_lib.format_declaration(tool), False))
    out.append(('<turn|>\n', False))

  last_user = max((i for i, m in enumerate(messages) if _role(m) == 'user'), default=-1)
  model_turn_open = False  # A model turn left open after tool results.
  for index, message in enumerate(messages):
    role = _role(message)
    if role == 'tool':
      continue  # Rendered inside the model turn whose calls it responds to.
    by_model = role == 'model'
    last_kind = None
    # NOTE: the official template continues the turn whenever the previous
    # non-tool message has the role 'assistant' (not 'model'), even after a
    # closed turn. Here a model message continues only a turn left open.
    if not (role == 'model' and model_turn_open):
      out.append((f'<|turn>{role}\n', False))
    model_turn_open = False

    calls = list(message.get('tool_calls') or ())
    thought = message.get('reasoning') or message.get('reasoning_content') or message.get('thinking')
    if thought and index > last_user and calls:
      out.append((f'<|channel>thought\n{thought}\n<channel|>', by_model))

    for call in calls:
      name, arguments = call_name_and_arguments(call)
      out.append((tool_calls_lib.format_tool_call(name, arguments), by_model))
    if calls:
      last_kind = 'tool_call'

    responded = False
    if calls:
      for follower in messages[index + 1 :]:
        if _role(follower) != 'tool':
          break
        response = tool_calls_lib.format_tool_response(
            _tool_response_name(follower, calls), _tool_response_value(follower)
        )
        if not responded:
          # The model writes the first `<|tool_response>` to hand over to the
          # tool runner; the runner writes the rest.
          out.append((tool_calls_lib.TOOL_RESPONSE_START, by_model))
          response = response.removeprefix(tool_calls_lib.TOOL_RESPONSE_START)
        out.append((response, False))
        responded = True
        last_kind = 'tool_response'

    text = _turn_text(message, role)
    out.append((text, by_model))

    if last_kind == 'tool_call' and not responded:
      # The model stops at `<|tool_response>` to wait for results.
      out.append((tool_calls_lib.TOOL_RESPONSE_START, by_model))
    elif responded and not text:
      # The model's answer after the tool results continues this turn.
      model_turn_open = True
    else:
      # The model ends its turn with `<turn|>`; the newline after it is
      # part of the next header, never sampled.
      out.append(('<turn|>', by_model))
      out.append(('\n', False))

  if add_generation_prompt and last_kind not in ('tool_call', 'tool_response'):
    out.append(('<|turn>model\n', False))
    if empty_thought_when_not_thinking and not thinking:
      out.append((EMPTY_THOUGHT, False))
  return out


def encode_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    tools: Sequence[tools_lib.ToolLike] | None = None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    empty_thought_when_not_thinking: bool = False,
) -> list[int]:
  """Render a conversation with `format_chat` and return its token ids.

  Raises:
    MissingSpecialTokenError: the tokenizer lacks a piece that the tools or
      thinking need.
  """
  if tools or any(m.get('tool_calls') or _role(m) == 'tool' for m in messages):
    tokenizer.require(TOOL_PIECES, feature='tool use')
  if thinking or empty_thought_when_not_thinking:
    tokenizer.require(THINKING_PIECES, feature='thinking')
  text = format_chat(
      messages,
      tools=tools,
      thinking=thinking,
      add_generation_prompt=add_generation_prompt,
      empty_thought_when_not_thinking=empty_thought_when_not_thinking,
  )
  # `<bos>` is a control piece, so its text would encode as plain characters.
  return tokenizer.encode(text.removeprefix(BOS_TEXT), add_bos=True)


def encode_chat_for_training(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    tools: Sequence[tools_lib.ToolLike] | None = None,
    thinking: bool = False,
) -> tuple[list[int], list[float]]:
  """Encode a finished conversation with a loss weight for every token.

  The ids equal `encode_chat(..., add_generation_prompt=False)`. A token has
  weight 1.0 when the model writes it in its own turn, which means:

  - the thought `<|channel>thought\\n...<channel|>` where `format_chat`
    renders it (only in tool-calling messages after the last user turn);
  - each tool call `<|tool_call>call:NAME{...}<tool_call|>`;
  - the `<|tool_response>` that ends the calls, at which the model stops;
  - the answer text;
  - the `<turn|>` that closes a model turn, so the model learns to stop.

  Every other token has weight 0.0: `<bos>`, the system turn with the tool
  declarations, user turns, all turn headers (`<|turn>model\\n` included),
  the tool responses after the first `<|tool_response>`, and the `\\n` after
  each `<turn|>`.

  Each span is encoded on its own. Every boundary between spans of different
  weight sits next to a piece that SentencePiece always splits off (`\\n`,
  `<turn|>`, `<|tool_call>`, `<|tool_response>`, `<tool_response|>` and the
  other user-defined symbols of the Gemma 4 tokenizer), so the concatenated
  ids are the ids of the whole text.

  Returns:
    `(ids, weights)`, two lists of equal length starting with `<bos>`.
  """
  if tools or any(m.get('tool_calls') or _role(m) == 'tool' for m in messages):
    tokenizer.require(TOOL_PIECES, feature='tool use')
  if thinking:
    tokenizer.require(THINKING_PIECES, feature='thinking')
  spans = _render_chat_spans(
      messages,
      tools=tools,
      thinking=thinking,
      add_generation_prompt=False,
      empty_thought_when_not_thinking=False,
  )

  # Merge neighbours of equal weight so that spans split only where the
  # weight changes.
  merged: list[tuple[str, bool]] = []
  for text, by_model in spans:
    if merged and merged[-1][1] == by_model:
      merged[-1] = (merged[-1][0] + text, by_model)
    elif text:
      merged.append((text, by_model))

  ids: list[int] = []
  weights: list[float] = []
  for span_index, (text, by_model) in enumerate(merged):
    if span_index == 0:
      # `<bos>` is a control piece, so its text would encode as plain characters.
      span_ids = tokenizer.encode(text.removeprefix(BOS_TEXT), add_bos=True)
    else:
      span_ids = tokenizer.encode(text, add_bos=False)
    ids.extend(span_ids)
    weights.extend([1.0 if by_model else 0.0] * len(span_ids))
  return ids, weights
