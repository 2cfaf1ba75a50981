"""Multi-process fine-tuning: two processes of 4 CPU devices each on localhost.

The run is `python -m train.finetune` as a user starts it on every host of a
pod slice. Two processes connect through a JAX coordinator on 127.0.0.1 and
exchange collectives with gloo. Each reads one data shard and writes its
shards of every checkpoint. They are killed with SIGKILL once the checkpoint
of step 10 is complete, restarted, and must reproduce the per-step losses
of an uninterrupted run of one process with 8 devices and the same mesh.

The settings tests at the end check how each process finds its place in a
run, from explicit settings or a Vertex AI `CLUSTER_SPEC`, without starting
JAX's runtime.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import checkpoint
from gemma4_jax.parallel import distributed
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import metrics as metrics_lib
from gemma4_jax.training import trainer
from gemma4_jax.transformer import Transformer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / 'configs' / 'tiny_smoke.py'
TOTAL_STEPS = 20
CHECKPOINT_STEP = 10
# `fsdp` spans the two processes (devices 0-3 and 4-7), so each process
# keeps, writes and restores only half of every parameter. `tensor` shards
# within a process.
MESH = 'fsdp=2,tensor=4'
# Every JAX process of these tests shares core 0 with the test itself.
PIN = ['taskset', '-c', '0']
# Cross-process collectives (gloo) add partial sums in another order than
# the in-process ones, so float32 results differ in the last bits, and
# training amplifies the differences. With tiny_smoke's 4 layers and its
# learning rate of 1e-3, the losses of the two runs drifted apart by up to
# 5e-3 (relative) within 20 steps. With the 2 layers and the learning rate
# below, the losses stayed within 1.5e-7 and the gradient norms within
# 1.5e-5 (CPU, JAX 0.12). The bounds leave a margin of about 60.
LEARNING_RATE = 1e-4
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-3
PERPLEXITY_RTOL = 1e-4
# The exported float32 parameters of the two runs differed by at most
# 7.9e-6 (CPU, JAX 0.12).
EXPORT_ATOL = 1e-4
# tiny_smoke with 2 layers instead of 4, which halves the compile times.
MODEL_OVERRIDES = {'num_layers': 2, 'num_kv_shared_layers': 0}
WORDS = (
    'north south amber glass willow copper signal harbor lantern pepper'
    ' canyon velvet prism tundra saffron meadow'
).split()


@pytest.fixture(scope='module')
def train_file(tmp_path_factory) -> Path:
  """64 plain-text records of 5 to 25 random words."""
  rng = np.random.default_rng(3)
  path = tmp_path_factory.mktemp('data') / 'train.jsonl'
  with open(path, 'w') as file:
    for _ in range(64):
      words = rng.choice(WORDS, size=rng.integers(5, 25))
      file.write(json.dumps({'text': ' '.join(words)}) + '\n')
  return path


@pytest.fixture(scope='module')
def small_tokenizer(tmp_path_factory, train_file) -> str:
  """A 400-piece tokenizer with the Gemma 4 special pieces, for fast steps."""
  from gemma4_jax.text.train_tokenizer import train_tokenizer  # pylint: disable=g-import-not-at-top

  texts = [json.loads(line)['text'] for line in open(train_file)]
  path = tmp_path_factory.mktemp('tokenizer') / 'tokenizer.model'
  return str(train_tokenizer(texts, path, vocab_size=400, digit_pairs=False))


@pytest.fixture(scope='module')
def init_checkpoint(tmp_path_factory, small_tokenizer) -> Path:
  """Random parameters of the tiny model, where every run starts.

  Each run restores them straight into its shards, which spares every
  process the compile of the random initialisation (about 15 s of CPU).
  """
  spec = importlib.util.spec_from_file_location('tiny_smoke', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  run = module.get_config()
  run.model.overrides.update(MODEL_OVERRIDES)
  cfg = trainer.model_config(run, Tokenizer(small_tokenizer))
  params = Transformer(config=cfg, dtype=jnp.float32).init(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']
  path = tmp_path_factory.mktemp('init') / 'checkpoint'
  return checkpoint.save_params(params, path)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def command(
    workdir: Path, train_file: Path, tokenizer: str, init: Path, *extra: str
):
  return [
      *PIN, sys.executable, '-m', 'train.finetune', f'--config={CONFIG}',
      f'--config.workdir={workdir}', f'--config.data.train={train_file}',
      f'--config.tokenizer={tokenizer}', f'--config.init_checkpoint={init}',
      f'--config.optimizer.total_steps={TOTAL_STEPS}',
      f'--config.checkpoint.every_steps={CHECKPOINT_STEP}',
      f'--config.optimizer.learning_rate={LEARNING_RATE}',
      *(f'--config.model.overrides.{name}={value}'
        for name, value in MODEL_OVERRIDES.items()),
      '--config.data.batch_size=8', '--config.data.num_shards=2',
      f'--config.mesh.shape={MESH}',
      # Perplexity at the end, on the training file.
      f'--config.data.eval={train_file}', '--config.eval.every_steps=0',
      *extra,
  ]


def environment(
    num_devices: int, cache_dir: Path, **variables: str
) -> dict[str, str]:
  """The subprocess environment: `num_devices` CPU devices, a shared cache.

  The resumed processes load the train step that the killed ones compiled
  from the persistent compilation cache.
  """
  env = dict(os.environ)
  env['JAX_COMPILATION_CACHE_DIR'] = str(cache_dir)
  env['PYTHONPATH'] = os.pathsep.join(
      filter(None, [str(REPO), env.get('PYTHONPATH')])
  )
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  for name in (distributed.ADDRESS_VARIABLE, distributed.COUNT_VARIABLE,
               distributed.ID_VARIABLE, distributed.VERTEX_VARIABLE):
    env.pop(name, None)
  env.update(variables)
  return env


class Processes:
  """The two processes of one multi-process invocation, logging to files."""

  def __init__(self, cmd, log_dir: Path, name: str, cache_dir: Path):
    address = f'127.0.0.1:{free_port()}'
    self.logs = [log_dir / f'{name}_process{i}.log' for i in range(2)]
    self.popen = []
    for index, log in enumerate(self.logs):
      env = environment(
          4,
          cache_dir,
          JAX_COORDINATOR_ADDRESS=address,
          JAX_NUM_PROCESSES='2',
          JAX_PROCESS_ID=str(index),
      )
      with open(log, 'w') as file:
        self.popen.append(subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=file, stderr=subprocess.STDOUT,
        ))

  def output(self) -> str:
    return '\n'.join(
        f'--- {log.name} ---\n{log.read_text()[-4000:]}' for log in self.logs
    )

  def check_running(self) -> None:
    for process in self.popen:
      assert process.poll() is None, (
          f'a process exited with status {process.returncode}:\n'
          + self.output()
      )

  def kill(self) -> None:
    for process in reversed(self.popen):
      if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    for process in self.popen:
      process.wait(timeout=60)

  def wait(self, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in self.popen:
      try:
        process.wait(timeout=max(deadline - time.monotonic(), 1))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail(f'no exit after {timeout} s:\n{self.output()}')
      assert process.returncode == 0, self.output()


def per_step(workdir: Path) -> dict[int, dict[str, float]]:
  """Return the metrics of each step, train and evaluation records merged."""
  steps: dict[int, dict[str, float]] = {}
  for record in metrics_lib.read_metrics(workdir):
    steps.setdefault(record['step'], {}).update(record)
  return steps


@pytest.fixture(scope='module')
def reference_run(
    tmp_path_factory, train_file, small_tokenizer, init_checkpoint
) -> Path:
  """The uninterrupted run of one process with 8 devices."""
  workdir = tmp_path_factory.mktemp('one_process')
  cache_dir = tmp_path_factory.mktemp('one_process_cache')
  done = subprocess.run(
      command(
          workdir, train_file, small_tokenizer, init_checkpoint,
          '--cluster=none',
      ),
      cwd=REPO, env=environment(8, cache_dir), capture_output=True,
      text=True, timeout=600,
  )
  assert done.returncode == 0, done.stderr[-4000:]
  (workdir / 'output.txt').write_text(done.stdout)
  return workdir


def held_out_perplexity(output: str) -> float:
  return float(output.split('held-out perplexity: ')[1].split()[0])


def max_difference(first: Path, second: Path) -> float:
  """Return the largest absolute difference of two exported checkpoints."""
  first_params = checkpoint.load_params(first)
  second_params = checkpoint.load_params(second)
  assert jax.tree.structure(first_params) == jax.tree.structure(second_params)
  return max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      for a, b in zip(jax.tree.leaves(first_params),
                      jax.tree.leaves(second_params))
  )


def test_two_processes_resume_and_match_one(
    tmp_path, train_file, small_tokenizer, init_checkpoint, reference_run
):
  workdir = tmp_path / 'run'
  cmd = command(workdir, train_file, small_tokenizer, init_checkpoint)

  # First invocation: SIGKILL both processes once step 10 is committed.
  # Synchronous saves commit step 10 before step 11 starts.
  cache_dir = tmp_path / 'compilation_cache'
  first = Processes(
      cmd + ['--config.checkpoint.async_save=False'], tmp_path, 'killed',
      cache_dir,
  )
  committed = workdir / 'checkpoints' / str(CHECKPOINT_STEP)
  deadline = time.monotonic() + 400
  while not committed.is_dir():
    first.check_running()
    assert time.monotonic() < deadline, (
        'no checkpoint of step 10 after 400 s:\n' + first.output()
    )
    time.sleep(0.005)
  first.kill()
  killed_output = first.output()
  assert [p.returncode for p in first.popen] == [-signal.SIGKILL] * 2, (
      killed_output
  )
  saved = sorted(
      int(p.name) for p in (workdir / 'checkpoints').iterdir()
      if p.name.isdigit()
  )
  assert saved == [CHECKPOINT_STEP], f'checkpoints {saved} after the kill'
  for index in range(2):
    assert f'process {index} reads data shards [{index}] of 2' in (
        first.logs[index].read_text()
    ), killed_output

  # Both processes wrote their own shards of the checkpoint.
  written = {
      path.name: sum(f.stat().st_size for f in path.rglob('*') if f.is_file())
      for path in (committed / 'state').iterdir() if 'process_' in path.name
  }
  print(f'checkpoint {CHECKPOINT_STEP} bytes per process: {written}')
  assert written.get('ocdbt.process_0', 0) > 0, written
  assert written.get('ocdbt.process_1', 0) > 0, written

  # Second invocation: resume from step 10 and run to the end.
  second = Processes(cmd, tmp_path, 'resumed', cache_dir)
  second.wait(timeout=400)
  for log in second.logs:
    assert (
        f'resumed from the checkpoint of step {CHECKPOINT_STEP}'
        in log.read_text()
    ), second.output()

  expected = per_step(reference_run)
  got = per_step(workdir)
  assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
  worst = 0.0
  for step in range(1, TOTAL_STEPS + 1):
    assert got[step]['num_tokens'] == expected[step]['num_tokens'], (
        f'step {step} trained on other batches'
    )
    loss, reference = got[step]['loss'], expected[step]['loss']
    worst = max(worst, abs(loss - reference) / abs(reference))
    assert loss == pytest.approx(reference, rel=LOSS_RTOL), f'step {step}'
    assert got[step]['grad_norm'] == pytest.approx(
        expected[step]['grad_norm'], rel=GRAD_NORM_RTOL
    ), f'step {step}'
  print(f'largest relative loss difference: {worst:.2e}')
  # The run learns: the losses are not all equal by accident.
  assert got[TOTAL_STEPS]['loss'] < got[1]['loss']

  # Both processes evaluate the same held-out perplexity, that of one
  # process, and write their shards of one exported checkpoint.
  reference_output = (reference_run / 'output.txt').read_text()
  for log in second.logs:
    assert held_out_perplexity(log.read_text()) == pytest.approx(
        held_out_perplexity(reference_output), rel=PERPLEXITY_RTOL
    ), second.output()
  difference = max_difference(
      workdir / 'export' / 'checkpoint',
      reference_run / 'export' / 'checkpoint',
  )
  print(f'largest exported parameter difference: {difference:.2e}')
  assert difference <= EXPORT_ATOL


def test_explicit_settings_from_environment():
  settings = distributed.resolve_settings(environ={
      'JAX_COORDINATOR_ADDRESS': '10.0.0.2:8476',
      'JAX_NUM_PROCESSES': '4',
      'JAX_PROCESS_ID': '3',
  })
  assert settings == distributed.ProcessSettings(
      'explicit', '10.0.0.2:8476', 4, 3
  )


def test_explicit_arguments_override_environment():
  settings = distributed.resolve_settings(
      coordinator_address='127.0.0.1:9000', num_processes=2, process_id=0,
      environ={'JAX_COORDINATOR_ADDRESS': '10.0.0.2:8476'},
  )
  assert settings == distributed.ProcessSettings(
      'explicit', '127.0.0.1:9000', 2, 0
  )


@pytest.mark.parametrize('environ, message', [
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.2:8476'},
     'JAX_NUM_PROCESSES, JAX_PROCESS_ID missing'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2',
      'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1'}, 'must be in [0'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0',
      'JAX_COORDINATOR_ADDRESS': '10.0.0.2'}, 'write HOST:PORT'),
    ({'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0',
      'JAX_COORDINATOR_ADDRESS': '10.0.0.2:1'}, "'two' is not an integer"),
])
def test_partial_settings_raise(environ, message):
  with pytest.raises(ValueError) as error:
    distributed.resolve_settings(environ=environ)
  assert message in str(error.value)


def vertex_spec(task_type: str, index: int, workers: int = 2) -> str:
  return json.dumps({
      'cluster': {
          'workerpool0': ['cmle-training-workerpool0-ab-0:2222'],
          'workerpool1': [
              f'cmle-training-workerpool1-ab-{i}:2222' for i in range(workers)
          ],
      },
      'environment': 'cloud',
      'task': {'type': task_type, 'index': index, 'trial': ''},
  })


def test_vertex_replicas_number_primary_first():
  primary = distributed.resolve_settings(
      environ={'CLUSTER_SPEC': vertex_spec('workerpool0', 0)}
  )
  second_worker = distributed.resolve_settings(
      environ={'CLUSTER_SPEC': vertex_spec('workerpool1', 1)}
  )
  assert primary == distributed.ProcessSettings(
      'vertex', 'cmle-training-workerpool0-ab-0:2222', 3, 0
  )
  assert second_worker == distributed.ProcessSettings(
      'vertex', 'cmle-training-workerpool0-ab-0:2222', 3, 2
  )


def test_vertex_coordinator_port_override():
  settings = distributed.resolve_settings(environ={
      'CLUSTER_SPEC': vertex_spec('workerpool1', 0),
      'JAX_COORDINATOR_PORT': '8476',
  })
  assert settings.coordinator_address == 'cmle-training-workerpool0-ab-0:8476'


def test_vertex_single_replica_is_single_process():
  spec = json.dumps({
      'cluster': {'workerpool0': ['cmle-training-workerpool0-ab-0:2222']},
      'task': {'type': 'workerpool0', 'index': 0},
  })
  settings = distributed.resolve_settings('vertex', environ={'CLUSTER_SPEC': spec})
  assert settings.cluster == 'single'


def test_vertex_server_pool_raises():
  with pytest.raises(ValueError) as error:
    distributed.resolve_settings(
        environ={'CLUSTER_SPEC': vertex_spec('workerpool2', 0)}
    )
  assert "pool 'workerpool2'" in str(error.value)


def test_vertex_malformed_spec_raises():
  with pytest.raises(ValueError) as error:
    distributed.resolve_settings(environ={'CLUSTER_SPEC': '{"cluster": {}}'})
  assert 'is not the JSON of a Vertex AI cluster' in str(error.value)


def test_no_settings_is_single_process():
  settings = distributed.resolve_settings('auto', environ={})
  if distributed.on_tpu_vm():
    pytest.skip('this host is a TPU VM, where auto selects the TPU runtime')
  assert settings == distributed.ProcessSettings('single')


def test_cluster_none_ignores_environment():
  settings = distributed.resolve_settings(
      'none', environ={'CLUSTER_SPEC': vertex_spec('workerpool1', 0)}
  )
  assert settings == distributed.ProcessSettings('single')


def test_unknown_cluster_raises():
  with pytest.raises(ValueError) as error:
    distributed.resolve_settings('slurm', environ={})
  assert "cluster='slurm' is invalid" in str(error.value)


def test_mesh_rules_override_defaults():
  rules = dict(trainer.parse_rules('batch=data+fsdp, mlp=, embed=tensor'))
  assert rules['batch'] == ('data', 'fsdp')
  assert rules['mlp'] == ()
  assert rules['embed'] == ('tensor',)
  assert rules['vocab'] == ('tensor',)  # Not overridden: the default.


@pytest.mark.parametrize('text, message', [
    ('batch', "invalid rule 'batch'"),
    ('=data', "invalid rule '=data'"),
    ('batch=data+model', "unknown mesh axes ['model']"),
])
def test_mesh_rules_invalid_raise(text, message):
  with pytest.raises(ValueError) as error:
    trainer.parse_rules(text)
  assert message in str(error.value)
