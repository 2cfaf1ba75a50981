"""The demo's synthetic tool-calling dataset and its small trained tokenizer."""

from __future__ import annotations

import json
import re

import pytest
from sentencepiece import sentencepiece_model_pb2

from gemma4_jax import demo_data
from gemma4_jax import evaluation
from gemma4_jax.text import chat
from gemma4_jax.text.tokenizer import SPECIAL_PIECES, Tokenizer
from gemma4_jax.text.tool_calls import ToolCall, parse_model_output
from gemma4_jax.text.train_tokenizer import train_tokenizer
from gemma4_jax.training import records
from gemma4_jax.training import run_config

NUM_TRAIN = 1500
NUM_HELDOUT = 200

# Ids of the special pieces in the released Gemma 4 tokenizer.
RELEASED_IDS = {
    '<pad>': 0, '<eos>': 1, '<bos>': 2, '<unk>': 3, '<mask>': 4, '[multimodal]': 5,
    '<|tool>': 46, '<tool|>': 47, '<|tool_call>': 48, '<tool_call|>': 49,
    '<|tool_response>': 50, '<tool_response|>': 51, '<|"|>': 52,
    '<|think|>': 98, '<|channel>': 100, '<channel|>': 101,
    '<|turn>': 105, '<turn|>': 106, '\n': 107, '\n\n': 108,
}
# Pieces that the release has at ids above any small vocabulary.
MEDIA_PIECES = ('<|image>', '<|image|>', '<image|>', '<|audio>', '<|audio|>', '<audio|>')

# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp('demo_data')
  return demo_data.make_tool_calling_dataset(out_dir, seed=3, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT)


@pytest.fixture(scope='module')
def train_records(dataset):
  return [r.data for r in records.read_jsonl(dataset.train)]


@pytest.fixture(scope='module')
def heldout_records(dataset):
  return [r.data for r in records.read_jsonl(dataset.heldout)]


@pytest.fixture(scope='module')
def tokenizer_path(dataset, tmp_path_factory):
  return train_tokenizer(dataset.train, tmp_path_factory.mktemp('tok') / 'demo.model', vocab_size=1024)


@pytest.fixture(scope='module')
def tokenizer(tokenizer_path):
  return Tokenizer(tokenizer_path)


def _user_text(record):
  return record['messages'][0]['content']


def _first_model_message(record):
  return next(m for m in record['messages'] if m['role'] in ('model', 'assistant'))


def _words(text):
  return ' '.join(re.findall(r'[a-z0-9]+', text.lower()))


# The dataset.


def test_dataset_same_seed_same_bytes(dataset, tmp_path):
  again = demo_data.make_tool_calling_dataset(tmp_path, seed=3, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT)
  assert again.train.read_bytes() == dataset.train.read_bytes()
  assert again.heldout.read_bytes() == dataset.heldout.read_bytes()


def test_dataset_other_seed_differs(dataset, tmp_path):
  other = demo_data.make_tool_calling_dataset(tmp_path, seed=4, num_train=NUM_TRAIN, num_heldout=NUM_HELDOUT)
  assert other.train.read_bytes() != dataset.train.read_bytes()
  assert other.heldout.read_bytes() != dataset.heldout.read_bytes()


def test_heldout_independent_of_num_train(dataset, tmp_path):
  smaller = demo_data.make_tool_calling_dataset(tmp_path, seed=3, num_train=10, num_heldout=NUM_HELDOUT)
  assert smaller.heldout.read_bytes() == dataset.heldout.read_bytes()


def test_dataset_sizes(train_records, heldout_records):
  assert len(train_records) == NUM_TRAIN
  assert len(heldout_records) == NUM_HELDOUT


def test_records_are_chat_records(dataset):
  for path in (dataset.train, dataset.heldout):
    for record in records.read_jsonl(path, source='chat'):
      messages = record.data['messages']
      assert messages[0]['role'] == 'user'
      assert messages[1]['role'] == 'model'
      assert [m['role'] for m in messages[2:]] in ([], ['tool', 'model'])
      assert record.data['tools'], record.location


def test_records_declare_the_called_tool(train_records):
  for record in train_records:
    declared = [t['function']['name'] for t in record['tools']]
    assert len(declared) == demo_data.DEFAULT_NUM_TOOLS
    assert len(set(declared)) == len(declared)
    for call in _first_model_message(record).get('tool_calls', []):
      assert call['function']['name'] in declared


def test_records_declare_extra_tools_on_request():
  for record in demo_data.generate_records(seed=1, count=200, num_tools=3):
    declared = [t['function']['name'] for t in record['tools']]
    assert len(set(declared)) == 3
    for call in _first_model_message(record).get('tool_calls', []):
      assert call['function']['name'] in declared


def test_records_num_tools_out_of_range_raises():
  with pytest.raises(ValueError, match='num_tools'):
    demo_data.generate_records(seed=1, count=1, num_tools=0)
  with pytest.raises(ValueError, match='num_tools'):
    demo_data.generate_records(seed=1, count=1, num_tools=len(demo_data.TOOLS) + 1)


def test_records_encode_with_weights(train_records, tokenizer):
  for data in train_records[:300]:
    record = records.Record('mem', 1, records.CHAT, data)
    ids, weights = records.encode_record(record, tokenizer)
    assert len(ids) == len(weights)
    assert weights.sum() > 0


def _counts_by_tool(records):
  """Count records by the tool of their first call; None for text replies."""
  counts = {}
  for record in records:
    calls = _first_model_message(record).get('tool_calls') or [{'function': {'name': None}}]
    name = calls[0]['function']['name']
    counts[name] = counts.get(name, 0) + 1
  return counts


def test_dataset_mixes_every_tool_and_plain_answers(train_records):
  counts = _counts_by_tool(train_records)
  names = {t['function']['name'] for t in demo_data.TOOLS}
  assert set(counts) == names | {None}
  for name, count in counts.items():
    # Training shares are 9% to 22% (`TRAINING_SHARES`).
    assert count > 0.06 * NUM_TRAIN, (name, count)
  assert counts['create_event'] > 2 * counts['get_weather']


def test_training_shares_cover_every_generator():
  assert set(demo_data.TRAINING_SHARES) == {g.__name__ for g, _ in demo_data._GENERATORS}
  assert abs(sum(demo_data.TRAINING_SHARES.values()) - 1.0) < 1e-9


def test_heldout_shares_are_even(heldout_records):
  counts = _counts_by_tool(heldout_records)
  # Even shares of 14.5%: 29 of 200, give or take sampling noise.
  assert max(counts.values()) < 3 * min(counts.values()), counts


def test_some_records_carry_tool_response(train_records):
  with_response = [r for r in train_records if any(m['role'] == 'tool' for m in r['messages'])]
  calling = [r for r in train_records if _first_model_message(r).get('tool_calls')]
  # A fifth of the calling records carry a response.
  assert 0.12 < len(with_response) / len(calling) < 0.3
  for record in with_response:
    assert record['messages'][-1]['role'] == 'model'
    assert record['messages'][-1]['content']


def test_requests_unique_across_dataset(train_records, heldout_records):
  texts = [_user_text(r) for r in train_records + heldout_records]
  assert len(set(texts)) == len(texts)


def test_heldout_requests_not_in_train(train_records, heldout_records):
  train_texts = {_user_text(r) for r in train_records}
  train_words = {_words(_user_text(r)) for r in train_records}
  for record in heldout_records:
    assert _user_text(record) not in train_texts
    assert _words(_user_text(record)) not in train_words, _user_text(record)


def _string_values(arguments, prefix=''):
  for key, value in arguments.items():
    if isinstance(value, dict):
      yield from _string_values(value, prefix + key + '.')
    elif isinstance(value, list):
      for item in value:
        yield prefix + key, item
    elif isinstance(value, str):
      yield prefix + key, value


def test_heldout_strings_seen_in_train(train_records, heldout_records):
  # Values, whatever their argument: a city seen as a flight's origin counts
  # for a weather request too, since the model copies it from the request.
  seen = set()
  for record in train_records:
    for call in _first_model_message(record).get('tool_calls', []):
      seen.update(value for _, value in _string_values(call['function']['arguments']))
  for record in heldout_records:
    for call in _first_model_message(record).get('tool_calls', []):
      for key, value in _string_values(call['function']['arguments']):
        if key in ('date', 'start_time'):
          continue  # Composed of parts, each seen in training.
        assert value in seen, (key, value, _user_text(record))


# Reference calls: typed arguments that follow the declared schemas.

_SCHEMA_TYPES = {
    'string': lambda v: isinstance(v, str),
    'integer': lambda v: isinstance(v, int) and not isinstance(v, bool),
    'number': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    'boolean': lambda v: isinstance(v, bool),
    'array': lambda v: isinstance(v, list),
    'object': lambda v: isinstance(v, dict),
}


def _check_schema(value, schema, where):
  assert _SCHEMA_TYPES[schema['type']](value), (where, value, schema)
  if 'enum' in schema:
    assert value in schema['enum'], (where, value)
  if schema['type'] == 'array':
    for item in value:
      _check_schema(item, schema['items'], where + '[]')
  if schema['type'] == 'object' and 'properties' in schema:
    assert value, f'{where}: an empty object should be left out'
    for key, item in value.items():
      assert key in schema['properties'], (where, key)
      _check_schema(item, schema['properties'][key], f'{where}.{key}')
    for key in schema.get('required', ()):
      assert key in value, (where, key)


def test_reference_calls_follow_schemas(train_records, heldout_records):
  specs = {t['function']['name']: t['function']['parameters'] for t in demo_data.TOOLS}
  for record in train_records + heldout_records:
    for call in _first_model_message(record).get('tool_calls', []):
      name = call['function']['name']
      _check_schema(call['function']['arguments'], specs[name], name)


def test_reference_argument_types_cover_json_types(train_records):
  kinds = set()

  def visit(value):
    kinds.add(type(value).__name__)
    if isinstance(value, dict):
      for item in value.values():
        visit(item)
    if isinstance(value, list):
      for item in value:
        visit(item)

  for record in train_records:
    for call in _first_model_message(record).get('tool_calls', []):
      visit(call['function']['arguments'])
  assert kinds >= {'str', 'int', 'float', 'bool', 'list', 'dict'}


def test_reference_calls_parse_back_typed(train_records, heldout_records):
  for record in train_records + heldout_records:
    target = _first_model_message(record)
    if not target.get('tool_calls'):
      continue
    text = chat.format_chat(record['messages'][:2], tools=record['tools'], add_generation_prompt=False)
    model_turn = text.split('<|turn>model\n', 1)[1]
    parsed = parse_model_output(model_turn)
    assert parsed.warnings == []
    assert parsed.answer == ''
    expected = [
        ToolCall(c['function']['name'], c['function']['arguments']) for c in target['tool_calls']
    ]
    assert parsed.tool_calls == expected
    for got, want in zip(parsed.tool_calls, expected):
      # `==` equates True with 1 and 5 with 5.0; the JSON types must match too.
      assert json.dumps(got.arguments, sort_keys=True) == json.dumps(want.arguments, sort_keys=True)


_MONTHS = ['january', 'february', 'march', 'april', 'may', 'june', 'july',
           'august', 'september', 'october', 'november', 'december']


def _date_in_text(iso, text):
  """Whether the request text names the ISO date in some spelling."""
  year, month, day = (int(part) for part in iso.split('-'))
  if iso in text:
    return True
  lower = text.lower()
  month_name = _MONTHS[month - 1]
  return (
      str(year) in text
      and re.search(rf'\b{day}(st|nd|rd|th)?\b', text) is not None
      and re.search(rf'\b{month_name[:3]}', lower) is not None
  )


def _time_in_text(hhmm, text):
  hour, minute = (int(part) for part in hhmm.split(':'))
  if hhmm in text:
    return True
  twelve = hour - 12 if hour > 12 else hour
  suffix = 'pm' if hour >= 12 else 'am'
  clock = f'{twelve}' if minute == 0 else f'{twelve}:{minute:02d}'
  return re.search(rf'\b{clock} ?{suffix}\b', text) is not None


def test_reference_values_come_from_request(train_records):
  """Every argument is written in the request, in some spelling."""
  for record in train_records:
    text = _user_text(record)
    for call in _first_model_message(record).get('tool_calls', []):
      arguments = call['function']['arguments']
      name = call['function']['name']
      for key in ('city', 'recipient', 'text', 'title', 'label', 'origin', 'destination'):
        if key in arguments:
          assert arguments[key] in text, (key, arguments[key], text)
      for attendee in arguments.get('attendees', []):
        assert attendee in text
      if 'date' in arguments:
        assert _date_in_text(arguments['date'], text), (arguments['date'], text)
      if 'start_time' in arguments:
        assert _time_in_text(arguments['start_time'], text), (arguments['start_time'], text)
      if name == 'convert_units':
        value = arguments['value']
        spellings = {str(value), f'{value:,}'}
        assert any(s in text for s in spellings), (value, text)
        assert arguments['from_unit'] != arguments['to_unit']
      if name == 'send_message' and 'urgent' in arguments:
        assert ('not urgent' in text.lower()) == (not arguments['urgent']), text
        assert 'urgent' in text.lower()


def test_plain_answers_have_no_call(train_records):
  answers = {demo_data.GREETING_ANSWER, demo_data.THANKS_ANSWER, demo_data.OUT_OF_SCOPE_ANSWER}
  for record in train_records:
    target = _first_model_message(record)
    if not target.get('tool_calls'):
      assert target['content'] in answers
      assert len(record['messages']) == 2


def test_too_many_records_raises(monkeypatch):
  def three_requests(rng):
    return demo_data._Request(text=rng.choice(['a', 'b', 'c']), answer='ok')

  monkeypatch.setattr(demo_data, '_GENERATORS', [(three_requests, 1.0)])
  assert len(demo_data.generate_records(seed=0, count=3)) == 3
  with pytest.raises(ValueError, match='fewer examples'):
    demo_data.generate_records(seed=0, count=4)


# Scoring, by `gemma4_jax.evaluation`.


def test_heldout_records_end_at_first_model_turn(heldout_records):
  for record in heldout_records:
    roles = [m['role'] for m in record['messages']]
    assert roles == ['user', 'model'], roles


def test_reference_turns_score_as_hits(dataset, tokenizer):
  heldout = records.read_jsonl(dataset.heldout)
  examples = evaluation.generation_examples(heldout, tokenizer)
  assert len(examples) == len(heldout)
  for record, example in zip(heldout, examples):
    text = chat.format_chat(record.data['messages'], tools=record.data['tools'], add_generation_prompt=False)
    # What a model generates: its turn up to the stop token.
    model_turn = text.split('<|turn>model\n', 1)[1]
    assert evaluation.matches_reference(example.reference, parse_model_output(model_turn)), model_turn


def test_wrong_argument_type_is_a_miss(dataset, tokenizer):
  heldout = records.read_jsonl(dataset.heldout)
  examples = evaluation.generation_examples(heldout, tokenizer)
  record, example = next(
      (r, e) for r, e in zip(heldout, examples)
      if any(isinstance(v, int) and not isinstance(v, bool)
             for v in r.data['messages'][1].get('tool_calls', [{}])[0].get('function', {}).get('arguments', {}).values())
  )
  call = record.data['messages'][1]['tool_calls'][0]['function']
  arguments = {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in call['arguments'].items()}
  wrong = [{'role': 'model', 'tool_calls': [{'function': {'name': call['name'], 'arguments': arguments}}]}]
  text = chat.format_chat(record.data['messages'][:1] + wrong, tools=record.data['tools'], add_generation_prompt=False)
  assert not evaluation.matches_reference(example.reference, parse_model_output(text.split('<|turn>model\n', 1)[1]))


# The demo run's preparation.


def _demo_run(workdir, **demo_data_fields):
  run = run_config.base_config()
  run.demo = 'tool_calling'
  run.workdir = str(workdir)
  run.demo_data.num_train = 300
  run.demo_data.num_heldout = 20
  run.demo_data.vocab_size = 600
  run.demo_data.update(demo_data_fields)
  return run


def test_prepare_run_points_run_at_new_files(tmp_path):
  run = _demo_run(tmp_path)
  prepared = demo_data.prepare_run(run)
  data_dir = tmp_path / 'data'
  assert prepared.data.train == str(data_dir / 'train.jsonl')
  assert prepared.data.eval == str(data_dir / 'heldout.jsonl')
  assert prepared.tokenizer == str(data_dir / 'tokenizer.model')
  assert run.data.train == ''  # The given config is left as it was.
  assert len(records.read_jsonl(prepared.data.train)) == 300
  assert len(records.read_jsonl(prepared.data.eval)) == 20
  assert Tokenizer(prepared.tokenizer).vocab_size == 600


def test_prepare_run_keeps_files_of_same_settings(tmp_path):
  demo_data.prepare_run(_demo_run(tmp_path))
  files = sorted((tmp_path / 'data').iterdir())
  before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
  demo_data.prepare_run(_demo_run(tmp_path))
  after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((tmp_path / 'data').iterdir())}
  assert after == before


def test_prepare_run_other_settings_raise(tmp_path):
  demo_data.prepare_run(_demo_run(tmp_path))
  with pytest.raises(ValueError, match='new --config.workdir'):
    demo_data.prepare_run(_demo_run(tmp_path, num_train=301))


@pytest.mark.parametrize('demo, workdir, message', [('chess', 'w', "'chess' is not a known demo"), ('tool_calling', '', 'needs a workdir')])
def test_prepare_run_bad_settings_raise(tmp_path, demo, workdir, message):
  run = _demo_run(tmp_path)
  run.demo = demo
  run.workdir = workdir
  with pytest.raises(ValueError, match=message):
    demo_data.prepare_run(run)


# The trained tokenizer.


def _pieces(path):
  model = sentencepiece_model_pb2.ModelProto()
  model.ParseFromString(path.read_bytes())
  return model.pieces


def test_tokenizer_released_ids(tokenizer_path):
  pieces = _pieces(tokenizer_path)
  for piece, token_id in RELEASED_IDS.items():
    assert pieces[token_id].piece == piece


def test_tokenizer_piece_types(tokenizer_path):
  pieces = _pieces(tokenizer_path)
  by_piece = {p.piece: p for p in pieces}
  for piece in ('<pad>', '<eos>', '<bos>'):
    assert by_piece[piece].type == CONTROL
  assert by_piece['<unk>'].type == UNKNOWN
  for piece in set(SPECIAL_PIECES.values()) - {'<pad>', '<eos>', '<bos>', '<unk>'}:
    assert by_piece[piece].type == USER_DEFINED, piece
  assert sum(p.type == BYTE for p in pieces) == 256


def test_tokenizer_vocab_size(tokenizer):
  assert tokenizer.vocab_size == 1024


def test_tokenizer_wrapper_finds_every_special_piece(tokenizer):
  for name, piece in SPECIAL_PIECES.items():
    token_id = getattr(tokenizer.special, name)
    assert token_id is not None, piece
    assert tokenizer.id_to_piece(token_id) == piece
  for piece, token_id in RELEASED_IDS.items():
    if piece in SPECIAL_PIECES.values():
      assert tokenizer.piece_id(piece) == token_id


def test_tokenizer_special_pieces_one_token_in_text(tokenizer):
  for piece in set(SPECIAL_PIECES.values()) - {'<pad>', '<eos>', '<bos>', '<unk>'}:
    ids = tokenizer.encode(f'ab{piece}cd', add_bos=False)
    assert tokenizer.piece_id(piece) in ids, piece
    assert tokenizer.decode(ids) == f'ab{piece}cd'


def test_tokenizer_round_trips_chats(tokenizer, heldout_records):
  for record in heldout_records:
    text = chat.format_chat(record['messages'], tools=record['tools'], add_generation_prompt=False)
    body = text.removeprefix(chat.BOS_TEXT)
    ids = tokenizer.encode(body, add_bos=True)
    assert tokenizer.decode(ids) == body


@pytest.mark.parametrize(
    'text',
    ['', 'plain words', '  two  spaces\tand a tab\n\n\nthree newlines', 'émigré 日本語 🙂', '<bos> stays text <eos>'],
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text, add_bos=False)) == text


def test_tokenizer_chat_encodings_agree(tokenizer, heldout_records):
  """Span-wise training encoding equals the encoding of the whole text."""
  for record in heldout_records:
    ids, weights = chat.encode_chat_for_training(tokenizer, record['messages'], tools=record['tools'])
    whole = chat.encode_chat(tokenizer, record['messages'], tools=record['tools'], add_generation_prompt=False)
    assert ids == whole
    assert len(weights) == len(ids)


def test_tokenizer_value_tokens_same_in_request_and_call(tokenizer):
  request = tokenizer.encode('weather in Rio de Janeiro', add_bos=False)
  call = tokenizer.encode('<|"|>Rio de Janeiro<|"|>', add_bos=False)
  delimiter = tokenizer.piece_id('<|"|>')
  assert call[0] == call[-1] == delimiter
  value = call[1:-1]
  assert request[-len(value):] == value


def test_tokenizer_splits_numbers_into_digit_pairs(tokenizer):
  cases = {'2025': ['20', '25'], '411': ['41', '1'], '7': ['7'], '89.6': ['89', '.', '6']}
  for text, pieces in cases.items():
    ids = tokenizer.encode(text, add_bos=False)
    assert [tokenizer.id_to_piece(i) for i in ids] == pieces


def test_tokenizer_space_is_own_piece(tokenizer):
  ids = tokenizer.encode('in Paris', add_bos=False)
  pieces = [tokenizer.id_to_piece(i) for i in ids]
  assert '\u2581' in pieces
  assert all(p == '\u2581' or '\u2581' not in p for p in pieces)


def test_tokenizer_training_is_deterministic(dataset, tokenizer_path, tmp_path):
  again = train_tokenizer(dataset.train, tmp_path / 'again.model', vocab_size=1024)
  assert again.read_bytes() == tokenizer_path.read_bytes()


def test_tokenizer_from_texts(tmp_path):
  texts = [f'<|turn>user\nConvert {i} km to miles<turn|>\n' for i in range(200)]
  path = train_tokenizer(texts, tmp_path / 'texts.model', vocab_size=520)
  tokenizer = Tokenizer(path)
  assert tokenizer.vocab_size == 520
  assert tokenizer.decode(tokenizer.encode(texts[7], add_bos=False)) == texts[7]


def test_tokenizer_release_like_spaces_and_digits(dataset, tmp_path):
  path = train_tokenizer(
      dataset.train, tmp_path / 'plain.model', vocab_size=1024, separate_spaces=False, digit_pairs=False
  )
  tokenizer = Tokenizer(path)
  pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode('weather in Paris', add_bos=False)]
  assert any(p.startswith('\u2581') and len(p) > 1 for p in pieces), pieces
  digits = [tokenizer.id_to_piece(i) for i in tokenizer.encode('2025', add_bos=False)]
  assert digits == ['2', '0', '2', '5']
  for piece, token_id in RELEASED_IDS.items():
    assert tokenizer.id_to_piece(token_id) == piece


def test_tokenizer_vocab_too_small_raises(tmp_path):
  with pytest.raises(ValueError, match='fixed pieces'):
    train_tokenizer(['some text'], tmp_path / 'x.model', vocab_size=300)


def test_tokenizer_vocab_too_large_raises(tmp_path):
  with pytest.raises(ValueError, match='Vocabulary size too high'):
    train_tokenizer(['some text'], tmp_path / 'x.model', vocab_size=5000)
