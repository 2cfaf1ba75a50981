"""The fine-tuning data pipeline: loss weights, packing, resume, sharding, errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.text import chat
from gemma4_jax.training import data
from gemma4_jax.training import packing
from gemma4_jax.training import records
from gemma4_jax.transformer import Transformer
from tests import oracle

WEATHER_CONVERSATION = {
    'messages': [
        {'role': 'system', 'content': 'You answer about the weather.'},
        {'role': 'user', 'content': 'How is Paris today?'},
        {
            'role': 'assistant',
            'tool_calls': [
                {'function': {'name': 'get_weather', 'arguments': {'city': 'Paris'}}}
            ],
        },
        {'role': 'tool', 'name': 'get_weather', 'content': {'temperature': 21}},
        {'role': 'assistant', 'content': 'It is sunny and 21 degrees.'},
    ],
}


def _write_jsonl(path, lines):
  with open(path, 'w', encoding='utf-8') as file:
    for line in lines:
      file.write((line if isinstance(line, str) else json.dumps(line)) + '\n')
  return path


def _runs(ids, weights, weighted):
  """Decoded texts of the maximal runs of tokens with (weight > 0) == weighted."""
  runs, current = [], []
  for token, weight in zip(ids, weights):
    if (weight > 0) == weighted:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return runs


def _segments(batches):
  """Each packed example of the batches as a dict of 1-D arrays, in row order."""
  found = []
  for batch in batches:
    for row in range(batch['tokens'].shape[0]):
      segment_ids = batch['segment_ids'][row]
      for segment in range(1, segment_ids.max() + 1):
        mask = segment_ids == segment
        found.append({name: batch[name][row][mask] for name in packing.ROW_FEATURES})
  return found


def _text_lines(count):
  return [{'text': f'example number {i} ' + 'word ' * (i % 5)} for i in range(count)]


def _example_key(example):
  return tuple(example['tokens'].tolist())


# Loss weights.


def test_conversation_weights_only_model_parts(gemma4_tokenizer):
  ids, weights = chat.encode_chat_for_training(
      gemma4_tokenizer, WEATHER_CONVERSATION['messages']
  )

  weighted = [gemma4_tokenizer.decode(run) for run in _runs(ids, weights, True)]
  assert weighted == [
      '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>',
      'It is sunny and 21 degrees.<turn|>',
  ]

  unweighted = [gemma4_tokenizer.decode(run) for run in _runs(ids, weights, False)]
  assert unweighted == [
      '<|turn>system\nYou answer about the weather.<turn|>\n'
      '<|turn>user\nHow is Paris today?<turn|>\n<|turn>model\n',
      'response:get_weather{temperature:21}<tool_response|>',
      '\n',
  ]
  assert ids[0] == gemma4_tokenizer.special.bos
  assert weights[0] == 0.0


def test_conversation_ids_equal_encode_chat(gemma4_tokenizer):
  conversations = [
      WEATHER_CONVERSATION['messages'],
      [
          {'role': 'user', 'content': 'Hi\n\nthere '},
          {'role': 'model', 'content': ' Hello!\n\nHow can I help?'},
          {'role': 'user', 'content': '  list  two  things'},
          {'role': 'model', 'content': '- one\n- two'},
      ],
      [
          {'role': 'user', 'content': 'Call it.'},
          {
              'role': 'model',
              'reasoning': 'I should call f.',
              'tool_calls': [{'name': 'f', 'arguments': {'x': 1}}],
          },
      ],
  ]
  for messages in conversations:
    ids, weights = chat.encode_chat_for_training(gemma4_tokenizer, messages)

    expected = chat.encode_chat(gemma4_tokenizer, messages, add_generation_prompt=False)
    assert ids == expected
    assert len(weights) == len(ids)


def test_pending_call_and_thought_weighted(gemma4_tokenizer):
  messages = [
      {'role': 'user', 'content': 'Call it.'},
      {
          'role': 'model',
          'reasoning': 'I should call f.',
          'tool_calls': [{'name': 'f', 'arguments': {'x': 1}}],
      },
  ]
  ids, weights = chat.encode_chat_for_training(gemma4_tokenizer, messages)

  weighted = [gemma4_tokenizer.decode(run) for run in _runs(ids, weights, True)]
  assert weighted == [
      '<|channel>thought\nI should call f.\n<channel|><|tool_call>call:f{x:1}<tool_call|><|tool_response>'
  ]


def test_text_record_weights_after_bos(gemma4_tokenizer):
  record = records.Record('mem', 1, records.TEXT, {'text': 'Plain text here.'})
  ids, weights = records.encode_record(record, gemma4_tokenizer)

  expected = [gemma4_tokenizer.special.bos] + gemma4_tokenizer.encode(
      'Plain text here.', add_bos=False
  ) + [gemma4_tokenizer.special.eos]
  assert ids.tolist() == expected
  assert weights.tolist() == [0.0] + [1.0] * (len(expected) - 1)


def test_prompt_response_weights_response(gemma4_tokenizer):
  record = records.Record(
      'mem', 1, records.PROMPT_RESPONSE, {'prompt': 'Say yes.', 'response': 'Yes.'}
  )
  ids, weights = records.encode_record(record, gemma4_tokenizer)

  assert gemma4_tokenizer.decode(ids) == '<|turn>user\nSay yes.<turn|>\n<|turn>model\nYes.<turn|>\n'
  weighted = [gemma4_tokenizer.decode(run) for run in _runs(ids, weights, True)]
  assert weighted == ['Yes.<turn|>']


# Packing and padding.


def test_packed_examples_equal_unpacked(tmp_path, gemma4_tokenizer):
  lines = _text_lines(12) + [WEATHER_CONVERSATION, {'prompt': 'Q?', 'response': 'A.'}]
  path = _write_jsonl(tmp_path / 'mixed.jsonl', lines)
  dataset = data.make_dataset(
      path, gemma4_tokenizer, seq_len=64, batch_size=2, seed=0, num_epochs=1,
      shard_index=0, shard_count=1,
  )
  batches = list(dataset)

  expected = {}
  for record in records.read_jsonl(path):
    example = packing.next_token_example(*records.encode_record(record, gemma4_tokenizer))
    expected[_example_key(example)] = example
  found = _segments(batches)
  assert len(found) == len(lines)
  assert {_example_key(e) for e in found} == set(expected)
  for example in found:
    reference = expected[_example_key(example)]
    np.testing.assert_array_equal(example['targets'], reference['targets'])
    np.testing.assert_array_equal(example['loss_weights'], reference['loss_weights'])
    np.testing.assert_array_equal(example['positions'], np.arange(len(reference['tokens'])))
  assert sum(int(b['segment_ids'].max(axis=1).sum()) for b in batches) == len(lines)


def test_packed_row_layout():
  examples = [
      {'tokens': np.array([5, 6, 7], np.int32), 'targets': np.array([6, 7, 8], np.int32),
       'loss_weights': np.array([0, 1, 1], np.float32)},
      {'tokens': np.array([9, 10], np.int32), 'targets': np.array([10, 11], np.int32),
       'loss_weights': np.array([1, 1], np.float32)},
  ]
  batches = list(data.batch_examples(
      grain.MapDataset.source(examples), seq_len=8, batch_size=1, num_packing_bins=1
  ))

  assert len(batches) == 1
  batch = batches[0]
  np.testing.assert_array_equal(batch['tokens'][0], [5, 6, 7, 9, 10, 0, 0, 0])
  np.testing.assert_array_equal(batch['targets'][0], [6, 7, 8, 10, 11, 0, 0, 0])
  np.testing.assert_array_equal(batch['loss_weights'][0], [0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['segment_ids'][0], [1, 1, 1, 2, 2, 0, 0, 0])
  np.testing.assert_array_equal(batch['positions'][0], [0, 1, 2, 0, 1, 0, 0, 0])
  assert batch['tokens'].dtype == np.int32
  assert batch['loss_weights'].dtype == np.float32
  assert batch['segment_ids'].dtype == np.int32
  assert batch['positions'].dtype == np.int32


def test_padding_mode_one_example_per_row(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(5))
  dataset = data.make_dataset(
      path, gemma4_tokenizer, seq_len=32, batch_size=2, seed=0, packing=False,
      num_epochs=1, shard_index=0, shard_count=1,
  )
  batches = list(dataset)

  assert len(batches) == 3  # 5 rows, the last batch padded with an empty row.
  for batch in batches:
    assert batch['tokens'].shape == (2, 32)
    assert set(np.unique(batch['segment_ids'])) <= {0, 1}
  assert batches[-1]['segment_ids'][1].max() == 0
  assert batches[-1]['loss_weights'][1].sum() == 0
  assert len(_segments(batches)) == 5


def test_overlong_truncated_or_dropped(tmp_path, gemma4_tokenizer, caplog):
  lines = [{'text': 'short'}, {'text': 'a much longer text ' * 20}]
  path = _write_jsonl(tmp_path / 'long.jsonl', lines)
  common = dict(seq_len=16, batch_size=1, seed=0, packing=False, shuffle=False,
                num_epochs=1, shard_index=0, shard_count=1)

  with caplog.at_level(logging.INFO):
    truncated = data.make_dataset(path, gemma4_tokenizer, overlong='truncate', **common)
    truncated_segments = _segments(list(truncated))
  assert truncated.stats.truncated == 1
  assert 'truncated longer than seq_len: 1 of the 2 examples' in caplog.text
  long_record = records.read_jsonl(path)[1]
  full = packing.next_token_example(*records.encode_record(long_record, gemma4_tokenizer))
  np.testing.assert_array_equal(truncated_segments[1]['tokens'], full['tokens'][:16])
  np.testing.assert_array_equal(truncated_segments[1]['targets'], full['targets'][:16])

  dropped = data.make_dataset(path, gemma4_tokenizer, overlong='drop', **common)
  assert len(_segments(list(dropped))) == 1
  assert dropped.stats.dropped_overlong == 1


@pytest.mark.parametrize('config', [oracle.DENSE_LIKE, oracle.E2B_LIKE], ids=lambda c: c.name)
def test_packed_logits_equal_alone(config):
  rng = np.random.default_rng(0)
  lengths = [13, 20, 9, 17, 11, 6]  # Most cross the sliding window of 8.
  examples = []
  for length in lengths:
    ids = rng.integers(1, config.vocab_size, size=length + 1).astype(np.int32)
    examples.append(packing.next_token_example(ids, np.ones(length + 1, np.float32)))
  batch = next(iter(data.batch_examples(
      grain.MapDataset.source(examples), seq_len=40, batch_size=2, num_packing_bins=2
  )))
  assert batch['segment_ids'].max() >= 2  # Rows really hold several examples.

  model = Transformer(config=config, dtype=jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']
  apply = jax.jit(model.apply)

  checked = 0
  row_length = batch['tokens'].shape[1]
  for row in range(batch['tokens'].shape[0]):
    # One row per call, so the packed and the alone runs have the same shape:
    # XLA's CPU kernels round differently for other shapes (about 1e-4
    # between lengths 20 and 40 for e2b_like, with no packing involved).
    packed = apply(
        {'params': params},
        jnp.asarray(batch['tokens'][row : row + 1]),
        positions=jnp.asarray(batch['positions'][row : row + 1]),
        segment_ids=jnp.asarray(batch['segment_ids'][row : row + 1]),
        input_mask=jnp.asarray(batch['segment_ids'][row : row + 1] != 0),
    ).logits[0]
    for segment in range(1, batch['segment_ids'][row].max() + 1):
      mask = batch['segment_ids'][row] == segment
      length = int(mask.sum())
      alone_tokens = np.zeros((1, row_length), np.int32)
      alone_tokens[0, :length] = batch['tokens'][row][mask]
      alone = apply(
          {'params': params},
          jnp.asarray(alone_tokens),
          input_mask=jnp.asarray(np.arange(row_length) < length)[None],
      ).logits[0, :length]
      np.testing.assert_allclose(packed[mask], alone, atol=1e-5, rtol=1e-5)
      checked += 1
  assert checked >= 3


# Resume, sharding, shuffling, epochs.


@pytest.mark.parametrize('use_packing', [True, False])
def test_restored_iterator_continues_same_batches(tmp_path, gemma4_tokenizer, use_packing):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(30))
  settings = dict(seq_len=24, batch_size=2, seed=3, packing=use_packing,
                  num_packing_bins=3, num_epochs=None, shard_index=0, shard_count=1)
  original = iter(data.make_dataset(path, gemma4_tokenizer, **settings))
  for _ in range(5):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  expected = [next(original) for _ in range(20)]  # Crosses an epoch boundary.

  restored = iter(data.make_dataset(path, gemma4_tokenizer, **settings))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for name in packing.ROW_FEATURES:
      np.testing.assert_array_equal(got[name], want[name])


def test_state_from_other_settings_rejected(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(6))
  first = iter(data.make_dataset(path, gemma4_tokenizer, seq_len=24, batch_size=2, seed=0,
                                 shard_index=0, shard_count=1))
  next(first)
  other = iter(data.make_dataset(path, gemma4_tokenizer, seq_len=24, batch_size=2, seed=1,
                                 shard_index=0, shard_count=1))
  with pytest.raises(ValueError, match='seed: saved 0, now 1'):
    other.set_state(first.get_state())


def _epoch_examples(path, tokenizer, **settings):
  dataset = data.make_dataset(
      path, tokenizer, seq_len=32, batch_size=2, packing=False, **settings
  )
  return [_example_key(e) for e in _segments(list(dataset))]


def test_two_shards_disjoint_and_complete(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(11))
  everything = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=1,
                               shard_index=0, shard_count=1)
  shard_0 = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=1,
                            shard_index=0, shard_count=2)
  shard_1 = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=1,
                            shard_index=1, shard_count=2)

  assert len(everything) == 11
  assert not set(shard_0) & set(shard_1)
  assert sorted(shard_0 + shard_1) == sorted(everything)


def test_seed_changes_order_not_content(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(16))
  seed_0 = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=1,
                           shard_index=0, shard_count=1)
  seed_0_again = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=1,
                                 shard_index=0, shard_count=1)
  seed_1 = _epoch_examples(path, gemma4_tokenizer, seed=1, num_epochs=1,
                           shard_index=0, shard_count=1)
  unshuffled = _epoch_examples(path, gemma4_tokenizer, seed=0, shuffle=False,
                               num_epochs=1, shard_index=0, shard_count=1)

  assert seed_0 == seed_0_again
  assert seed_0 != seed_1
  assert sorted(seed_0) == sorted(seed_1)
  file_order = [
      _example_key(packing.next_token_example(*records.encode_record(r, gemma4_tokenizer)))
      for r in records.read_jsonl(path)
  ]
  assert unshuffled == file_order


def test_epochs_repeat_every_example(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(10))
  examples = _epoch_examples(path, gemma4_tokenizer, seed=0, num_epochs=3,
                             shard_index=0, shard_count=1)

  assert len(examples) == 30
  assert set(collections.Counter(examples).values()) == {3}
  assert examples[:10] != examples[10:20]  # Each epoch has its own order.
  assert sorted(examples[:10]) == sorted(examples[10:20])


def test_shard_defaults_to_process(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', _text_lines(4))
  dataset = data.make_dataset(path, gemma4_tokenizer, seq_len=32, batch_size=2, seed=0)

  assert dataset.config.shard_index == jax.process_index()
  assert dataset.config.shard_count == jax.process_count()


# Errors.


def test_malformed_json_names_file_and_line(tmp_path):
  path = _write_jsonl(tmp_path / 'bad.jsonl', [{'text': 'fine'}, '', '{"text": "broken'])

  with pytest.raises(records.DataFormatError, match=rf'{tmp_path}/bad.jsonl:3: invalid JSON'):
    records.read_jsonl(path)


@pytest.mark.parametrize(
    'line, source, problem',
    [
        ({'content': 'x'}, 'auto', 'cannot tell the kind of example'),
        ({'text': 'x', 'messages': []}, 'auto', 'more than one kind'),
        ({'text': 3}, 'auto', '"text" must be a string'),
        ({'messages': [{'role': 'robot', 'content': 'x'}]}, 'auto', "role 'robot'"),
        ({'prompt': 'x'}, 'prompt_response', r"needs the key\(s\) \['response'\]"),
        ([1, 2], 'auto', 'expected a JSON object'),
    ],
)
def test_invalid_line_names_problem(tmp_path, line, source, problem):
  path = _write_jsonl(tmp_path / 'bad.jsonl', ['', line])

  with pytest.raises(records.DataFormatError, match=rf'bad.jsonl:2: .*{problem}'):
    records.read_jsonl(path, source=source)


def test_unencodable_record_names_line(tmp_path, gemma4_tokenizer):
  bad_call = {'messages': [
      {'role': 'user', 'content': 'x'},
      {'role': 'model', 'tool_calls': [{'no_name': True}]},
  ]}
  path = _write_jsonl(tmp_path / 'calls.jsonl', [bad_call])
  dataset = data.make_dataset(path, gemma4_tokenizer, seq_len=32, batch_size=1, seed=0,
                              shard_index=0, shard_count=1)

  with pytest.raises(records.DataFormatError, match='calls.jsonl:1: cannot encode the chat'):
    next(iter(dataset))


def test_source_switch_forces_kind(tmp_path, gemma4_tokenizer):
  path = _write_jsonl(tmp_path / 'text.jsonl', [{'text': 'hello', 'prompt': 'p', 'response': 'r'}])

  assert records.read_jsonl(path, source='text')[0].kind == records.TEXT
  assert records.read_jsonl(path, source='prompt_response')[0].kind == records.PROMPT_RESPONSE
  with pytest.raises(records.DataFormatError, match='more than one kind'):
    records.read_jsonl(path)
