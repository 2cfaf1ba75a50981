"""Evaluate a checkpoint on a JSONL file: perplexity and generation accuracy.

    python -m eval.evaluate --ckpt DIR --data valid.jsonl [--perplexity] [--generate]

Prints one JSON line of metrics on stdout. With neither --perplexity nor
--generate, both run. The data file takes the training formats
(`gemma4_jax.training.records`). Perplexity weights tokens as training does.
Generation regenerates the last model message of each conversation greedily
and scores it as `gemma4_jax.evaluation` describes. --output writes one JSONL
record per generated answer (expected, got, raw text, hit).

The checkpoint, --model and --tokenizer are resolved as for
`gemma4-jax generate`. Problems the user can fix print one
`eval.evaluate: error: ...` line and exit with status 1 (2 for flags that do
not fit together).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gemma4_jax import evaluation
from gemma4_jax import generation_cli
from gemma4_jax.checkpoint.errors import CheckpointError
from gemma4_jax.text.tokenizer import MissingSpecialTokenError
from gemma4_jax.training import records as records_lib

_PROG = 'eval.evaluate'


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} is not a positive integer')
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=f'python -m {_PROG}',
      description=(
          'Evaluate a Gemma 4 checkpoint on a JSONL file and print one JSON'
          ' line of metrics.'
      ),
  )
  parser.add_argument(
      '--ckpt',
      required=True,
      help='Orbax checkpoint directory, or a directory that contains one',
  )
  parser.add_argument(
      '--data',
      required=True,
      help=(
          'JSONL file of conversations, {"text": ...} or {"prompt": ...,'
          ' "response": ...} lines; also a directory of *.jsonl or a glob'
      ),
  )
  parser.add_argument(
      '--tokenizer',
      default=None,
      help='SentencePiece tokenizer.model (default: the one beside --ckpt)',
  )
  parser.add_argument(
      '--model',
      default=None,
      help=(
          'preset name (e2b, e4b, 26b_a4b, 31b) or a .json file of'
          ' Gemma4Config fields (default: detected from the checkpoint)'
      ),
  )
  parser.add_argument(
      '--dtype',
      choices=('bfloat16', 'float32'),
      default='bfloat16',
      help='dtype of the parameters and activations (default: bfloat16)',
  )

  parser.add_argument(
      '--perplexity', action='store_true', help='compute the perplexity'
  )
  parser.add_argument(
      '--generate',
      action='store_true',
      help='generate the last model message of each conversation and score it',
  )
  parser.add_argument(
      '--batch_size',
      type=_positive_int,
      default=8,
      help='rows per perplexity batch and prompts per generation batch (default: 8)',
  )
  parser.add_argument(
      '--seq_len',
      type=_positive_int,
      default=2048,
      help=(
          'positions per perplexity row; longer examples are truncated'
          ' (default: 2048)'
      ),
  )
  parser.add_argument(
      '--chunk_size',
      type=_positive_int,
      default=evaluation.DEFAULT_CHUNK_SIZE,
      help=(
          'positions per chunk of the perplexity loss (default:'
          f' {evaluation.DEFAULT_CHUNK_SIZE})'
      ),
  )
  parser.add_argument(
      '--max_new_tokens',
      type=_positive_int,
      default=256,
      help='tokens generated at most per answer (default: 256)',
  )
  parser.add_argument(
      '--max_examples',
      type=_positive_int,
      default=None,
      help='score only the first N conversations by generation (default: all)',
  )
  parser.add_argument(
      '--thinking',
      action='store_true',
      help='switch thinking on in the generation prompts',
  )
  parser.add_argument(
      '--output',
      default=None,
      help=(
          'write one JSONL record per generated answer (index, location, hit,'
          ' expected, got, text, finish_reason, warnings)'
      ),
  )
  parser.add_argument(
      '--progress', action='store_true', help='show progress bars on stderr'
  )
  parser.add_argument(
      '-v', '--verbose', action='store_true', help='log at INFO level'
  )
  return parser


def _read_data(data: str) -> list[records_lib.Record]:
  """Read and check the data before any model loads, so errors come fast."""
  path = Path(data)
  if not glob.has_magic(data) and not path.exists():
    raise generation_cli.CommandError(
        f'data file {data} not found; check the --data path'
    )
  try:
    return records_lib.read_jsonl(data)
  except FileNotFoundError as error:
    raise generation_cli.CommandError(f'--data {data}: {error}') from error


def run(args: argparse.Namespace) -> int:
  """Evaluate as the flags ask and print the metrics; return the exit status."""
  run_perplexity = args.perplexity or not args.generate
  run_generation = args.generate or not args.perplexity
  if args.output is not None and not run_generation:
    raise generation_cli.CommandError(
        '--output writes the generated answers, but --perplexity alone'
        ' generates none; add --generate or drop --output',
        generation_cli.EXIT_USAGE,
    )

  records = _read_data(args.data)
  source = generation_cli.resolve_source(args)
  examples = []
  if run_generation:
    empty_thought = generation_cli.uses_empty_thought(source.config, args.thinking)
    examples = evaluation.generation_examples(
        records,
        source.tokenizer,
        thinking=args.thinking,
        empty_thought_when_not_thinking=empty_thought,
        max_examples=args.max_examples,
    )
    if not examples:
      raise generation_cli.CommandError(
          f'--data {args.data} has no conversation that ends with a model'
          ' message, so there is nothing to generate; drop --generate or add'
          ' such conversations'
      )

  loaded = generation_cli.load_model(source, args.dtype)
  sampler = loaded.sampler
  metrics = {'data': args.data}
  if run_perplexity:
    result = evaluation.jsonl_perplexity(
        sampler.model,
        sampler.params,
        args.data,
        loaded.tokenizer,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        progress=args.progress,
    )
    metrics['perplexity'] = result.to_json()
  if run_generation:
    generation = evaluation.generation_accuracy(
        sampler,
        examples,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=args.progress,
    )
    metrics['generation'] = generation.to_json()
    if args.output is not None:
      _write_results(Path(args.output), generation)

  print(json.dumps(metrics))
  return 0


def _write_results(path: Path, result: evaluation.GenerationResult) -> None:
  try:
    with path.open('w', encoding='utf-8') as file:
      for example in result.examples:
        file.write(json.dumps(example.to_json(), ensure_ascii=False) + '\n')
  except OSError as error:
    raise generation_cli.CommandError(
        f'cannot write --output {path}: {error.strerror}; check the directory'
    ) from error
  logging.info('wrote %d records to %s', len(result.examples), path)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(
      level=logging.INFO if args.verbose else logging.WARNING,
      format='%(levelname)s %(name)s: %(message)s',
  )
  try:
    return run(args)
  except generation_cli.CommandError as error:
    print(f'{_PROG}: error: {error}', file=sys.stderr)
    return error.exit_code
  except (
      CheckpointError,
      FileNotFoundError,
      records_lib.DataFormatError,
      MissingSpecialTokenError,
  ) as error:
    print(f'{_PROG}: error: {error}', file=sys.stderr)
    return generation_cli.EXIT_FAILURE


if __name__ == '__main__':
  sys.exit(main())
