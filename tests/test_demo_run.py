"""The tool-calling demo command, shrunk to a few steps.

Runs `python -m train.finetune --config=configs/tool_calling_demo.py` as the
README does, with fewer examples, steps and evaluations, then loads the
exported model with the official `gemma` 4.0.1 loader and checks that the
official model gives our logits. The full-size run (accuracy and time) is
recorded in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gemma4_jax import checkpoint
from gemma4_jax import generation_cli
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import trainer
from gemma4_jax.transformer import Transformer
from tests import oracle

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / 'configs' / 'tool_calling_demo.py'


def test_demo_command_runs_and_exports(tmp_path):
  workdir = tmp_path / 'demo'
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  env.pop('XLA_FLAGS', None)  # One device, as a user's CPU run has.
  done = subprocess.run(
      [
          sys.executable, '-m', 'train.finetune', f'--config={CONFIG}',
          f'--config.workdir={workdir}',
          '--config.demo_data.num_train=400',
          '--config.demo_data.num_heldout=6',
          '--config.demo_data.vocab_size=600',
          '--config.optimizer.total_steps=4',
          '--config.optimizer.warmup_steps=1',
          '--config.data.batch_size=2',
          '--config.eval.generation_examples=6',
          '--config.eval.batch_size=3',
          '--config.eval.max_new_tokens=8',
      ],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'held-out exact match:' in done.stdout, done.stdout
  assert ' of 6)' in done.stdout, done.stdout

  data_dir = workdir / 'data'
  assert sorted(p.name for p in data_dir.iterdir()) == [
      'demo_options.json', 'heldout.jsonl', 'tokenizer.model', 'train.jsonl',
  ]
  export = workdir / 'export'
  assert (export / 'tokenizer.model').read_bytes() == (data_dir / 'tokenizer.model').read_bytes()

  run = ml_collections.ConfigDict(json.loads((workdir / 'run.json').read_text())['run_config'])
  cfg = trainer.model_config(run, Tokenizer(str(data_dir / 'tokenizer.model')))
  assert cfg.vocab_size == 600
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)))

  from gemma import gm  # pylint: disable=g-import-not-at-top

  official_params = gm.ckpts.load_params(str(export / 'checkpoint'))
  theirs = oracle.official_model(cfg, jnp.float32).apply({'params': official_params}, tokens).logits
  ours_params = checkpoint.load_params(export / 'checkpoint', config=cfg)
  ours = Transformer(config=cfg, dtype=jnp.float32).apply({'params': ours_params}, tokens).logits
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == (2, 12, 600)
  assert np.max(np.abs(ours - theirs)) <= 1e-5 * np.max(np.abs(theirs))

  # The export carries its config, so the generation tools need no --model.
  assert generation_cli.resolve_config(None, export / 'checkpoint') == cfg
  scored = [json.loads(line) for line in (workdir / 'generation.jsonl').read_text().splitlines()]
  assert len(scored) == 6
  assert all(set(line) >= {'expected', 'got', 'text', 'hit'} for line in scored)
  done = subprocess.run(
      [
          sys.executable, '-m', 'eval.evaluate', f'--ckpt={export / "checkpoint"}',
          f'--data={data_dir / "heldout.jsonl"}', '--perplexity',
      ],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'perplexity' in json.loads(done.stdout.strip().splitlines()[-1])


def test_scale_query_norms_scales_only_query_norms():
  cfg = oracle.SMALL_CONFIGS['e2b_like']
  params = Transformer(config=cfg, dtype=jnp.float32).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
  scaled = trainer.scale_query_norms(params)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  scaled_flat = dict(jax.tree_util.tree_flatten_with_path(scaled)[0])
  num_scaled = 0
  for path, value in flat.items():
    names = [entry.key for entry in path]
    if names[-2:] == ['query_norm', 'scale']:
      num_scaled += 1
      np.testing.assert_allclose(scaled_flat[path], value * value.shape[-1] ** -0.5)
    else:
      np.testing.assert_array_equal(scaled_flat[path], value)
  assert num_scaled == cfg.num_layers
