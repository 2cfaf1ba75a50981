"""The fine-tuning loop: resume after SIGKILL and SIGTERM, metrics, export.

The resume tests run `python -m train.finetune` as a user would, in
subprocesses, and kill them with real signals. The exported model is loaded
with the official `gemma` 4.0.1 loader and run by the official model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import checkpoint
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import lora as lora_lib
from gemma4_jax.training import metrics as metrics_lib
from gemma4_jax.training import trainer
from gemma4_jax.transformer import Transformer
from tests import oracle

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / 'configs' / 'tiny_smoke.py'
TOTAL_STEPS = 160
WORDS = (
    'river stone cloud lamp orbit cedar pixel violet thunder maple harbor'
    ' quartz ember falcon meadow cobalt'
).split()


@pytest.fixture(scope='module')
def small_tokenizer(tmp_path_factory, train_file) -> str:
  """A 400-piece tokenizer with the Gemma 4 special pieces, for fast steps."""
  from gemma4_jax.text.train_tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top

  texts = [json.loads(line)['text'] for line in open(train_file)]
  path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
  return str(train_tokenizer(texts, path, vocab_size=400, digit_pairs=False))


@pytest.fixture(scope='module')
def train_file(tmp_path_factory) -> Path:
  """80 plain-text records of 6 to 30 random words."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('data') / 'train.jsonl'
  with open(path, 'w') as f:
    for _ in range(80):
      words = rng.choice(WORDS, size=rng.integers(6, 30))
      f.write(json.dumps({'text': ' '.join(words)}) + '\n')
  return path


def command(workdir: Path, train_file: Path, tokenizer: str, *extra: str):
  return [
      sys.executable, '-m', 'train.finetune', f'--config={CONFIG}',
      f'--config.workdir={workdir}', f'--config.data.train={train_file}',
      f'--config.tokenizer={tokenizer}',
      f'--config.optimizer.total_steps={TOTAL_STEPS}', *extra,
  ]


def environment() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  env.pop('XLA_FLAGS', None)  # One device, as a user's CPU run has.
  return env


def run_to_end(cmd) -> subprocess.CompletedProcess:
  done = subprocess.run(
      cmd, cwd=REPO, env=environment(), capture_output=True, text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def start_and_signal(cmd, workdir: Path, sig: int) -> subprocess.Popen:
  """Start `cmd`, send `sig` once its first checkpoint is complete."""
  process = subprocess.Popen(
      cmd, cwd=REPO, env=environment(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True,
  )
  first = workdir / 'checkpoints' / '4' / 'commit_success.txt'
  deadline = time.monotonic() + 300
  while not first.exists():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'no checkpoint after 300 s'
    time.sleep(0.005)
  process.send_signal(sig)
  return process


def losses(workdir: Path) -> dict[int, dict[str, float]]:
  """Per-step metrics, without the wall-clock ones."""
  out = {}
  for record in metrics_lib.read_metrics(workdir):
    record = dict(record)
    step = record.pop('step')
    record.pop('tokens_per_second', None)
    out[step] = record
  return out


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory, train_file, small_tokenizer):
  workdir = tmp_path_factory.mktemp('reference')
  run_to_end(command(workdir, train_file, small_tokenizer))
  return workdir


def test_sigkill_resume_matches_uninterrupted(
    tmp_path, train_file, small_tokenizer, reference_run
):
  cmd = command(tmp_path, train_file, small_tokenizer)
  killed = start_and_signal(cmd, tmp_path, signal.SIGKILL)
  killed.wait(timeout=60)
  assert killed.returncode == -signal.SIGKILL
  logged = max(losses(tmp_path))
  assert logged < TOTAL_STEPS, 'the run finished before the kill'

  resumed = run_to_end(cmd)
  assert 'resumed from the checkpoint of step' in resumed.stderr
  restored = int(
      resumed.stderr.split('resumed from the checkpoint of step ')[1].split()[0]
  )
  print(f'killed after step {logged}, resumed from step {restored}')
  assert 4 <= restored <= logged

  expected = losses(reference_run)
  got = losses(tmp_path)
  assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
  for step in range(restored + 1, TOTAL_STEPS + 1):
    assert got[step] == expected[step], f'step {step}'


def test_sigterm_saves_interrupted_step(
    tmp_path, train_file, small_tokenizer, reference_run
):
  cmd = command(tmp_path, train_file, small_tokenizer)
  process = start_and_signal(cmd, tmp_path, signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert 'stopped by SIGTERM' in stdout

  last_logged = max(losses(tmp_path))
  saved = sorted(
      int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
      if p.name.isdigit()
  )
  print(f'SIGTERM stopped the run at step {last_logged}; checkpoints {saved}')
  assert saved[-1] == last_logged
  assert last_logged < TOTAL_STEPS

  run_to_end(cmd)
  expected = losses(reference_run)
  got = losses(tmp_path)
  for step in range(1, TOTAL_STEPS + 1):
    assert got[step] == expected[step], f'step {step}'


def smoke_config(workdir: Path, train_file: Path, tokenizer: str):
  spec = importlib.util.spec_from_file_location('tiny_smoke', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = module.get_config()
  run.workdir = str(workdir)
  run.data.train = str(train_file)
  run.data.eval = str(train_file)
  run.tokenizer = str(tokenizer)
  run.optimizer.total_steps = 6
  return run


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, train_file, small_tokenizer):
  run = smoke_config(tmp_path_factory.mktemp('full'), train_file, small_tokenizer)
  return run, trainer.train(run)


def official_logits(checkpoint_path: Path, cfg, tokens):
  from gemma import gm  # pylint: disable=g-import-not-at-top

  params = gm.ckpts.load_params(str(checkpoint_path))
  official = oracle.official_model(cfg, jnp.float32)
  return official.apply({'params': params}, tokens).logits


def test_export_loads_in_official_gemma(full_run, small_tokenizer):
  run, result = full_run
  assert result.export_path is not None
  assert result.perplexity is not None
  first = metrics_lib.read_metrics(run.workdir)[0]['loss']
  assert result.last_metrics['loss'] < first

  cfg = trainer.model_config(run, Tokenizer(small_tokenizer))
  tokens = jnp.asarray(
      np.random.default_rng(1).integers(1, cfg.vocab_size, (2, 12))
  )
  theirs = official_logits(result.export_path, cfg, tokens)
  ours_params = checkpoint.load_params(result.export_path, config=cfg)
  ours = Transformer(config=cfg, dtype=jnp.float32).apply(
      {'params': ours_params}, tokens
  ).logits
  # On host: the restored parameters may sit on every simulated device.
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  scale = float(np.max(np.abs(theirs)))
  assert float(np.max(np.abs(ours - theirs))) <= 1e-4 * scale


def test_lora_run_exports_merged_model(
    tmp_path, full_run, train_file, small_tokenizer, caplog
):
  base_run, base_result = full_run
  run = smoke_config(tmp_path, train_file, small_tokenizer)
  run.init_checkpoint = str(base_result.export_path)
  run.lora.rank = 4
  run.lora.alpha = 8.0
  with caplog.at_level('INFO'):
    result = trainer.train(run)

  # The optimizer state holds two Adam moments per adapter value only.
  adapters, lora_config = lora_lib.load_adapters(tmp_path / 'export' / 'adapters')
  num_adapter = sum(x.size for x in jax.tree.leaves(adapters))
  logged = [r.message for r in caplog.records if 'optimizer state' in r.message]
  assert logged, 'the optimizer state size is not logged'
  print(logged[0], f'({num_adapter} adapter values)')
  assert f'{2 * num_adapter * 4 / 2**20:.1f} MiB' in logged[0]

  # The merged export, in the official model, equals base + adapters in ours.
  cfg = trainer.model_config(base_run, Tokenizer(small_tokenizer))
  tokens = jnp.asarray(
      np.random.default_rng(2).integers(1, cfg.vocab_size, (2, 12))
  )
  theirs = official_logits(result.export_path, cfg, tokens)
  base = checkpoint.load_params(base_result.export_path, config=cfg)
  adapted = lora_lib.apply_adapters(base, adapters, lora_config, jnp.float32)
  model = Transformer(config=cfg, dtype=jnp.float32)
  ours = model.apply({'params': adapted}, tokens).logits
  unadapted = model.apply({'params': base}, tokens).logits
  # On host: the restored parameters may sit on every simulated device.
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  scale = float(np.max(np.abs(theirs)))
  assert float(np.max(np.abs(ours - theirs))) <= 1e-4 * scale
  assert float(jnp.max(jnp.abs(unadapted - theirs))) > 1e-2 * scale


def test_missing_train_file_is_one_error_line(tmp_path, small_tokenizer):
  done = subprocess.run(
      command(tmp_path, tmp_path / 'absent.jsonl', small_tokenizer),
      cwd=REPO, env=environment(), capture_output=True, text=True, timeout=300,
  )
  assert done.returncode == 1
  errors = [l for l in done.stderr.splitlines() if 'error:' in l]
  assert len(errors) == 1
  assert 'absent.jsonl' in errors[0]


def test_crc32c_check_value():
  # The published CRC-32C check value of the ASCII digits 1-9.
  assert metrics_lib.crc32c(b'123456789') == 0xE3069283


def test_tensorboard_reads_metric_events(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  writer = metrics_lib.MetricWriter(tmp_path)
  for step in range(1, 4):
    writer.write(step, {'loss': 1.0 / step, 'learning_rate': np.float32(1e-3)})
  writer.close()

  accumulator = event_accumulator.EventAccumulator(str(tmp_path / 'tensorboard'))
  accumulator.Reload()
  assert sorted(accumulator.Tags()['scalars']) == ['learning_rate', 'loss']
  loss = accumulator.Scalars('loss')
  assert [e.step for e in loss] == [1, 2, 3]
  np.testing.assert_allclose([e.value for e in loss], [1.0, 0.5, 1 / 3], rtol=1e-6)


def test_resumed_writer_drops_later_records(tmp_path):
  writer = metrics_lib.MetricWriter(tmp_path)
  for step in range(1, 7):
    writer.write(step, {'loss': float(step)})
  writer.close()
  writer = metrics_lib.MetricWriter(tmp_path, resume_step=4)
  writer.write(5, {'loss': 50.0})
  writer.close()
  records = metrics_lib.read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  assert records[-1]['loss'] == 50.0
