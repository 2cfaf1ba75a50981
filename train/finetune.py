"""Fine-tune a Gemma 4 model; rerunning the same command resumes.

    python -m train.finetune --config=configs/e2b_lora.py \\
        --config.workdir=/tmp/run --config.data.train=train.jsonl \\
        --config.init_checkpoint=/path/to/gemma-4-e2b/checkpoint

See `gemma4_jax.training.run_config` for every field and
`gemma4_jax.training.trainer` for what a run does. The process exits with
status 0 when the run is complete or was stopped by SIGTERM after saving a
checkpoint, and 1 with one error line on a configuration or data error.
"""

from __future__ import annotations

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from gemma4_jax.checkpoint import CheckpointError
from gemma4_jax.text.tokenizer import TokenizerError
from gemma4_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Run configuration file (configs/*.py).', lock_config=True
)


def _setup_logging() -> None:
  logging.getLogger().setLevel(logging.INFO)
  # Orbax logs each save at INFO through absl; keep its warnings only.
  for name in ('absl', 'orbax'):
    logging.getLogger(name).setLevel(logging.WARNING)


def _call_text(call) -> str:
  arguments = ', '.join(f'{k}={v!r}' for k, v in call.arguments.items())
  return f'{call.name}({arguments})'


def show_conversations(generation, eval_path: str, count: int) -> None:
  """Print the request, the raw answer and the parsed calls of a few examples."""
  from gemma4_jax.training import records as records_lib  # pylint: disable=g-import-not-at-top

  requests = {}
  for record in records_lib.read_jsonl(eval_path):
    users = [
        m for m in record.data.get('messages', []) if m.get('role') == 'user'
    ]
    if users:
      requests[record.location] = users[-1].get('content')
  for example in generation.examples[:count]:
    print(f'\nuser:   {requests.get(example.location, "?")}')
    print(f'model:  {example.text!r}')
    got = [_call_text(c) for c in example.got.tool_calls]
    if got:
      print(f'parsed: {"; ".join(got)}')
    else:
      print(f'answer: {example.got.answer.strip()!r}')
    if not example.hit:
      expected = [_call_text(c) for c in example.expected.tool_calls]
      print(f'MISS, expected: {"; ".join(expected) or example.expected.answer!r}')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _setup_logging()
  run = _CONFIG.value
  try:
    if run.demo:
      from gemma4_jax import demo_data  # pylint: disable=g-import-not-at-top

      run = demo_data.prepare_run(run)
    result = trainer.train(run)
  except (ValueError, FileNotFoundError, CheckpointError, TokenizerError) as error:
    print(f'train.finetune: error: {error}', file=sys.stderr)
    return 1
  if result.preempted:
    print(
        f'stopped by SIGTERM at step {result.last_step}; the checkpoint is'
        f' saved and the same command resumes from it'
    )
    return 0
  print(f'finished step {result.last_step} in {result.workdir}')
  if result.export_path:
    print(f'exported model: {result.export_path}')
  if result.perplexity:
    print(f'held-out perplexity: {result.perplexity.perplexity:.3f}')
  if result.generation:
    print(
        f'held-out exact match: {100 * result.generation.accuracy:.1f}%'
        f' ({result.generation.num_hits} of'
        f' {result.generation.num_examples})'
    )
    show_conversations(result.generation, run.data.eval, run.eval.show_examples)
  return 0


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
