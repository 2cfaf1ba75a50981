"""`gemma4-jax inspect` reports layout, variant and parameter counts.

Expected counts are computed here from the official parameter tree (built by
`jax.eval_shape` of the `gemma` 4.0.1 model) and grouped by the rules that
`param_group` documents. The official saver and converters write the
checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

from flax import traverse_util
from gemma import gm
from gemma.gm.ckpts import _checkpoint as official_ckpt
from gemma.gm.nn import _transformer as official_gemma3
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gemma4_jax import cli
from gemma4_jax import config as config_lib
from gemma4_jax.checkpoint import inspect as inspect_lib
from tests import oracle

_TOKENS = jnp.ones((1, 4), jnp.int32)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def _abstract(name: str):
  model = oracle.official_model(oracle.SMALL_CONFIGS[name])
  return jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']


def _random_params(name: str, dtype=jnp.bfloat16):
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), dtype),
      _abstract(name),
  )


def _save_official(name: str, path, layout: str, params=None):
  params = _random_params(name) if params is None else params
  if layout == 'nested':
    gm.ckpts.save_params(params, path, wait_until_finished=True)
    return path
  if layout == 'flat':
    tree = official_ckpt._nested_to_flat(params)
  else:
    pattern_len = len(oracle.SMALL_CONFIGS[name].attention_pattern)
    tree = official_ckpt._nested_to_stacked(params, pattern_len)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  return path


def _expected_group(path: str) -> str:
  """Group of an official NESTED key, by the rules `param_group` documents."""
  parts = path.split('/')
  if parts[0] == 'vision_encoder' or parts[1:2] and parts[1].startswith('mm_'):
    return 'vision'
  if parts[0] == 'audio_encoder' or parts[1:2] and parts[1].startswith('audio_'):
    return 'audio'
  if parts[-1] == 'skip_scale' or parts[-2].endswith('_norm'):
    return 'norms'
  table = {
      'embedder/input_embedding': 'embedding',
      'embedder/per_layer_embeddings': 'ple',
      'embedder/per_layer_model_projection/w': 'ple_projection',
  }
  if path in table:
    return table[path]
  sub = '/'.join(parts[1:])
  if sub.startswith(('per_layer_input_gate/', 'per_layer_projection/')):
    return 'ple_projection'
  if sub.startswith('attn/'):
    return 'attention'
  if sub.startswith('mlp2/') or sub in ('mlp/gating_einsum', 'mlp/linear'):
    return 'mlp'
  if sub.startswith(('mlp/router_logits/', 'mlp/router_scale')):
    return 'router'
  if sub.startswith(('mlp/gating_einsum/', 'mlp/linear/', 'mlp/per_expert_scale')):
    return 'experts'
  return 'other'


def _expected_counts(params) -> dict[str, dict[str, int]]:
  counts: dict[str, dict[str, int]] = {}
  for path, leaf in traverse_util.flatten_dict(params, sep='/').items():
    group = counts.setdefault(_expected_group(path), {'params': 0, 'bytes': 0})
    group['params'] += math.prod(leaf.shape)
    group['bytes'] += math.prod(leaf.shape) * leaf.dtype.itemsize
  return counts


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=_REPO_ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'gemma4_jax.cli', *args],
      capture_output=True,
      text=True,
      env=env,
      timeout=120,
      check=False,
  )


def _group_counts(report) -> dict[str, dict[str, int]]:
  return {
      name: {'params': group['params'], 'bytes': group['bytes']}
      for name, group in report['groups'].items()
  }


# --------------------------------------------------------- the real command


@pytest.mark.parametrize('layout', ['nested', 'flat', 'stacked'])
def test_inspect_json_counts_moe(tmp_path, layout):
  path = _save_official('26b_a4b_like', tmp_path / 'ckpt', layout)
  result = _run_cli('inspect', str(path), '--json')
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)

  params = _random_params('26b_a4b_like')
  assert report['layout'] == layout
  assert report['variant'] == 'custom'
  assert _group_counts(report) == _expected_counts(params)
  assert set(report['groups']) >= {'experts', 'router', 'mlp'}
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
  assert report['total']['params'] == total
  assert report['groups']['experts']['dtypes'] == ['bfloat16']


def test_inspect_text_output(tmp_path):
  path = _save_official('26b_a4b_like', tmp_path / 'ckpt', 'stacked')
  result = _run_cli('inspect', str(path))
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  pattern_len = len(oracle.MOE_LIKE.attention_pattern)
  assert f'layout        stacked (attention pattern length {pattern_len})' in lines
  assert 'variant       custom' in lines
  expected = _expected_counts(_random_params('26b_a4b_like'))
  experts_line = next(line for line in lines if line.startswith('MoE experts'))
  assert f'{expected["experts"]["params"]:,}' in experts_line
  total = sum(group['params'] for group in expected.values())
  total_line = next(line for line in lines if line.startswith('total'))
  assert f'{total:,}' in total_line


def test_inspect_missing_path_fails(tmp_path):
  result = _run_cli('inspect', str(tmp_path / 'absent'))
  assert result.returncode == 1
  assert str(tmp_path / 'absent') in result.stderr
  assert 'check the path' in result.stderr


# ---------------------------------------- the same command, run in-process


# E2B-style wider KV-shared MLPs cannot be stacked, so e2b_like has no
# STACKED case.
@pytest.mark.parametrize(
    'name, layout',
    [
        ('e2b_like', 'nested'),
        ('e2b_like', 'flat'),
        ('e4b_like', 'nested'),
        ('e4b_like', 'stacked'),
        ('31b_like', 'flat'),
        ('31b_like', 'stacked'),
    ],
)
def test_inspect_counts_dense_families(tmp_path, capsys, name, layout):
  path = _save_official(name, tmp_path / 'ckpt', layout)
  assert cli.main(['inspect', str(path), '--json']) == 0
  report = json.loads(capsys.readouterr().out)

  assert report['layout'] == layout
  assert _group_counts(report) == _expected_counts(_random_params(name))
  inferred = report['inferred']
  cfg = oracle.SMALL_CONFIGS[name]
  assert inferred['embed_dim'] == cfg.embed_dim
  assert inferred['num_layers'] == cfg.num_layers
  assert inferred['per_layer_input_dim'] == cfg.per_layer_input_dim
  assert inferred['attention_pattern'] == [k.value for k in cfg.attention_pattern]


def test_inspect_reports_kaggle_tokenizer(tmp_path, capsys):
  _save_official('31b_like', tmp_path / 'download' / 'ckpt', 'nested')
  (tmp_path / 'download' / 'tokenizer.model').write_bytes(b'stub')
  assert cli.main(['inspect', str(tmp_path / 'download'), '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['orbax_dir'] == str(tmp_path / 'download' / 'ckpt')
  assert report['tokenizer'] == str(tmp_path / 'download' / 'tokenizer.model')


def test_inspect_reads_no_array_data(tmp_path, capsys):
  # Without OCDBT each array's data chunks are separate files next to its
  # zarr header; with every chunk deleted only metadata is left to read.
  params = _random_params('e4b_like')
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
  ocp.Checkpointer(handler).save(tmp_path / 'ckpt', args=ocp.args.PyTreeSave(params))
  for root, _, names in os.walk(tmp_path / 'ckpt'):
    for name in names:
      if root != str(tmp_path / 'ckpt') and not name.startswith('.'):
        os.remove(os.path.join(root, name))

  assert cli.main(['inspect', str(tmp_path / 'ckpt'), '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  assert _group_counts(report) == _expected_counts(params)


def test_inspect_multimodal_groups(tmp_path, capsys):
  # A synthetic multimodal tree: a small text tree plus fake towers under
  # the official names, with float32 towers as in the release.
  params = _random_params('31b_like')
  params['vision_encoder'] = {'entry': {'input_projection': {'w': jnp.ones((12, 16))}}}
  params['embedder']['mm_input_projection'] = {'w': jnp.ones((16, 64))}
  params['audio_encoder'] = {'feature': {'kernel': jnp.ones((8, 16))}}
  _save_official('31b_like', tmp_path / 'ckpt', 'flat', params=params)

  assert cli.main(['inspect', str(tmp_path / 'ckpt'), '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  assert _group_counts(report) == _expected_counts(params)
  assert report['groups']['vision']['dtypes'] == ['float32']
  text_params = sum(
      count['params']
      for group, count in _expected_counts(params).items()
      if group not in ('vision', 'audio')
  )
  assert report['text_total']['params'] == text_params


def test_inspect_gemma3_is_unknown(tmp_path, capsys):
  # A Gemma 3 text model at toy size, from the official Gemma 3 classes.
  base = gm.nn.Gemma3_270M.config
  small = dataclasses.replace(
      base, num_embed=512, embed_dim=64, hidden_dim=128, num_heads=2,
      head_dim=16, attention_types=base.attention_types[:2],
  )
  abstract = jax.eval_shape(
      official_gemma3.Transformer(config=small).init, jax.random.key(0), _TOKENS
  )['params']
  params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract)
  gm.ckpts.save_params(params, tmp_path / 'ckpt', wait_until_finished=True)

  assert cli.main(['inspect', str(tmp_path / 'ckpt'), '--json']) == 0
  report = json.loads(capsys.readouterr().out)
  assert report['variant'] == 'unknown'
  assert 'Gemma 3' in report['variant_note']


# ----------------------------------------------------- released-size trees


@pytest.mark.parametrize('name', tuple(config_lib.PRESETS))
def test_summary_of_released_tree(name):
  model = oracle.official_preset_model(name)
  abstract = jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']
  start = time.perf_counter()
  summary = inspect_lib.summarize_tree(official_ckpt._nested_to_flat(abstract))
  elapsed = time.perf_counter() - start

  assert summary.variant == name
  assert summary.layout == 'flat'
  expected = _expected_counts(abstract)
  assert {k: v.params for k, v in summary.groups.items()} == {
      k: v['params'] for k, v in expected.items()
  }
  # Works from shapes alone: a 30 B-parameter tree takes well under a second.
  assert elapsed < 5.0


def test_summary_of_e2b_matches_published_groups():
  model = oracle.official_preset_model('e2b')
  abstract = jax.eval_shape(model.init, jax.random.key(0), _TOKENS)['params']
  summary = inspect_lib.summarize_tree(abstract)
  # Published for E2B: 4.65 B text parameters, of which the per-layer
  # embedding table is 2.35 B and the token embedding 0.40 B.
  assert round(summary.text_total.params / 1e9, 2) == 4.65
  assert round(summary.groups['ple'].params / 1e9, 2) == 2.35
  assert round(summary.groups['embedding'].params / 1e9, 2) == 0.40
