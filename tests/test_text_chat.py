"""Gemma 4 chat prompts against the official formats.

The oracles are the documented prompt layout, the `dialog` 1.1.0 formatter
that `gemma` 4.0.1 uses, and the Hugging Face Gemma 4 `chat_template.jinja`
rendered with jinja2. The template is the 26B-A4B / 31B variant (Apache 2.0,
released with https://huggingface.co/google/gemma-4-31B-it). The copy in
tests/data was taken from the `Gemma4ChatHandler` of a llama-cpp-python fork.
"""

from __future__ import annotations

from pathlib import Path

import dialog
import jinja2
import pytest

from gemma4_jax.text import chat, tools, tokenizer as tokenizer_lib

_TEMPLATE = jinja2.Environment().from_string(
    (Path(__file__).parent / 'data' / 'gemma4_chat_template.jinja').read_text()
)


def _render_official(messages, tool_list=(), thinking=False, add_generation_prompt=True):
  return _TEMPLATE.render(
      messages=messages,
      tools=[tools.tool_spec(t) for t in tool_list] or None,
      bos_token='<bos>',
      add_generation_prompt=add_generation_prompt,
      enable_thinking=thinking,
  )


def get_weather(city: str, days: int = 1, unit: str | None = None) -> dict:
  """Get the weather forecast for a city.

  Args:
    city: City name, with the country
      after a comma.
    days: Number of days.
    unit: celsius or fahrenheit.
  """
  del city, days, unit
  return {}


_SEARCH_SPEC = {
    'type': 'function',
    'function': {
        'name': 'search',
        'description': 'Search the web.',
        'parameters': {
            'type': 'object',
            'properties': {
                'query': {'type': 'string', 'description': 'Query text.'},
                'mode': {'type': 'string', 'enum': ['fast', 'deep']},
                'tags': {'type': 'array', 'items': {'type': 'string'}},
                'filter': {
                    'type': 'object',
                    'properties': {'year': {'type': 'integer'}},
                    'required': ['year'],
                },
            },
            'required': ['query'],
        },
    },
}

_TOOL_ROUND_TRIP = [
    {'role': 'user', 'content': 'Weather in Paris?'},
    {
        'role': 'assistant',
        'content': '',
        'reasoning': 'Need the forecast.',
        'tool_calls': [{
            'id': 'call_1',
            'type': 'function',
            'function': {'name': 'get_weather', 'arguments': {'city': 'Paris, FR', 'days': 2}},
        }],
    },
    {'role': 'tool', 'tool_call_id': 'call_1', 'content': 'Sunny, 20 C'},
    {'role': 'assistant', 'content': '<|channel>thought\nold<channel|>It is sunny.'},
]


def test_single_user_turn_documented_layout():
  text = chat.format_chat([{'role': 'user', 'content': 'Hi'}])
  assert text == '<bos><|turn>user\nHi<turn|>\n<|turn>model\n'


def test_single_user_turn_matches_dialog():
  expected = dialog.Conversation(dialog.User('Hi')).as_text()
  assert chat.format_chat([{'role': 'user', 'content': 'Hi'}]) == '<bos>' + expected


def test_system_turn_matches_dialog_and_template():
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  expected = dialog.Conversation(dialog.System('Be brief.'), dialog.User('Hi')).as_text()
  text = chat.format_chat(messages)
  assert text == '<bos>' + expected
  assert chat.format_chat(messages, empty_thought_when_not_thinking=True) == _render_official(messages)


def test_thinking_on_matches_template():
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  text = chat.format_chat(messages, thinking=True)
  assert text == _render_official(messages, thinking=True)
  assert text.startswith('<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n')


def test_thinking_without_system_message():
  messages = [{'role': 'user', 'content': 'Hi'}]
  text = chat.format_chat(messages, thinking=True)
  assert text == '<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n'
  assert text == _render_official(messages, thinking=True)


def test_assistant_alias_for_model():
  a = chat.format_chat([{'role': 'user', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}])
  b = chat.format_chat([{'role': 'user', 'content': 'x'}, {'role': 'model', 'content': 'y'}])
  assert a == b


def test_tool_declarations_match_template():
  messages = [{'role': 'user', 'content': 'Hi'}]
  text = chat.format_chat(messages, tools=[get_weather, _SEARCH_SPEC], thinking=True)
  assert text == _render_official(messages, [get_weather, _SEARCH_SPEC], thinking=True)


def test_declaration_documented_form():
  declaration = tools.format_declaration(_SEARCH_SPEC['function'])
  assert declaration.startswith('<|tool>declaration:search{description:<|"|>Search the web.<|"|>')
  assert 'mode:{enum:[<|"|>fast<|"|>,<|"|>deep<|"|>],type:<|"|>STRING<|"|>}' in declaration
  assert declaration.endswith('required:[<|"|>query<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>')


def test_function_schema_from_signature_and_docstring():
  schema = tools.function_schema(get_weather)
  assert schema == {
      'name': 'get_weather',
      'description': 'Get the weather forecast for a city.',
      'parameters': {
          'type': 'object',
          'properties': {
              'city': {'description': 'City name, with the country after a comma.', 'type': 'string'},
              'days': {'description': 'Number of days.', 'type': 'integer'},
              'unit': {'description': 'celsius or fahrenheit.', 'type': 'string', 'nullable': True},
          },
          'required': ['city'],
      },
  }


def test_bare_spec_equals_openai_spec():
  assert tools.format_declaration(_SEARCH_SPEC['function']) == tools.format_declaration(_SEARCH_SPEC)


@pytest.mark.parametrize('thinking', [False, True])
def test_tool_call_response_and_answer_match_template(thinking):
  text = chat.format_chat(
      _TOOL_ROUND_TRIP, tools=[get_weather], thinking=thinking,
      empty_thought_when_not_thinking=True,
  )
  assert text == _render_official(_TOOL_ROUND_TRIP, [get_weather], thinking=thinking)


def test_tool_call_turn_layout():
  text = chat.format_chat(_TOOL_ROUND_TRIP, add_generation_prompt=False)
  assert text == (
      '<bos><|turn>user\nWeather in Paris?<turn|>\n'
      '<|turn>model\n<|channel>thought\nNeed the forecast.\n<channel|>'
      '<|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,days:2}<tool_call|>'
      '<|tool_response>response:get_weather{value:<|"|>Sunny, 20 C<|"|>}<tool_response|>'
      'It is sunny.<turn|>\n'
  )


def test_pending_tool_call_ends_with_response_marker():
  messages = _TOOL_ROUND_TRIP[:2]
  text = chat.format_chat(messages)
  assert text.endswith('<tool_call|><|tool_response>')
  assert text == _render_official(messages)


def test_earlier_thoughts_dropped_after_new_user_turn():
  messages = _TOOL_ROUND_TRIP + [{'role': 'user', 'content': 'Thanks'}]
  text = chat.format_chat(messages, empty_thought_when_not_thinking=True)
  assert 'Need the forecast.' not in text
  assert 'old' not in text
  assert text == _render_official(messages)


def test_encode_chat_token_for_token(gemma4_tokenizer):
  text = _render_official(_TOOL_ROUND_TRIP, [get_weather], thinking=True)
  ids = chat.encode_chat(gemma4_tokenizer, _TOOL_ROUND_TRIP, tools=[get_weather], thinking=True)
  assert ids == gemma4_tokenizer.encode(text.removeprefix('<bos>'), add_bos=True)
  assert ids[:4] == [2, 105, gemma4_tokenizer.encode('system', add_bos=False)[0], 107]
  assert ids.count(48) == 1  # <|tool_call>
  assert ids.count(50) == 1  # <|tool_response>
  assert 98 in ids  # <|think|>


def test_encode_chat_single_turn_ids(gemma4_tokenizer):
  ids = chat.encode_chat(gemma4_tokenizer, [{'role': 'user', 'content': 'Hi'}])
  hi = gemma4_tokenizer.encode('Hi', add_bos=False)
  assert ids == [2, 105] + gemma4_tokenizer.encode('user', add_bos=False) + [107] + hi + [
      106, 107, 105] + gemma4_tokenizer.encode('model', add_bos=False) + [107]


def test_encode_chat_tools_need_tool_pieces(tmp_path):
  import sentencepiece as spm

  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('hello world\nthe quick brown fox\n' * 100)
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'tiny'), vocab_size=40, hard_vocab_limit=False,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece='<pad>', eos_piece='<eos>',
      bos_piece='<bos>', unk_piece='<unk>', user_defined_symbols=['<|turn>', '<turn|>'],
      minloglevel=2,
  )
  tokenizer = tokenizer_lib.Tokenizer(tmp_path / 'tiny.model')
  with pytest.raises(tokenizer_lib.MissingSpecialTokenError, match='tool use'):
    chat.encode_chat(tokenizer, [{'role': 'user', 'content': 'x'}], tools=[get_weather])


def test_unknown_role_rejected():
  with pytest.raises(ValueError, match='role'):
    chat.format_chat([{'role': 'narrator', 'content': 'x'}])
