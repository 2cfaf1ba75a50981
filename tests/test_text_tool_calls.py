"""Gemma 4 tool-call syntax: serialising, parsing, and streamed parsing."""

from __future__ import annotations

import logging
import random

from dialog._src.string import tool_grammar
from hypothesis import given, settings, strategies as st
import pytest

from gemma4_jax.text import tool_calls as tc
from gemma4_jax.text.tool_calls import ToolCall


def _parse_with_official_grammar(call_text: str) -> dict:
  """Parse a call with the `dialog` 1.1.0 grammar that `gemma` 4.0.1 uses."""
  body = call_text.removeprefix(tc.TOOL_CALL_START).removesuffix(tc.TOOL_CALL_END)
  return tool_grammar.parse(body).as_conversation(kind='tool_call')


# ---------------------------------------------------------------------------
# Serialising.


def test_format_tool_call_documented_example():
  text = tc.format_tool_call('get_weather', {'key': 'text', 'n': 15})
  assert text == '<|tool_call>call:get_weather{key:<|"|>text<|"|>,n:15}<tool_call|>'


def test_format_value_scalars():
  assert tc.format_value(None) == 'null'
  assert tc.format_value(True) == 'true'
  assert tc.format_value(False) == 'false'
  assert tc.format_value(-7) == '-7'
  assert tc.format_value(2.5) == '2.5'
  assert tc.format_value('a,b') == '<|"|>a,b<|"|>'


def test_format_value_sorts_keys_case_insensitively():
  # Jinja's dictsort, which the official chat template uses, ignores case.
  assert tc.format_value({'b': 1, 'A': 2, 'a_': 3}) == '{A:2,a_:3,b:1}'


def test_format_value_rejects_delimiter_in_string():
  with pytest.raises(ValueError, match='delimiter'):
    tc.format_value('say <|"|>hi')


def test_format_value_rejects_nan():
  with pytest.raises(ValueError, match='NaN'):
    tc.format_value(float('nan'))


def test_format_tool_call_matches_official_parser():
  arguments = {
      'city': 'Paris, {FR}: a,b',
      'empty': {},
      'nested': [1, {'a': [], 'b': 'x'}],
      'n': 15,
      'none': None,
      'ok': False,
      'x': -2.5,
  }
  parsed = _parse_with_official_grammar(tc.format_tool_call('lookup', arguments))
  assert parsed['name'] == 'lookup'
  assert parsed['arguments'] == arguments


def test_format_tool_response_wraps_non_mapping():
  assert (
      tc.format_tool_response('f', 'ok')
      == '<|tool_response>response:f{value:<|"|>ok<|"|>}<tool_response|>'
  )
  assert (
      tc.format_tool_response('f', {'temp': 20, 'sky': 'clear'})
      == '<|tool_response>response:f{sky:<|"|>clear<|"|>,temp:20}<tool_response|>'
  )


# ---------------------------------------------------------------------------
# Parsing values and calls.


def test_parse_value_types():
  value = tc.parse_value(
      '{s:<|"|>x<|"|>,i:-3,f:1.5,e:2e-05,t:true,n:null,l:[1,[2]],o:{a:{}}}'
  )
  assert value == {
      's': 'x', 'i': -3, 'f': 1.5, 'e': 2e-05, 't': True, 'n': None,
      'l': [1, [2]], 'o': {'a': {}},
  }
  assert type(value['i']) is int
  assert type(value['f']) is float


def test_parse_value_accepts_quoted_keys():
  assert tc.parse_value('{<|"|>a b<|"|>:1}') == {'a b': 1}


def test_parse_tool_call_delimiters_inside_string():
  body = 'call:run{code:<|"|>{ } , : [ ] <tool_call|> <turn|><|"|>}'
  call = tc.parse_tool_call(body)
  assert call == ToolCall('run', {'code': '{ } , : [ ] <tool_call|> <turn|>'})


@pytest.mark.parametrize(
    'body',
    [
        'call:f{a:}',
        'call:f{a:1',
        'call:f{a 1}',
        'call:f{a:1}}',
        'call:f{a:<|"|>open}',
        'call:f{a:1,a:2}',
        'call:f{a:unquoted}',
        'f{a:1}',
        'call:{a:1}',
    ],
)
def test_parse_tool_call_rejects_malformed(body):
  with pytest.raises(tc.ToolCallSyntaxError):
    tc.parse_tool_call(body)


# ---------------------------------------------------------------------------
# Parsing whole model turns.


def test_model_output_answer_only():
  parsed = tc.parse_model_output('Hello there.<turn|>')
  assert parsed == tc.ParsedOutput(None, 'Hello there.', [], [])


def test_model_output_thinking_and_answer():
  parsed = tc.parse_model_output('<|channel>thought\nLet me think.<channel|>It is 4.<turn|>')
  assert parsed.thinking == 'Let me think.'
  assert parsed.answer == 'It is 4.'


def test_model_output_nested_arguments():
  text = (
      '<|tool_call>call:book{guests:[{name:<|"|>Ann<|"|>,age:31},'
      '{name:<|"|>Bo<|"|>,age:null}],opts:{late:true,rate:0.5}}<tool_call|>'
      '<|tool_response>'
  )
  parsed = tc.parse_model_output(text)
  assert parsed.tool_calls == [
      ToolCall('book', {
          'guests': [{'name': 'Ann', 'age': 31}, {'name': 'Bo', 'age': None}],
          'opts': {'late': True, 'rate': 0.5},
      })
  ]
  assert parsed.answer == ''
  assert parsed.warnings == []


def test_model_output_end_marker_inside_string():
  text = '<|tool_call>call:echo{text:<|"|>a <tool_call|> b<|"|>}<tool_call|>'
  parsed = tc.parse_model_output(text)
  assert parsed.tool_calls == [ToolCall('echo', {'text': 'a <tool_call|> b'})]
  assert parsed.answer == ''


def test_model_output_several_calls():
  text = (
      'Checking both.<|tool_call>call:a{x:1}<tool_call|>'
      '<|tool_call>call:b{y:<|"|>z<|"|>}<tool_call|><|tool_response>'
  )
  parsed = tc.parse_model_output(text)
  assert parsed.answer == 'Checking both.'
  assert parsed.tool_calls == [ToolCall('a', {'x': 1}), ToolCall('b', {'y': 'z'})]


def test_model_output_call_cut_off(caplog):
  text = 'Sure.<|tool_call>call:search{query:<|"|>cheap fli'
  with caplog.at_level(logging.WARNING):
    parsed = tc.parse_model_output(text)
  assert parsed.tool_calls == []
  assert parsed.answer == text
  assert len(parsed.warnings) == 1
  assert 'cut off' in parsed.warnings[0]
  assert 'cut off' in caplog.text


def test_model_output_malformed_call_kept_as_text():
  text = '<|tool_call>call:f{a:oops}<tool_call|>Done.'
  parsed = tc.parse_model_output(text)
  assert parsed.tool_calls == []
  assert parsed.answer == text
  assert len(parsed.warnings) == 1
  assert 'malformed' in parsed.warnings[0]


def test_model_output_unclosed_call_before_next_call():
  text = '<|tool_call>call:f{a:1<|tool_call>call:g{b:2}<tool_call|>'
  parsed = tc.parse_model_output(text)
  assert parsed.tool_calls == [ToolCall('g', {'b': 2})]
  assert parsed.answer == '<|tool_call>call:f{a:1'
  assert len(parsed.warnings) == 1


def test_model_output_thinking_cut_off():
  parsed = tc.parse_model_output('<|channel>thought\nStill thinking')
  assert parsed.thinking == 'Still thinking'
  assert parsed.answer == ''
  assert len(parsed.warnings) == 1


def test_model_output_ignores_text_after_end_of_turn():
  parsed = tc.parse_model_output('Hi.<turn|>\n<|turn>user\nmore')
  assert parsed.answer == 'Hi.'


def test_stream_parser_holds_partial_marker():
  parser = tc.StreamParser()
  assert parser.feed('Hello <|tool') == [tc.TextDelta('Hello ')]
  assert parser.feed('_call>call:f{a:1}<tool_') == []
  assert parser.feed('call|>') == [tc.ToolCallEvent(ToolCall('f', {'a': 1}))]
  assert parser.finish() == []


def test_stream_parser_keeps_lone_angle_bracket_text():
  parser = tc.StreamParser()
  events = parser.feed('a < b') + parser.finish()
  assert tc.collect_events(events).answer == 'a < b'


# ---------------------------------------------------------------------------
# Properties.

_NASTY_TEXT = st.sampled_from([
    '{', '}', '[', ']', ',', ':', '<', '>', '|', '"', '\n', ' ', 'true', 'null',
    '1.5', '<tool_call|>', '<|tool_call>', '<turn|>', '<|turn>', '<|channel>',
    '<channel|>', '<|tool_response>', '<|"', '"|>', 'é', '日本', '😀',
])
_STRINGS = st.lists(st.one_of(_NASTY_TEXT, st.text(max_size=4)), max_size=6).map(''.join).filter(
    lambda s: tc.STRING_DELIMITER not in s
)
_KEYS = st.one_of(
    st.from_regex(r'[A-Za-z_][A-Za-z0-9_]{0,6}', fullmatch=True),
    _STRINGS.filter(bool),
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**12, max_value=10**12),
    st.floats(allow_nan=False, allow_infinity=False), _STRINGS,
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=4)
    ),
    max_leaves=12,
)
_ARGUMENTS = st.dictionaries(_KEYS, _VALUES, max_size=5)
_NAMES = st.from_regex(r'[A-Za-z_][A-Za-z0-9_.\-]{0,10}', fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(name=_NAMES, arguments=_ARGUMENTS)
def test_format_then_parse_round_trips(name, arguments):
  parsed = tc.parse_model_output(tc.format_tool_call(name, arguments))
  assert parsed.warnings == []
  assert parsed.tool_calls == [ToolCall(name, arguments)]
  assert parsed.answer == ''


_TURN_PARTS = st.one_of(
    _STRINGS.map(lambda s: s.replace('<|', '< |')),  # Plain answer text.
    st.builds(lambda n, a: tc.format_tool_call(n, a), _NAMES, _ARGUMENTS),
    _STRINGS.map(lambda s: '<|channel>thought\n' + s.replace('<channel|>', '') + '<channel|>'),
    st.sampled_from(['<|tool_call>call:f{a:', '<|tool_call>call:f{a:x}<tool_call|>']),
)


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_TURN_PARTS, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_streamed_parse_equals_whole_parse(parts, seed):
  text = ''.join(parts)
  rng = random.Random(seed)
  cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
  chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]

  parser = tc.StreamParser()
  events = []
  for chunk in chunks:
    events += parser.feed(chunk)
  events += parser.finish()

  assert tc.collect_events(events) == tc.parse_model_output(text)
