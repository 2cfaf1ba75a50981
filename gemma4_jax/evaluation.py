"""Evaluation of a Gemma 4 decoder: perplexity and generation accuracy.

Both measures can be called from a training loop or from `eval/evaluate.py`:

- `perplexity` averages the next-token loss over batches of
  `gemma4_jax.training.data`, with the training loss weights: in
  conversations only what the model writes in its own turns counts.
  `jsonl_perplexity` builds those batches from JSONL files in one pass, in
  file order, keeping the last partial batch.
- `generation_accuracy` cuts each conversation before its last model
  message, generates the model's turn greedily and compares it with that
  message. A reference with tool calls needs the same calls (see
  `values_equal` for how typed arguments compare). Any other reference needs
  the same answer text once whitespace is stripped from both ends.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from gemma4_jax.sampling import sampler as sampler_lib
from gemma4_jax.text import chat as chat_lib
from gemma4_jax.text import tool_calls as tool_calls_lib
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import data as data_lib
from gemma4_jax.training import loss as loss_lib
from gemma4_jax.training import packing as packing_lib
from gemma4_jax.training import records as records_lib
from gemma4_jax.transformer import Transformer

logger = logging.getLogger(__name__)

# The training step's default loss chunk: [B, 512, 262144] float32 logits of
# one chunk take 512 MiB per row.
DEFAULT_CHUNK_SIZE = 512


# ---------------------------------------------------------------------------
# Perplexity.


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Mean next-token loss over an evaluation set.

  Attributes:
    loss: Mean negative log-likelihood in nats per unit of loss weight,
      `loss_sum / weight_sum`. With weights of 1.0 this is the loss per
      target token.
    perplexity: `exp(loss)`.
    num_tokens: Target positions with non-zero weight.
    weight_sum: Sum of the loss weights.
    num_batches: Batches evaluated.
  """

  loss: float
  perplexity: float
  num_tokens: int
  weight_sum: float
  num_batches: int

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=('model', 'chunk_size'))
def _batch_loss_sums(
    params: Any,
    batch: dict[str, jax.Array],
    *,
    model: Transformer,
    chunk_size: int,
) -> dict[str, jax.Array]:
  """Return `loss_sum`, `weight_sum` and `num_tokens` of one batch [B, L].

  It is compiled once per model, chunk size and batch shape, so later
  batches and later `perplexity` calls reuse the compiled function.
  """
  _, metrics = loss_lib.model_loss(model, params, batch, chunk_size=chunk_size)
  return metrics


def perplexity(
    model: Transformer,
    params: Any,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> PerplexityResult:
  """Compute the weighted mean next-token loss and perplexity of `batches`.

  Args:
    model: The decoder. Its `dtype` is the compute dtype; the logits of the
      loss are always accumulated in float32.
    params: Its parameter tree (the contents of `{'params': ...}`).
    batches: Dicts of arrays [B, L] `tokens`, `targets`, `loss_weights`,
      `positions` and `segment_ids`, as `gemma4_jax.training.data` yields
      them; other keys are ignored. Rows whose weights are all 0 (the
      padding of a last batch) add nothing.
    chunk_size: Positions per chunk of the loss; the [B, L, V] logits are
      never formed.
    progress: Show a tqdm progress bar of the batches on stderr.

  Returns:
    The loss summed over all batches (in float64 on the host) and divided
    by the summed weights.

  Raises:
    ValueError: no target position of any batch has a weight.
  """
  loss_sum = 0.0
  weight_sum = 0.0
  num_tokens = 0
  num_batches = 0
  for batch in tqdm.tqdm(
      batches, desc='perplexity', unit='batch', disable=not progress
  ):
    arrays = {name: batch[name] for name in packing_lib.ROW_FEATURES}
    metrics = jax.device_get(
        _batch_loss_sums(params, arrays, model=model, chunk_size=chunk_size)
    )
    loss_sum += float(metrics['loss_sum'])
    weight_sum += float(metrics['weight_sum'])
    num_tokens += int(metrics['num_tokens'])
    num_batches += 1

  if weight_sum <= 0:
    raise ValueError(
        f'the {num_batches} evaluation batches contain no target with a loss'
        ' weight, so there is no loss to average; check that the data has'
        ' model turns or text'
    )
  loss = loss_sum / weight_sum
  return PerplexityResult(
      loss=loss,
      perplexity=math.exp(loss),
      num_tokens=num_tokens,
      weight_sum=weight_sum,
      num_batches=num_batches,
  )


def evaluation_batches(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    packing: bool = True,
    source: str = 'auto',
    overlong: str = packing_lib.TRUNCATE,
) -> data_lib.TrainingDataset:
  """Build batches of JSONL files for `perplexity`: one pass, in file order.

  The examples are encoded and weighted as for training. The last batch is
  padded with rows of zero weight rather than dropped.

  NOTE: every process reads all of the files, so on several hosts each
  process evaluates the whole set.
  """
  return data_lib.make_dataset(
      path,
      tokenizer,
      seq_len=seq_len,
      batch_size=batch_size,
      seed=0,
      packing=packing,
      shuffle=False,
      num_epochs=1,
      shard_index=0,
      shard_count=1,
      source=source,
      overlong=overlong,
      drop_remainder=False,
  )


def jsonl_perplexity(
    model: Transformer,
    params: Any,
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    packing: bool = True,
    source: str = 'auto',
    overlong: str = packing_lib.TRUNCATE,
    progress: bool = False,
) -> PerplexityResult:
  """Compute `perplexity` over the batches of `evaluation_batches(path, ...)`.

  Examples longer than `seq_len` are truncated (or dropped with
  `overlong='drop'`), which changes what is measured, so their counts are
  logged as a warning.
  """
  dataset = evaluation_batches(
      path,
      tokenizer,
      seq_len=seq_len,
      batch_size=batch_size,
      packing=packing,
      source=source,
      overlong=overlong,
  )
  result = perplexity(
      model, params, dataset, chunk_size=chunk_size, progress=progress
  )

  stats = dataset.stats
  cut = stats.truncated + stats.dropped_overlong
  if cut:
    logger.warning(
        '%d of %d examples are longer than seq_len=%d positions: %d truncated,'
        ' %d dropped; raise seq_len to evaluate them whole',
        cut, stats.seen, seq_len, stats.truncated, stats.dropped_overlong,
    )
  logger.info(
      'perplexity %.4f (loss %.4f nats) over %d weighted tokens in %d batches',
      result.perplexity, result.loss, result.num_tokens, result.num_batches,
  )
  return result


# ---------------------------------------------------------------------------
# Matching generated answers with references.


def values_equal(expected: Any, got: Any) -> bool:
  """Compare two tool-call argument values as typed JSON values.

  The rule:

  - numbers are equal when their values are: 1 equals 1.0, because JSON
    gives a tool no distinct integer type and the Gemma 4 syntax writes a
    whole float as `1.0`;
  - a number never equals a string: 1 and "1" differ;
  - a bool equals only a bool of the same value: True differs from 1;
  - None equals only None;
  - strings must be identical, whitespace included;
  - mappings need the same keys and equal values under each key;
  - lists (or tuples) need the same length and equal items in order.
  """
  if isinstance(expected, bool) or isinstance(got, bool):
    return isinstance(expected, bool) and isinstance(got, bool) and expected == got
  if isinstance(expected, (int, float)) or isinstance(got, (int, float)):
    return (
        isinstance(expected, (int, float))
        and isinstance(got, (int, float))
        and expected == got
    )
  if expected is None or got is None:
    return expected is None and got is None
  if isinstance(expected, str) or isinstance(got, str):
    return isinstance(expected, str) and isinstance(got, str) and expected == got
  if isinstance(expected, Mapping) or isinstance(got, Mapping):
    return (
        isinstance(expected, Mapping)
        and isinstance(got, Mapping)
        and set(expected) == set(got)
        and all(values_equal(expected[key], got[key]) for key in expected)
    )
  if isinstance(expected, (list, tuple)) or isinstance(got, (list, tuple)):
    return (
        isinstance(expected, (list, tuple))
        and isinstance(got, (list, tuple))
        and len(expected) == len(got)
        and all(values_equal(e, g) for e, g in zip(expected, got))
    )
  raise TypeError(
      f'cannot compare values of types {type(expected).__name__} and'
      f' {type(got).__name__}; tool-call arguments are JSON values'
  )


def tool_calls_equal(
    expected: Sequence[tool_calls_lib.ToolCall],
    got: Sequence[tool_calls_lib.ToolCall],
) -> bool:
  """Check that `got` is the same list of calls in the same order.

  Calls at the same index need equal names and arguments that are equal by
  `values_equal`. An extra or a missing call makes the lists differ.
  """
  if len(expected) != len(got):
    return False
  return all(
      e.name == g.name and values_equal(e.arguments, g.arguments)
      for e, g in zip(expected, got)
  )


@dataclasses.dataclass(frozen=True)
class Reference:
  """What the model should write in a turn.

  Attributes:
    answer: The answer text, thought removed, stripped.
    tool_calls: The calls in order; when there are any, only they are
      compared.
  """

  answer: str
  tool_calls: tuple[tool_calls_lib.ToolCall, ...] = ()

  def to_json(self) -> dict[str, Any]:
    return {'answer': self.answer, 'tool_calls': _calls_to_json(self.tool_calls)}


def _calls_to_json(calls: Sequence[tool_calls_lib.ToolCall]) -> list[dict[str, Any]]:
  return [{'name': call.name, 'arguments': call.arguments} for call in calls]


def matches_reference(
    reference: Reference, output: tool_calls_lib.ParsedOutput
) -> bool:
  """Score one parsed model turn against its reference.

  With reference tool calls, the output must hold the same list of calls
  (`tool_calls_equal`) and no malformed or cut-off call: the parser keeps
  such a call's raw text, which starts with `<|tool_call>`, in the answer.
  Otherwise the output must hold no tool call, and its stripped answer must
  equal the reference answer. The thought is never compared.
  """
  if reference.tool_calls:
    return (
        tool_calls_equal(reference.tool_calls, output.tool_calls)
        and tool_calls_lib.TOOL_CALL_START not in output.answer
    )
  return not output.tool_calls and output.answer.strip() == reference.answer


# ---------------------------------------------------------------------------
# Generation examples from records.


@dataclasses.dataclass(frozen=True)
class GenerationExample:
  """A conversation cut before its last model message.

  Attributes:
    location: `file:line` of the record.
    prompt_ids: The prompt: `<bos>`, the system turn with the tool
      declarations, and the messages before the last model message. It ends
      with the `<|turn>model\\n` that opens the model's turn, or inside the
      model turn when that turn continues after tool results.
    reference: The last model message.
  """

  location: str
  prompt_ids: tuple[int, ...]
  reference: Reference


def _model_message_reference(message: Mapping[str, Any]) -> Reference:
  # The private helpers of `chat` are the rules by which the formatter
  # renders the same message for training, so the reference is what the
  # model was trained to write.
  # pylint: disable=protected-access
  answer = chat_lib.strip_thinking(chat_lib.content_text(message))
  calls = tuple(
      tool_calls_lib.ToolCall(*chat_lib.call_name_and_arguments(call))
      for call in message.get('tool_calls') or ()
  )
  # pylint: enable=protected-access
  return Reference(answer=answer, tool_calls=calls)


def generation_example(
    record: records_lib.Record,
    tokenizer: Tokenizer,
    *,
    thinking: bool = False,
    empty_thought_when_not_thinking: bool = False,
) -> GenerationExample | None:
  """Cut a record before its last model message; None if it has none.

  A prompt/response record becomes a user turn and a reference answer.
  Plain text records and conversations whose last model message has no
  message before it have nothing to answer, so they give None. Messages
  after the last model message are ignored.

  Raises:
    DataFormatError: the record cannot be formatted; the message names its
      file and line.
  """
  data = record.data
  tools = None
  if record.kind == records_lib.PROMPT_RESPONSE:
    messages = [{'role': 'user', 'content': data['prompt']}]
    reference_message = {'role': 'model', 'content': data['response']}
  elif record.kind == records_lib.CHAT:
    all_messages = list(data['messages'])
    model_indices = [
        i for i, m in enumerate(all_messages)
        if m.get('role') in ('model', 'assistant')
    ]
    if not model_indices or model_indices[-1] == 0:
      return None
    messages = all_messages[: model_indices[-1]]
    reference_message = all_messages[model_indices[-1]]
    tools = data.get('tools') or None
  else:
    return None

  try:
    prompt_ids = chat_lib.encode_chat(
        tokenizer,
        messages,
        tools=tools,
        thinking=thinking,
        add_generation_prompt=True,
        empty_thought_when_not_thinking=empty_thought_when_not_thinking,
    )
    reference = _model_message_reference(reference_message)
  except (ValueError, TypeError, KeyError) as error:
    raise records_lib.DataFormatError(
        f'{record.location}: cannot build the prompt and reference of the'
        f' {record.kind} example: {error}'
    ) from error
  return GenerationExample(
      location=record.location, prompt_ids=tuple(prompt_ids), reference=reference
  )


def generation_examples(
    records: Sequence[records_lib.Record],
    tokenizer: Tokenizer,
    *,
    thinking: bool = False,
    empty_thought_when_not_thinking: bool = False,
    max_examples: int | None = None,
) -> list[GenerationExample]:
  """Build the `generation_example` of each record that has one.

  Args:
    records: Records as `records.read_jsonl` returns them.
    tokenizer: The Gemma 4 tokenizer.
    thinking: Switch thinking on in the prompts.
    empty_thought_when_not_thinking: End the generation prompt with an
      empty thought when thinking is off, as the 26B-A4B and 31B templates
      do.
    max_examples: Keep at most this many examples, the first in file order.

  Returns:
    The examples in record order. Skipped records are counted in the log.
  """
  examples = []
  skipped = []
  for record in records:
    if max_examples is not None and len(examples) >= max_examples:
      break
    example = generation_example(
        record,
        tokenizer,
        thinking=thinking,
        empty_thought_when_not_thinking=empty_thought_when_not_thinking,
    )
    if example is None:
      skipped.append(record.location)
    else:
      examples.append(example)
  if skipped:
    logger.warning(
        'skipped %d records with no model message to score (plain text, or'
        ' no message before the last model message), the first at %s',
        len(skipped), skipped[0],
    )
  return examples


# ---------------------------------------------------------------------------
# Generation accuracy.


@dataclasses.dataclass(frozen=True)
class ExampleResult:
  """The score of one generated answer.

  Attributes:
    index: Position of the example in the scored list.
    location: `file:line` of its record.
    expected: The reference.
    got: The parsed output: answer (stripped), thinking and tool calls.
    text: The raw generated text, special tokens and the stop token
      included.
    hit: Whether `got` matches `expected` (see `matches_reference`).
    finish_reason: 'stop' when a stop token ended the answer, 'length' when
      `max_new_tokens` cut it off.
    warnings: The parser's messages about malformed or cut-off parts.
  """

  index: int
  location: str
  expected: Reference
  got: tool_calls_lib.ParsedOutput
  text: str
  hit: bool
  finish_reason: str
  warnings: tuple[str, ...]

  def to_json(self) -> dict[str, Any]:
    return {
        'index': self.index,
        'location': self.location,
        'hit': self.hit,
        'expected': self.expected.to_json(),
        'got': {
            'answer': self.got.answer.strip(),
            'thinking': self.got.thinking,
            'tool_calls': _calls_to_json(self.got.tool_calls),
        },
        'text': self.text,
        'finish_reason': self.finish_reason,
        'warnings': list(self.warnings),
    }


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """Accuracy of greedy answers against their references.

  Attributes:
    accuracy: `num_hits / num_examples`.
    num_examples: Examples scored.
    num_hits: Examples whose answer matches.
    num_tool_call_examples: Examples whose reference has tool calls.
    num_tool_call_hits: Hits among them.
    num_answer_examples: Examples with a plain answer as reference.
    num_answer_hits: Hits among them.
    num_truncated: Answers cut off by `max_new_tokens`.
    examples: One result per example, in the order given.
  """

  accuracy: float
  num_examples: int
  num_hits: int
  num_tool_call_examples: int
  num_tool_call_hits: int
  num_answer_examples: int
  num_answer_hits: int
  num_truncated: int
  examples: tuple[ExampleResult, ...]

  def to_json(self) -> dict[str, Any]:
    """Return the counts as a JSON object, without the per-example results."""
    fields = dataclasses.asdict(self)
    del fields['examples']
    return fields


def _length_sorted_batches(
    lengths: Sequence[int], batch_size: int
) -> list[list[int]]:
  """Group example indices into batches of similar prompt lengths."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generation_accuracy(
    sampler: sampler_lib.Sampler,
    examples: Sequence[GenerationExample],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = False,
) -> GenerationResult:
  """Answer each example greedily and score the answers.

  Prompts run in batches of `batch_size`, grouped by length so that rows
  carry little padding. A last, smaller group is filled with copies of its
  first prompt, so every batch has the same number of rows and reuses the
  compiled steps. Greedy rows do not depend on their batch neighbours, so
  the answers equal those of prompts run one at a time.

  Args:
    sampler: A `Sampler` with a tokenizer. Keep one between calls, setting
      `sampler.params`, so that its compiled steps are reused.
    examples: The prompts and references.
    max_new_tokens: Tokens generated at most per answer.
    batch_size: Prompts per batch.
    progress: Show a tqdm progress bar of the examples on stderr.

  Returns:
    The counts and one `ExampleResult` per example, in the order given.
  """
  if sampler.tokenizer is None:
    raise ValueError('generation_accuracy needs a Sampler with a tokenizer')
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size} must be positive')
  if not examples:
    raise ValueError(
        'no examples to score; give conversations that end with a model'
        ' message'
    )
  stop_ids = set(sampler.default_stop_ids())
  batch_size = min(batch_size, len(examples))

  results: list[ExampleResult | None] = [None] * len(examples)
  batches = _length_sorted_batches(
      [len(e.prompt_ids) for e in examples], batch_size
  )
  with tqdm.tqdm(
      total=len(examples), desc='generation', unit='example',
      disable=not progress,
  ) as bar:
    for indices in batches:
      rows = indices + [indices[0]] * (batch_size - len(indices))
      generation = sampler.generate(
          [list(examples[i].prompt_ids) for i in rows],
          max_new_tokens=max_new_tokens,
      )
      for row, index in enumerate(indices):
        results[index] = _score_example(
            index,
            examples[index],
            tokens=generation.tokens[row],
            text=generation.texts[row],
            stop_ids=stop_ids,
        )
      bar.update(len(indices))

  return _summarise(results)


def _score_example(
    index: int,
    example: GenerationExample,
    *,
    tokens: Sequence[int],
    text: str,
    stop_ids: set[int],
) -> ExampleResult:
  output = tool_calls_lib.parse_model_output(text)
  stopped = bool(tokens) and tokens[-1] in stop_ids
  return ExampleResult(
      index=index,
      location=example.location,
      expected=example.reference,
      got=output,
      text=text,
      hit=matches_reference(example.reference, output),
      finish_reason='stop' if stopped else 'length',
      warnings=tuple(output.warnings),
  )


def _summarise(results: Sequence[ExampleResult]) -> GenerationResult:
  with_calls = [r for r in results if r.expected.tool_calls]
  answers = [r for r in results if not r.expected.tool_calls]
  num_hits = sum(r.hit for r in results)
  return GenerationResult(
      accuracy=num_hits / len(results),
      num_examples=len(results),
      num_hits=num_hits,
      num_tool_call_examples=len(with_calls),
      num_tool_call_hits=sum(r.hit for r in with_calls),
      num_answer_examples=len(answers),
      num_answer_hits=sum(r.hit for r in answers),
      num_truncated=sum(r.finish_reason == 'length' for r in results),
      examples=tuple(results),
  )


def jsonl_generation_accuracy(
    sampler: sampler_lib.Sampler,
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    max_new_tokens: int,
    batch_size: int,
    thinking: bool = False,
    empty_thought_when_not_thinking: bool = False,
    max_examples: int | None = None,
    source: str = 'auto',
    progress: bool = False,
) -> GenerationResult:
  """Compute `generation_accuracy` on the conversations of JSONL files."""
  records = records_lib.read_jsonl(path, source=source)
  examples = generation_examples(
      records,
      sampler.tokenizer,
      thinking=thinking,
      empty_thought_when_not_thinking=empty_thought_when_not_thinking,
      max_examples=max_examples,
  )
  result = generation_accuracy(
      sampler,
      examples,
      max_new_tokens=max_new_tokens,
      batch_size=batch_size,
      progress=progress,
  )
  logger.info(
      'generation accuracy %.3f: %d of %d (tool calls %d of %d, answers %d of'
      ' %d); %d answers cut off at max_new_tokens=%d',
      result.accuracy, result.num_hits, result.num_examples,
      result.num_tool_call_hits, result.num_tool_call_examples,
      result.num_answer_hits, result.num_answer_examples,
      result.num_truncated, max_new_tokens,
  )
  return result
