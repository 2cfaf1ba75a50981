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


def _run_generation_command(args: argparse.Namespace) -> int:
  # Imported here so that `gemma4-jax --help` does not wait for JAX.
  from gemma4_jax import generation_cli

  try:
    if args.command == 'generate':
      return generation_cli.run_generate(args)
    return generation_cli.run_chat(args)
  except generation_cli.CommandError as error:
    print(f'gemma4-jax {args.command}: error: {error}', file=sys.stderr)
    return error.exit_code


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
  """Flags shared by `generate` and `chat`: model, tokenizer, sampling."""
  parser.add_argument(
      '--ckpt',
      required=True,
      help=(
          'Orbax checkpoint directory, or a directory that contains one'
          ' (such as a Kaggle download)'
      ),
  )
  parser.add_argument(
      '--tokenizer',
      default=None,
      help=(
          'SentencePiece tokenizer.model (default: the one in or beside the'
          ' checkpoint; `gemma4-jax fetch-tokenizer` downloads it)'
      ),
  )
  parser.add_argument(
      '--model',
      default=None,
      help=(
          'preset name (e2b, e4b, 26b_a4b, 31b) or a .json file of'
          ' Gemma4Config fields for a custom model (default: detected from'
          ' the checkpoint shapes)'
      ),
  )

  parser.add_argument(
      '--dtype',
      choices=('bfloat16', 'float32'),
      default='bfloat16',
      help='dtype of the parameters and activations (default: bfloat16)',
  )
  parser.add_argument(
      '--system', default=None, help='system prompt of the conversation'
  )
  parser.add_argument(
      '--thinking',
      action='store_true',
      help='let the model think before answering (adds <|think|>)',
  )
  parser.add_argument(
      '--show-thinking',
      action='store_true',
      help='print the thought channel too (hidden by default)',
  )

  parser.add_argument(
      '--max-new-tokens',
      type=_positive_int,
      default=256,
      help='tokens generated at most per answer (default: 256)',
  )
  parser.add_argument(
      '--temperature',
      type=float,
      default=0.0,
      help='sampling temperature; 0 picks the most likely token (default: 0)',
  )
  parser.add_argument(
      '--top-k',
      type=int,
      default=None,
      help='sample among the K most likely tokens (default: all)',
  )
  parser.add_argument(
      '--top-p',
      type=float,
      default=None,
      help=(
          'sample among the most likely tokens whose probabilities sum to P'
          ' (default: all)'
      ),
  )
  parser.add_argument(
      '--seed', type=int, default=0, help='seed of the sampling (default: 0)'
  )

  parser.add_argument(
      '--image',
      action='append',
      default=None,
      metavar='PATH',
      help=(
          'an image file to show the model; repeat the flag for several.'
          ' Each goes where the prompt has a <|image|> mark, or, without'
          ' marks, before the prompt text. `generate` shows the images with'
          ' every prompt, `chat` with the first message of each conversation'
      ),
  )
  parser.add_argument(
      '--audio',
      action='append',
      default=None,
      metavar='PATH',
      help=(
          'an audio file (WAV, FLAC, OGG; at most 30 s) for the model to hear'
          ' (E2B and E4B only); repeat the flag for several. Each goes where'
          ' the prompt has a <|audio|> mark, or, without marks, before the'
          ' prompt text (after any images), with the same rules as --image'
      ),
  )
  parser.add_argument(
      '--image-budget',
      type=int,
      choices=(70, 140, 280, 560, 1120),
      default=280,
      help=(
          'soft tokens per image at most; more keeps more detail (default:'
          ' 280)'
      ),
  )


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{value} is not a positive integer')
  return value


def _add_generate(subparsers) -> None:
  parser = subparsers.add_parser(
      'generate',
      help='generate answers to prompts, all in one batch',
      description=(
          'Generate an answer to each prompt. Prompts run as one batch. Each'
          ' is sent as a user turn in the Gemma 4 chat format unless --raw is'
          ' given. Answers are printed with the thought channel hidden and'
          ' tool calls shown as name(arguments), or written as JSONL records'
          ' with --output.'
      ),
  )
  _add_model_arguments(parser)
  prompts = parser.add_mutually_exclusive_group(required=True)
  prompts.add_argument(
      '--prompt',
      action='append',
      help='a prompt; repeat the flag for several prompts',
  )
  prompts.add_argument(
      '--prompts-file',
      default=None,
      help=(
          'file of prompts: one per line, or JSONL records with a "prompt"'
          ' field'
      ),
  )
  parser.add_argument(
      '--output',
      default=None,
      help=(
          'write one JSONL record per prompt (prompt, text, answer, thinking,'
          ' tool_calls, num_tokens, prompt_tokens, finish_reason, tokens)'
          ' instead of printing'
      ),
  )
  parser.add_argument(
      '--raw',
      action='store_true',
      help='send each prompt as plain text after <bos>, without the chat format',
  )
  parser.add_argument(
      '--cache-length',
      type=_positive_int,
      default=None,
      help=(
          'KV cache positions per prompt (default: the longest prompt plus'
          ' --max-new-tokens)'
      ),
  )
  parser.set_defaults(handler=_run_generation_command)


def _add_chat(subparsers) -> None:
  parser = subparsers.add_parser(
      'chat',
      help='chat with a model, reading messages from stdin',
      description=(
          'Read one message per line from stdin and stream each answer. The'
          ' conversation stays in the KV cache, so a turn feeds only its own'
          ' text. /reset starts a new conversation; /exit or end of input'
          ' quits. Tools are off.'
      ),
  )
  _add_model_arguments(parser)
  parser.add_argument(
      '--cache-length',
      type=_positive_int,
      default=4096,
      help=(
          'KV cache positions of the whole conversation (default: 4096);'
          ' /reset frees them'
      ),
  )
  parser.set_defaults(handler=_run_generation_command)


def _run_plan(args: argparse.Namespace) -> int:
  # Imported here so that `gemma4-jax --help` does not wait for JAX.
  from gemma4_jax.parallel import plan as plan_lib

  try:
    plan = plan_lib.plan_memory(
        args.model,
        args.mesh,
        batch=args.batch,
        length=args.length,
        lora_rank=args.lora,
        remat=args.remat,
        dtype=args.dtype,
        num_microbatches=args.microbatches,
        chip=args.chip,
    )
  except ValueError as error:
    print(f'gemma4-jax plan: error: {error}', file=sys.stderr)
    return 1
  print(plan_lib.format_plan(plan))
  return 0


def _add_plan(subparsers) -> None:
  parser = subparsers.add_parser(
      'plan',
      help='estimate per-device memory of a sharded train step',
      description=(
          'Print the per-device bytes of parameters, optimizer state,'
          ' gradients, activations and the KV cache of a train step on a'
          ' mesh, and whether they fit the memory of a chip. Builds no'
          ' model and needs no accelerator; activations are an estimate.'
      ),
  )
  parser.add_argument(
      '--model', required=True, help='preset name: e2b, e4b, 26b_a4b or 31b'
  )
  parser.add_argument(
      '--mesh',
      required=True,
      help=(
          'mesh axis sizes, such as tensor=8,fsdp=4 (axes: data, fsdp,'
          ' expert, tensor); their product is the number of chips'
      ),
  )
  parser.add_argument(
      '--batch', type=int, required=True, help='global rows per step'
  )
  parser.add_argument(
      '--length', type=int, required=True,
      help='tokens per row, also the KV cache length',
  )
  parser.add_argument(
      '--lora',
      type=int,
      nargs='?',
      const=16,
      default=None,
      metavar='RANK',
      help='plan LoRA fine-tuning with adapters of this rank (default 16)'
      ' instead of full fine-tuning',
  )
  parser.add_argument(
      '--remat',
      default='none',
      help=(
          'what the backward pass recomputes: none, dots (keep weight'
          ' matmul outputs) or full (keep block inputs only); default none'
      ),
  )
  parser.add_argument(
      '--chip',
      default=None,
      help='check the plan against one chip: v5e, v5p, v6e, h100 or h200',
  )
  parser.add_argument(
      '--dtype',
      default='bfloat16',
      help=(
          'compute dtype, bfloat16 or float32 (default bfloat16). Master'
          ' parameters and AdamW moments are float32 either way'
      ),
  )
  parser.add_argument(
      '--microbatches',
      type=int,
      default=1,
      help='micro-batches per step, run one after another (default 1)',
  )
  parser.set_defaults(handler=_run_plan)


_SUBCOMMANDS = (
    _add_inspect, _add_fetch_tokenizer, _add_generate, _add_chat, _add_plan
)


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
