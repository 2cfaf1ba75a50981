"""The `gemma4-jax` command.

A thin dispatcher: each subcommand parses its arguments here and calls the
library. Add a subcommand by writing an `_add_<name>` function that registers
its parser and handler, and listing it in `_SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _run_inspect(args: argparse.Namespace) -> int:
  # Imported here so that `gemma4-jax --help` does not wait for JAX.
  from gemma4_jax.checkpoint import inspect as inspect_lib

  summary = inspect_lib.inspect_checkpoint(args.checkpoint)
  if args.json:
    print(json.dumps(summary.to_json(), indent=2))
  else:
    print(inspect_lib.format_summary(summary))
  return 0


def _add_inspect(subparsers) -> None:
  parser = subparsers.add_parser(
      'inspect',
      help='describe a checkpoint from its metadata, without loading arrays',
      description=(
          'Print the layout, the detected model variant, and the parameter'
          ' count, bytes and dtypes of each parameter group of a checkpoint.'
          ' Reads only the Orbax metadata. The groups are the token'
          ' embedding, the per-layer embedding table, the per-layer'
          ' projections, attention, the dense MLP (for MoE models the'
          ' always-on mlp2 branch), MoE experts, the MoE router, norms and'
          ' scales, vision and audio.'
      ),
  )
  parser.add_argument(
      'checkpoint',
      help='Orbax checkpoint directory, or a directory that contains one',
  )
  parser.add_argument(
      '--json', action='store_true', help='print the summary as JSON'
  )
  parser.set_defaults(handler=_run_inspect)


def _run_fetch_tokenizer(args: argparse.Namespace) -> int:
  from gemma4_jax.text import fetch

  try:
    path = fetch.fetch_tokenizer(args.cache_dir)
  except fetch.TokenizerFetchError as error:
    print(f'gemma4-jax fetch-tokenizer: error: {error}', file=sys.stderr)
    return 1
  print(path)
  return 0


def _add_fetch_tokenizer(subparsers) -> None:
  parser = subparsers.add_parser(
      'fetch-tokenizer',
      help='download the Gemma 4 tokenizer into the local cache',
      description=(
          'Download the maxtext 0.2.5 wheel with pip, take the Gemma 4'
          ' tokenizer out of it, check its sha256, cache it and print its'
          ' path. A cached file with the right checksum is reused.'
      ),
  )
  parser.add_argument(
      '--cache-dir',
      default=None,
      help=(
          'directory of the cached tokenizer (default: $GEMMA4_JAX_CACHE,'
          ' else ~/.cache/gemma4_jax)'
      ),
  )
  parser.set_defaults(handler=_run_fetch_tokenizer)


_SUBCOMMANDS = (_add_inspect, _add_fetch_tokenizer)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='gemma4-jax', description='Gemma 4 models in JAX.'
  )
  parser.add_argument(
      '-v', '--verbose', action='store_true', help='log at INFO level'
  )
  subparsers = parser.add_subparsers(dest='command', required=True)
  for add_subcommand in _SUBCOMMANDS:
    add_subcommand(subparsers)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Run the command line; return the process exit status."""
  args = build_parser().parse_args(argv)
  logging.basicConfig(
      level=logging.INFO if args.verbose else logging.WARNING,
      format='%(levelname)s %(name)s: %(message)s',
  )

  from gemma4_jax.checkpoint.errors import CheckpointError

  try:
    return args.handler(args)
  except (CheckpointError, FileNotFoundError) as error:
    print(f'gemma4-jax {args.command}: error: {error}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
