"""Perplexity, generation scoring and `python -m eval.evaluate`.

A two-layer random model at the real 262144-piece vocabulary runs with the
real Gemma 4 tokenizer. Perplexity is checked against the official `gemma`
4.0.1 model's full logits on each example alone, with the log-softmax done
in numpy. Generated answers are checked against the official
`gm.text.Gemma4Sampler` (greedy) on the same prompts. The matching rule is
checked on hand-written model outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import checkpoint
from gemma4_jax import evaluation
from gemma4_jax.config import GLOBAL, LOCAL
from gemma4_jax.sampling.sampler import Sampler
from gemma4_jax.text import chat
from gemma4_jax.text import tools as tools_lib
from gemma4_jax.text.tool_calls import ToolCall, parse_model_output
from gemma4_jax.training import records
from gemma4_jax.transformer import Transformer
from tests import oracle

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = dataclasses.replace(
    oracle.DENSE_LIKE,
    name='tiny_eval',
    vocab_size=262_144,
    num_layers=2,
    attention_pattern=(LOCAL, GLOBAL),
)
SEQ_LEN = 256
CHUNK_SIZE = 64
MAX_NEW_TOKENS = 12

WEATHER_TOOL = {
    'type': 'function',
    'function': {
        'name': 'get_weather',
        'description': 'Current weather of a city.',
        'parameters': {
            'type': 'object',
            'properties': {
                'city': {'type': 'string'},
                'days': {'type': 'integer'},
            },
            'required': ['city'],
        },
    },
}

# A conversation whose last model message answers after a tool result.
WEATHER_ANSWER = {
    'tools': [WEATHER_TOOL],
    'messages': [
        {'role': 'user', 'content': 'How is Paris today?'},
        {
            'role': 'assistant',
            'tool_calls': [
                {'function': {'name': 'get_weather', 'arguments': {'city': 'Paris'}}}
            ],
        },
        {'role': 'tool', 'name': 'get_weather', 'content': {'temperature': 21}},
        {'role': 'assistant', 'content': 'Sunny, 21 degrees.'},
    ],
}
# A conversation whose last model message is a tool call, with OpenAI-style
# arguments as JSON text.
WEATHER_CALL = {
    'tools': [WEATHER_TOOL],
    'messages': [
        {'role': 'user', 'content': 'Weather in Oslo for 3 days?'},
        {
            'role': 'assistant',
            'tool_calls': [{
                'type': 'function',
                'function': {
                    'name': 'get_weather',
                    'arguments': '{"city": "Oslo", "days": 3}',
                },
            }],
        },
    ],
}
CAPITAL = {
    'messages': [
        {'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'Capital of France?'},
        {'role': 'model', 'content': 'Paris.'},
    ],
}
PROMPT_RESPONSE = {'prompt': 'Say hi.', 'response': 'Hi!'}
PLAIN_TEXT = {'text': 'The quick brown fox jumps over the lazy dog.'}

DATA = (WEATHER_ANSWER, WEATHER_CALL, CAPITAL, PROMPT_RESPONSE, PLAIN_TEXT)


@functools.cache
def official_params():
  """Official init with the weights x3, for livelier logits."""
  model = oracle.official_model(CONFIG, jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  return jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params['params'])


def our_model() -> Transformer:
  return Transformer(config=CONFIG, dtype=jnp.float32)


@pytest.fixture(scope='module')
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('evaluation') / 'valid.jsonl'
  path.write_text(''.join(json.dumps(line) + '\n' for line in DATA))
  return path


@pytest.fixture(scope='module')
def oracle_loss(data_file, gemma4_tokenizer):
  """Weighted mean NLL from the official model's logits, example by example.

  Each example runs alone as one row. Rows are right-padded to a common
  length so that one compiled function serves all, and causal attention
  keeps the padding out of the valid positions.
  """
  encoded = [
      records.encode_record(record, gemma4_tokenizer)
      for record in records.read_jsonl(data_file)
  ]
  length = max(len(ids) for ids, _ in encoded)
  apply = jax.jit(
      lambda p, t: oracle.official_model(CONFIG, jnp.float32).apply(
          {'params': p}, t
      ).logits
  )

  loss_sum = 0.0
  weight_sum = 0.0
  num_tokens = 0
  for ids, weights in encoded:
    tokens = np.zeros((1, length), np.int32)
    tokens[0, : len(ids)] = ids
    logits = np.asarray(apply(official_params(), jnp.asarray(tokens)))[0]
    for t in range(len(ids) - 1):
      if weights[t + 1] == 0:
        continue
      row = logits[t].astype(np.float64)
      log_normalizer = row.max() + np.log(np.sum(np.exp(row - row.max())))
      loss_sum += weights[t + 1] * (log_normalizer - row[ids[t + 1]])
      weight_sum += weights[t + 1]
      num_tokens += 1
  return {
      'loss': loss_sum / weight_sum,
      'weight_sum': weight_sum,
      'num_tokens': num_tokens,
  }


# ---------------------------------------------------------------------------
# Perplexity.


# Three row layouts. First, several batches of one packed row. Second, one
# example per row, with a padding row in the last batch. Third, all examples
# packed into one row of a batch of four, so three rows are padding.
@pytest.mark.parametrize(
    'batch_size, seq_len, packing',
    [(1, 128, True), (2, 128, False), (4, SEQ_LEN, True)],
)
def test_perplexity_matches_official_logits(
    batch_size, seq_len, packing, data_file, oracle_loss, gemma4_tokenizer
):
  dataset = evaluation.evaluation_batches(
      data_file,
      gemma4_tokenizer,
      seq_len=seq_len,
      batch_size=batch_size,
      packing=packing,
  )
  batches = list(dataset)
  assert dataset.stats.truncated == 0
  if batch_size > 1:
    padding_rows = [
        row for batch in batches for row in batch['segment_ids']
        if not row.any()
    ]
    assert padding_rows
  result = evaluation.perplexity(
      our_model(), official_params(), batches, chunk_size=CHUNK_SIZE
  )

  assert result.num_batches == len(batches)
  assert result.num_tokens == oracle_loss['num_tokens']
  assert result.weight_sum == pytest.approx(oracle_loss['weight_sum'])
  assert result.loss == pytest.approx(oracle_loss['loss'], rel=1e-5)
  assert result.perplexity == pytest.approx(np.exp(oracle_loss['loss']), rel=1e-4)


def test_perplexity_extra_padding_batch(data_file, oracle_loss, gemma4_tokenizer):
  batches = list(
      evaluation.evaluation_batches(
          data_file, gemma4_tokenizer, seq_len=SEQ_LEN, batch_size=4
      )
  )
  padding = {name: np.zeros_like(value) for name, value in batches[0].items()}
  result = evaluation.perplexity(
      our_model(),
      official_params(),
      [padding] + batches + [padding],
      chunk_size=CHUNK_SIZE,
  )

  assert result.num_batches == len(batches) + 2
  assert result.num_tokens == oracle_loss['num_tokens']
  assert result.loss == pytest.approx(oracle_loss['loss'], rel=1e-5)


def test_jsonl_perplexity_counts_only_model_turns(
    data_file, oracle_loss, gemma4_tokenizer
):
  result = evaluation.jsonl_perplexity(
      our_model(),
      official_params(),
      data_file,
      gemma4_tokenizer,
      seq_len=SEQ_LEN,
      batch_size=4,
      chunk_size=CHUNK_SIZE,
  )
  # What the model writes in each example, written out by hand. Plain text
  # counts whole after <bos>, with <eos>.
  paris_call = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
  oslo_call = '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:3}<tool_call|>'
  model_spans = (
      paris_call + '<|tool_response>',
      'Sunny, 21 degrees.<turn|>',
      oslo_call + '<|tool_response>',
      'Paris.<turn|>',
      'Hi!<turn|>',
      PLAIN_TEXT['text'],
  )
  weighted = sum(
      len(gemma4_tokenizer.encode(span, add_bos=False)) for span in model_spans
  )
  weighted += 1  # The <eos> of the plain text.

  assert result.num_tokens == weighted
  assert result.weight_sum == weighted
  assert result.loss == pytest.approx(oracle_loss['loss'], rel=1e-5)


def test_perplexity_without_weights_rejected():
  batch = {
      name: np.zeros((1, 8), np.float32 if name == 'loss_weights' else np.int32)
      for name in ('tokens', 'targets', 'loss_weights', 'positions', 'segment_ids')
  }
  with pytest.raises(ValueError, match='no target with a loss weight'):
    evaluation.perplexity(our_model(), official_params(), [batch], chunk_size=8)


# ---------------------------------------------------------------------------
# Prompts and references.


def _record(data, kind=records.CHAT):
  return records.Record('valid.jsonl', 1, kind, data)


def test_generation_prompt_plain_conversation(gemma4_tokenizer):
  example = evaluation.generation_example(_record(CAPITAL), gemma4_tokenizer)
  expected_text = (
      '<|turn>system\nBe brief.<turn|>\n'
      '<|turn>user\nCapital of France?<turn|>\n'
      '<|turn>model\n'
  )

  assert example.prompt_ids == tuple(
      gemma4_tokenizer.encode(expected_text, add_bos=True)
  )
  assert example.reference == evaluation.Reference(answer='Paris.')


def test_generation_prompt_continues_after_tool_result(gemma4_tokenizer):
  example = evaluation.generation_example(
      _record(WEATHER_ANSWER), gemma4_tokenizer
  )
  expected_text = (
      '<|turn>system\n'
      + tools_lib.format_declaration(WEATHER_TOOL)
      + '<turn|>\n'
      '<|turn>user\nHow is Paris today?<turn|>\n'
      '<|turn>model\n'
      '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
      '<|tool_response>response:get_weather{temperature:21}<tool_response|>'
  )

  assert example.prompt_ids == tuple(
      gemma4_tokenizer.encode(expected_text, add_bos=True)
  )
  assert example.reference == evaluation.Reference(answer='Sunny, 21 degrees.')


def test_generation_reference_openai_tool_call(gemma4_tokenizer):
  example = evaluation.generation_example(_record(WEATHER_CALL), gemma4_tokenizer)
  prompt = gemma4_tokenizer.decode(list(example.prompt_ids))

  assert prompt.endswith('<|turn>user\nWeather in Oslo for 3 days?<turn|>\n<|turn>model\n')
  assert tools_lib.format_declaration(WEATHER_TOOL) in prompt
  assert example.reference.tool_calls == (
      ToolCall('get_weather', {'city': 'Oslo', 'days': 3}),
  )


def test_generation_prompt_response_record(gemma4_tokenizer):
  example = evaluation.generation_example(
      _record(PROMPT_RESPONSE, records.PROMPT_RESPONSE), gemma4_tokenizer
  )
  expected_text = '<|turn>user\nSay hi.<turn|>\n<|turn>model\n'

  assert example.prompt_ids == tuple(
      gemma4_tokenizer.encode(expected_text, add_bos=True)
  )
  assert example.reference == evaluation.Reference(answer='Hi!')


def test_generation_examples_skip_unscorable(gemma4_tokenizer):
  only_model = {'messages': [{'role': 'model', 'content': 'Hello.'}]}
  no_model = {'messages': [{'role': 'user', 'content': 'Hello?'}]}
  data = [
      _record(PLAIN_TEXT, records.TEXT),
      _record(only_model),
      _record(no_model),
      _record(CAPITAL),
  ]
  examples = evaluation.generation_examples(data, gemma4_tokenizer)

  assert [e.reference.answer for e in examples] == ['Paris.']


# ---------------------------------------------------------------------------
# Matching rule, on hand-written model outputs.

OSLO_CALL = ToolCall('get_weather', {'city': 'Oslo', 'days': 3})
OSLO_TEXT = '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:3}<tool_call|>'
BERN_TEXT = '<|tool_call>call:get_weather{city:<|"|>Bern<|"|>}<tool_call|>'


def _hit(reference, text):
  return evaluation.matches_reference(reference, parse_model_output(text))


@pytest.mark.parametrize(
    'text, hit',
    [
        (OSLO_TEXT + '<|tool_response>', True),
        # The answer text around a call is not compared.
        ('Let me check. ' + OSLO_TEXT + '<|tool_response>', True),
        # The thought is not compared.
        ('<|channel>thought\nOslo.<channel|>' + OSLO_TEXT, True),
        # Arguments are mappings: their order does not matter.
        ('<|tool_call>call:get_weather{days:3,city:<|"|>Oslo<|"|>}<tool_call|>', True),
        # 3.0 and 3 are the same number.
        ('<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:3.0}<tool_call|>', True),
    ],
)
def test_tool_call_hits(text, hit):
  reference = evaluation.Reference(answer='', tool_calls=(OSLO_CALL,))
  assert _hit(reference, text) is hit


@pytest.mark.parametrize(
    'text',
    [
        # A string "3" is not the number 3.
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:<|"|>3<|"|>}<tool_call|>',
        # A wrong value.
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:4}<tool_call|>',
        # A string differs in case or whitespace.
        '<|tool_call>call:get_weather{city:<|"|>oslo<|"|>,days:3}<tool_call|>',
        '<|tool_call>call:get_weather{city:<|"|>Oslo <|"|>,days:3}<tool_call|>',
        # A missing and an extra argument.
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>',
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:3,unit:null}<tool_call|>',
        # Another function name.
        '<|tool_call>call:get_forecast{city:<|"|>Oslo<|"|>,days:3}<tool_call|>',
        # An extra call.
        OSLO_TEXT + BERN_TEXT + '<|tool_response>',
        # No call, only text.
        'The weather in Oslo is fine.<turn|>',
        # A call cut off by the token limit.
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,da',
        '<|tool_call>call:get_weather{city:<|"|>Os',
        # A malformed call next to a correct one.
        OSLO_TEXT + '<|tool_call>call:get_weather{city:}<tool_call|>',
    ],
)
def test_tool_call_misses(text):
  reference = evaluation.Reference(answer='', tool_calls=(OSLO_CALL,))
  assert _hit(reference, text) is False


def test_tool_call_order_matters():
  bern = ToolCall('get_weather', {'city': 'Bern'})
  reference = evaluation.Reference(answer='', tool_calls=(OSLO_CALL, bern))

  assert _hit(reference, OSLO_TEXT + BERN_TEXT) is True
  assert _hit(reference, BERN_TEXT + OSLO_TEXT) is False
  assert _hit(reference, OSLO_TEXT) is False


@pytest.mark.parametrize(
    'expected, got, equal',
    [
        (1, 1.0, True),
        (1.5, 1.5, True),
        (1, '1', False),
        ('1', 1, False),
        (True, 1, False),
        (1, True, False),
        (False, 0, False),
        (True, True, True),
        (None, None, True),
        (None, 0, False),
        (None, '', False),
        ('', None, False),
        ([1, 2], [1.0, 2.0], True),
        ([1, 2], [2, 1], False),
        ([1], [1, 1], False),
        ({'a': [1, {'b': 'x'}]}, {'a': [1.0, {'b': 'x'}]}, True),
        ({'a': 1}, {'a': 1, 'b': 2}, False),
        ({'a': 1}, [1], False),
        ('a', ['a'], False),
    ],
)
def test_values_equal_rule(expected, got, equal):
  assert evaluation.values_equal(expected, got) is equal


@pytest.mark.parametrize(
    'text, hit',
    [
        ('Paris.<turn|>', True),
        ('  Paris.\n<turn|>', True),
        ('<|channel>thought\nEasy.<channel|>Paris.<turn|>', True),
        # Cut off by the token limit, with no <turn|>: the text still counts.
        ('Paris.', True),
        ('Paris', False),
        ('paris.<turn|>', False),
        ('Paris. It is in France.<turn|>', False),
        # A tool call where an answer was expected.
        ('Paris.' + OSLO_TEXT, False),
        # A cut-off call is kept as answer text, so the text differs.
        ('Paris.<|tool_call>call:get_we', False),
    ],
)
def test_answer_reference_compared_by_text(text, hit):
  reference = evaluation.Reference(answer='Paris.')
  assert _hit(reference, text) is hit


# ---------------------------------------------------------------------------
# Generation against the official sampler.


@pytest.fixture(scope='module')
def examples(data_file, gemma4_tokenizer):
  return evaluation.generation_examples(
      records.read_jsonl(data_file), gemma4_tokenizer
  )


@pytest.fixture(scope='module')
def official_texts(examples, gemma4_tokenizer, gemma4_tokenizer_path):
  """Greedy answers of `gm.text.Gemma4Sampler`, one batch of all prompts.

  Each text is decoded by our tokenizer up to and including the stop token,
  which is how our sampler reports it.
  """
  from gemma import gm

  official_tokenizer = gm.text.Gemma4Tokenizer(path=str(gemma4_tokenizer_path))
  prompts = []
  for example in examples:
    text = gemma4_tokenizer.decode(list(example.prompt_ids[1:]))
    # The official tokenizer reads the prompt text back into our ids.
    assert official_tokenizer.encode(text, add_bos=True) == list(example.prompt_ids)
    prompts.append(text)
  sampler = gm.text.Gemma4Sampler(
      model=oracle.official_model(CONFIG, jnp.float32),
      params=official_params(),
      tokenizer=official_tokenizer,
      cache_length=512,
      max_out_length=MAX_NEW_TOKENS + 8,
  )
  output = sampler.sample(prompts, max_new_tokens=MAX_NEW_TOKENS, return_state=True)
  predicted = np.asarray(output.state.predicted_tokens)

  stop_ids = {
      gemma4_tokenizer.special.eos,
      gemma4_tokenizer.special.end_of_turn,
      gemma4_tokenizer.special.start_of_tool_response,
  }
  texts = []
  for row in predicted[:, :MAX_NEW_TOKENS].tolist():
    tokens = []
    for token in row:
      tokens.append(token)
      if token in stop_ids:
        break
    texts.append(gemma4_tokenizer.decode(tokens))
  return texts


@pytest.fixture(scope='module')
def generation_result(examples, gemma4_tokenizer):
  sampler = Sampler(our_model(), official_params(), gemma4_tokenizer)
  # Four prompts in batches of three: the second batch is filled up with
  # copies of its prompt.
  return evaluation.generation_accuracy(
      sampler, examples, max_new_tokens=MAX_NEW_TOKENS, batch_size=3
  )


def test_generation_texts_match_official_sampler(
    generation_result, official_texts, examples
):
  assert len(examples) == 4
  assert [r.index for r in generation_result.examples] == [0, 1, 2, 3]
  for result, expected in zip(generation_result.examples, official_texts):
    assert result.text == expected, f'example {result.index} differs'


def test_generation_results_fields(generation_result, examples):
  for result, example in zip(generation_result.examples, examples):
    assert result.location == example.location
    assert result.expected == example.reference
    assert result.got == parse_model_output(result.text)
    assert result.hit == evaluation.matches_reference(example.reference, result.got)
    assert result.finish_reason in ('stop', 'length')


def test_generation_counts(generation_result):
  results = generation_result.examples
  hits = sum(r.hit for r in results)

  assert generation_result.num_examples == 4
  assert generation_result.num_tool_call_examples == 1
  assert generation_result.num_answer_examples == 3
  assert generation_result.num_hits == hits
  assert generation_result.accuracy == hits / 4
  assert generation_result.num_truncated == sum(
      r.finish_reason == 'length' for r in results
  )


# ---------------------------------------------------------------------------
# The command line.


@pytest.fixture(scope='module')
def saved_checkpoint(tmp_path_factory, gemma4_tokenizer_path):
  """The test params saved with `save_params`, a tokenizer and a config."""
  base = tmp_path_factory.mktemp('eval_checkpoint')
  checkpoint.save_params(official_params(), base / 'model' / 'ckpt')
  shutil.copy(gemma4_tokenizer_path, base / 'model' / 'tokenizer.model')
  fields = dataclasses.asdict(CONFIG)
  fields['attention_pattern'] = [kind.value for kind in CONFIG.attention_pattern]
  (base / 'tiny.json').write_text(json.dumps(fields))
  return {'ckpt': str(base / 'model'), 'config': str(base / 'tiny.json')}


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_REPO_ROOT)
  return subprocess.run(
      [sys.executable, '-m', 'eval.evaluate', *args],
      capture_output=True,
      text=True,
      env=env,
      cwd=_REPO_ROOT,
      timeout=300,
  )


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if 'error:' in line]


def test_cli_prints_metrics(
    saved_checkpoint, data_file, oracle_loss, official_texts, tmp_path
):
  output = tmp_path / 'results.jsonl'
  result = run_evaluate(
      '--ckpt', saved_checkpoint['ckpt'],
      '--model', saved_checkpoint['config'],
      '--data', str(data_file),
      '--dtype', 'float32',
      '--seq_len', str(SEQ_LEN),
      '--chunk_size', str(CHUNK_SIZE),
      '--batch_size', '2',
      '--max_new_tokens', str(MAX_NEW_TOKENS),
      '--output', str(output),
  )

  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  metrics = json.loads(lines[0])
  assert metrics['perplexity']['loss'] == pytest.approx(oracle_loss['loss'], rel=1e-5)
  assert metrics['perplexity']['num_tokens'] == oracle_loss['num_tokens']
  assert metrics['generation']['num_examples'] == 4

  written = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r['text'] for r in written] == official_texts
  assert sum(r['hit'] for r in written) == metrics['generation']['num_hits']


def test_cli_missing_data_error(saved_checkpoint, tmp_path):
  missing = tmp_path / 'no_such.jsonl'
  result = run_evaluate(
      '--ckpt', saved_checkpoint['ckpt'], '--data', str(missing)
  )

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert str(missing) in lines[0]
  assert '--data' in lines[0]
  assert 'Traceback' not in result.stderr
  assert result.stdout == ''


def test_cli_missing_checkpoint_error(data_file, tmp_path):
  missing = tmp_path / 'no_such_checkpoint'
  result = run_evaluate('--ckpt', str(missing), '--data', str(data_file))

  assert result.returncode == 1
  lines = error_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert str(missing) in lines[0]
  assert 'Traceback' not in result.stderr
