"""The fine-tuning loop: data, train steps, checkpoints, metrics, evaluation.

    from gemma4_jax.training import run_config, trainer
    run = run_config.base_config()
    run.workdir = '/tmp/run'
    run.data.train = 'train.jsonl'
    result = trainer.train(run)

`train` does, in order:

1. build the tokenizer, the model config (from `init_checkpoint` or the
   preset with overrides) and the batch pipeline;
2. restore the newest checkpoint in `workdir/checkpoints`, or start from
   `init_checkpoint` or random parameters;
3. run train steps up to `optimizer.total_steps` (or `stop_after_steps`),
   with a progress bar, metrics to `metrics.jsonl` and TensorBoard, periodic
   perplexity on `data.eval`, and checkpoints every `checkpoint.every_steps`;
4. at the end, save the last checkpoint, export the model (merged with its
   LoRA adapters) in the release layout to `workdir/export/checkpoint`,
   with the tokenizer, the model config (`model_config.json`, which
   `gemma4-jax generate` and `eval.evaluate` read) and, for LoRA, the
   adapters on their own (`workdir/export/adapters`), and score greedy
   generations on held-out conversations (`workdir/generation.jsonl`).

With `mesh.shape` set, the run is sharded over the devices of all processes
(`gemma4_jax.parallel.distributed` starts the processes' runtime). Each
process then reads only the data shards its devices hold, the parameters
are initialised, loaded or restored straight into their shards, every
process writes its shards of each checkpoint, and only process 0 writes
`metrics.jsonl`, TensorBoard files and `run.json`.

A SIGTERM (how TPU VMs and Vertex AI announce preemption) ends the loop
after the current step, saves a checkpoint of that step, and returns with
`preempted=True`. Running the same configuration again resumes from the
newest checkpoint: parameters, optimizer state, step, PRNG key and the data
position, so the resumed run's losses are those of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from gemma4_jax import checkpoint as checkpoint_lib
from gemma4_jax import config as config_lib
from gemma4_jax import evaluation
from gemma4_jax.checkpoint import layouts
from gemma4_jax.audio import encoder as audio_encoder
from gemma4_jax import generation_cli
from gemma4_jax.parallel import mesh as mesh_lib
from gemma4_jax.parallel import placement
from gemma4_jax.parallel import rules as rules_lib
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.training import checkpointing
from gemma4_jax.training import data as data_lib
from gemma4_jax.training import global_batches
from gemma4_jax.training import lora as lora_lib
from gemma4_jax.training import metrics as metrics_lib
from gemma4_jax.training import step as step_lib
from gemma4_jax.training import media as media_lib
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import encoder as vision_encoder

EXPORT_DIR = 'export'
GENERATION_FILE = 'generation.jsonl'
CHECKPOINT_DIR = 'checkpoints'


@dataclasses.dataclass
class RunResult:
  """Outcome of one call of `train`.

  Attributes:
    workdir: The run's directory.
    start_step: Step the call started from (0, or a restored checkpoint's).
    last_step: Step reached when the call returned.
    preempted: A SIGTERM ended the loop early.
    last_metrics: The last metrics record written.
    export_path: The exported checkpoint, or None.
    tokenizer_path: The tokenizer the run used.
    perplexity: The last perplexity evaluation, or None.
    generation: The generation scores of the end of the run, or None.
  """

  workdir: Path
  start_step: int
  last_step: int
  preempted: bool
  last_metrics: dict[str, Any]
  export_path: Path | None = None
  tokenizer_path: Path | None = None
  perplexity: evaluation.PerplexityResult | None = None
  generation: evaluation.GenerationResult | None = None


class _PreemptionSignal:
  """Sets a flag on SIGTERM while installed (main thread only)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    del frame
    logging.warning(
        'received signal %d: saving a checkpoint after this step', signum
    )
    self.received = True

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def any_process_received(self) -> bool:
    """Return whether any process got the signal (the same on all of them)."""
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    flags = multihost_utils.process_allgather(np.array(self.received))
    return bool(np.any(flags))


def dtype_from_name(name: str) -> Any:
  """Return the JAX dtype called `name` ('bfloat16', 'float32', ...)."""
  try:
    return jnp.dtype(name)
  except TypeError as error:
    raise ValueError(
        f'unknown dtype {name!r}; use bfloat16, float16 or float32'
    ) from error


def tokenizer_path(run: ml_collections.ConfigDict) -> Path:
  """Return the run's tokenizer file, fetching the released one if unset."""
  if run.tokenizer:
    path = Path(run.tokenizer)
    if not path.is_file():
      raise FileNotFoundError(
          f'tokenizer {str(path)!r} not found; pass a SentencePiece .model'
          ' file, or an empty tokenizer to fetch the released Gemma 4 one'
      )
    return path
  from gemma4_jax.text.fetch import fetch_tokenizer  # pylint: disable=g-import-not-at-top

  return Path(fetch_tokenizer())


def model_config(
    run: ml_collections.ConfigDict, tokenizer: Tokenizer
) -> config_lib.Gemma4Config:
  """Return the decoder config: preset + overrides, or `init_checkpoint`'s.

  With `init_checkpoint` the shapes are read from the checkpoint. A released
  checkpoint matches its preset; for any other, the preset with overrides
  supplies what shapes do not show (sliding window, RoPE, ...).
  """
  overrides = dict(run.model.overrides.to_dict())
  if overrides.get('vocab_size', None) == 0:
    overrides['vocab_size'] = tokenizer.vocab_size
  for key, value in overrides.items():
    if isinstance(value, (list, tuple)):
      overrides[key] = tuple(value)
  if 'attention_pattern' in overrides:
    overrides['attention_pattern'] = tuple(
        config_lib.AttentionKind(kind)
        for kind in overrides['attention_pattern']
    )
  config = config_lib.get_preset(run.model.preset)
  if overrides:
    overrides.setdefault('name', f'{run.model.preset}_custom')
    config = dataclasses.replace(config, **overrides)
  if run.init_checkpoint:
    config = checkpoint_lib.config_from_checkpoint(
        run.init_checkpoint, defaults=config if overrides else None
    )
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(
        f'the tokenizer has {tokenizer.vocab_size} pieces but the model'
        f' {config.name!r} only {config.vocab_size} embeddings; use the'
        ' tokenizer the model was trained with'
    )
  return with_towers(run, config)


def scale_query_norms(params: Any) -> Any:
  """Multiply every `query_norm/scale` by its head width to the power -1/2.

  Gemma 4 does not scale queries by `head_dim**-0.5`: with the norm scales
  at their initial ones, attention logits of a random model have a standard
  deviation near `sqrt(head_dim)` and the softmax starts almost one-hot,
  which slows training from scratch. Starting the query-norm scales at
  `head_dim**-0.5` gives logits of unit variance and the same parameter
  tree.
  """

  def scale(path, value):
    names = [getattr(entry, 'key', None) for entry in path]
    if names[-2:] == ['query_norm', 'scale']:
      return value * value.shape[-1] ** -0.5
    return value

  return jax.tree_util.tree_map_with_path(scale, params)


def _lora_config(run: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  if run.lora.rank <= 0:
    return None
  return lora_lib.LoraConfig(
      rank=run.lora.rank, alpha=run.lora.alpha, targets=tuple(run.lora.targets)
  )


def optimizer_config(run: ml_collections.ConfigDict) -> step_lib.OptimizerConfig:
  fields = run.optimizer.to_dict()
  if fields.get('max_grad_norm', None) in (0, 0.0):
    fields['max_grad_norm'] = None
  return step_lib.OptimizerConfig(**fields)


def parse_rules(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Return the default rules with the overrides 'batch=data+fsdp,mlp=tensor'.

  A logical name with nothing after '=' is replicated.
  """
  overrides = {}
  for item in text.split(','):
    item = item.strip()
    if not item:
      continue
    name, sep, axes_text = item.partition('=')
    name = name.strip()
    if not sep or not name:
      raise ValueError(
          f'invalid rule {item!r} in mesh.rules={text!r}; write'
          ' NAME=AXIS+AXIS, for example batch=data+fsdp'
      )
    axes = tuple(a.strip() for a in axes_text.split('+') if a.strip())
    unknown = [a for a in axes if a not in mesh_lib.MESH_AXES]
    if unknown:
      raise ValueError(
          f'rule {item!r} in mesh.rules names unknown mesh axes {unknown};'
          f' the axes are {", ".join(mesh_lib.MESH_AXES)}'
      )
    overrides[name] = axes
  return rules_lib.rules_from_mapping(overrides)


def run_mesh(
    run: ml_collections.ConfigDict,
) -> tuple[jax.sharding.Mesh | None, tuple[tuple[str, tuple[str, ...]], ...]]:
  """Return the run's mesh over all processes' devices (None: one device)."""
  rules = parse_rules(run.mesh.rules)
  if not run.mesh.shape:
    if jax.process_count() > 1:
      raise ValueError(
          f'mesh.shape is empty, but this run has {jax.process_count()}'
          f' processes with {jax.device_count()} devices; set'
          f' --config.mesh.shape, for example fsdp={jax.device_count()}'
      )
    return None, rules
  mesh = mesh_lib.make_mesh(run.mesh.shape)
  logging.info(
      'mesh %s over %d devices of %d processes',
      ','.join(f'{axis}={size}' for axis, size in mesh.shape.items()),
      mesh.size, jax.process_count(),
  )
  return mesh, rules


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings,
  )


def _count_tokens(segment_ids: Any) -> Any:
  """Count the non-padding positions of a batch, on the host or the devices."""
  if isinstance(segment_ids, np.ndarray):
    return float(np.sum(segment_ids != 0))
  # A global array: the sum is a replicated scalar, read at the next log.
  return jnp.sum(segment_ids != 0, dtype=jnp.float32)


def _cast_floating(tree: Any, dtype: Any) -> Any:
  """Cast floating leaves to `dtype`; vision and audio towers stay float32."""
  return step_lib._cast_floating(tree, dtype)  # pylint: disable=protected-access


def _parse_fields(text: str, config_class: type, option: str) -> Any:
  """Build `config_class` from 'field=value,...' (ints, floats, booleans)."""
  fields: dict[str, Any] = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, separator, value = item.partition('=')
    if not separator:
      raise ValueError(
          f'{option}={text!r}: {item!r} is not field=value; write for example'
          " 'embed_dim=32,num_layers=2'"
      )
    value = value.strip()
    if value.lower() in ('true', 'false'):
      fields[name.strip()] = value.lower() == 'true'
      continue
    try:
      fields[name.strip()] = int(value)
    except ValueError:
      try:
        fields[name.strip()] = float(value)
      except ValueError:
        fields[name.strip()] = value
  try:
    return config_class(**fields)
  except (TypeError, ValueError) as error:
    raise ValueError(f'{option}={text!r} is invalid: {error}') from error


def with_towers(
    run: ml_collections.ConfigDict, config: config_lib.Gemma4Config
) -> config_lib.Gemma4Config:
  """Attach the vision and audio towers that `model.vision`/`audio` ask for."""
  media = run.data.media.enabled
  for option, spec, attach, config_class, default_available in (
      ('model.vision', run.model.vision, config_lib.with_vision,
       vision_encoder.VisionConfig,
       config.name in vision_encoder.VISION_PRESETS),
      ('model.audio', run.model.audio, config_lib.with_audio,
       audio_encoder.AudioConfig, config.name in config_lib.AUDIO_PRESETS),
  ):
    spec = spec.strip()
    if spec == 'none' or (not spec and not (media and default_available)):
      continue
    if spec in ('', 'preset'):
      try:
        config = attach(config)
      except ValueError as error:
        raise ValueError(f'{option}={spec!r}: {error}') from error
    else:
      config = attach(config, _parse_fields(spec, config_class, option))
  return config


def _write_run_info(workdir: Path, run: ml_collections.ConfigDict, cfg) -> None:
  info = {
      'run_config': run.to_dict(),
      'model_config': {
          k: v for k, v in dataclasses.asdict(cfg).items()
          if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
      },
  }
  tmp = workdir / 'run.json.tmp'
  tmp.write_text(json.dumps(info, indent=1, default=str))
  os.replace(tmp, workdir / 'run.json')


def train(run: ml_collections.ConfigDict) -> RunResult:
  """Run (or resume) the fine-tuning described by `run`; see the module doc."""
  if not run.workdir:
    raise ValueError('workdir is empty; set --config.workdir=/path/to/run')
  if not run.data.train:
    raise ValueError(
        'data.train is empty; set --config.data.train=/path/to/train.jsonl'
    )
  if jax.process_count() > 1 and run.data.eval and run.eval.generation_examples:
    raise NotImplementedError(
        'scoring generations (eval.generation_examples) runs on one process'
        f' only, but this run has {jax.process_count()}; set'
        ' --config.eval.generation_examples=0'
    )
  workdir = Path(run.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  mesh, rules = run_mesh(run)

  tok_path = tokenizer_path(run)
  tokenizer = Tokenizer(tok_path)
  cfg = model_config(run, tokenizer)
  compute_dtype = dtype_from_name(run.model.dtype)
  model = Transformer(
      config=cfg,
      dtype=compute_dtype,
      remat=run.model.remat,
      moe_implementation=run.model.moe_implementation,
  )
  opt_config = optimizer_config(run)
  lora_config = _lora_config(run)
  if is_chief:
    _write_run_info(workdir, run, cfg)

  media_config = None
  if run.data.media.enabled:
    media_config = media_lib.MediaConfig(
        image_budget=run.data.media.image_budget,
        max_images_per_row=run.data.media.max_images_per_row,
        max_clips_per_row=run.data.media.max_clips_per_row,
        max_clip_seconds=run.data.media.max_clip_seconds,
    )
  has_towers = cfg.vision is not None or cfg.audio is not None
  # Full fine-tuning passes frozen towers to the step beside the state;
  # LoRA keeps them in its frozen base parameters.
  split_towers = has_towers and not run.model.train_towers and not lora_config

  # Every batch is made of `num_shards` equal parts, one per data shard.
  # Each process reads only the shards whose rows its devices hold.
  num_shards = run.data.num_shards or jax.process_count()

  def make_shard(index: int) -> data_lib.TrainingDataset:
    return data_lib.make_dataset(
        run.data.train,
        tokenizer,
        seq_len=run.data.seq_len,
        batch_size=run.data.batch_size // num_shards,
        seed=run.seed,
        packing=run.data.packing,
        source=run.data.source,
        overlong=run.data.overlong,
        shard_index=index,
        shard_count=num_shards,
        media=media_config,
    )

  batch_sharding = None
  if mesh is not None:
    batch_sharding = placement.batch_shardings(
        jax.ShapeDtypeStruct(
            (run.data.batch_size, run.data.seq_len), jnp.int32
        ),
        mesh, rules,
    )
  batches = global_batches.GlobalBatches(
      make_shard,
      batch_size=run.data.batch_size,
      seq_len=run.data.seq_len,
      num_shards=num_shards,
      sharding=batch_sharding,
  )
  logging.info(
      'process %d reads data shards %s of %d (%d rows each)',
      jax.process_index(), batches.local_shards, num_shards,
      run.data.batch_size // num_shards,
  )

  # The starting parameters: a checkpoint, or a random initialisation. On a
  # mesh both are created in their shards, never whole on one device.
  def random_params():
    init_model = Transformer(config=cfg, dtype=jnp.float32)
    params = init_model.init(
        jax.random.key(run.seed), jnp.ones((1, 8), jnp.int32)
    )['params']
    if run.model.query_norm_init == 'inverse_sqrt':
      params = scale_query_norms(params)
    elif run.model.query_norm_init != 'ones':
      raise ValueError(
          f'model.query_norm_init={run.model.query_norm_init!r} is invalid;'
          " use 'ones' or 'inverse_sqrt'"
      )
    return params

  param_shardings = None
  if mesh is not None:
    param_shardings = placement.tree_shardings(
        jax.eval_shape(random_params), mesh, rules
    )

  def initial_params():
    if run.init_checkpoint:
      return checkpoint_lib.load_params(
          run.init_checkpoint, config=cfg, dtype=jnp.float32,
          sharding=param_shardings, text_only=not has_towers,
      )
    if mesh is None:
      return random_params()
    return jax.jit(random_params, out_shardings=param_shardings)()

  state_rng = jax.random.fold_in(jax.random.key(run.seed), 1)
  adapter_rng = jax.random.fold_in(jax.random.key(run.seed), 2)

  def initial_state(params):
    if lora_config is None:
      return step_lib.init_train_state(params, opt_config, state_rng), None
    adapters = lora_lib.init_adapters(
        params, lora_config, adapter_rng, model_config=cfg
    )
    base = _cast_floating(params, compute_dtype)
    return step_lib.init_train_state(adapters, opt_config, state_rng), base

  def sharded_state(params, abstract_state):
    """`initial_state(params)`, created in the shardings of `abstract_state`."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    state = jax.jit(
        lambda p: initial_state(p)[0],
        out_shardings=shardings,
        # Full fine-tuning copies `params` into the state; LoRA keeps them.
        donate_argnums=() if lora_config else 0,
    )(params)
    if lora_config is None:
      return state, None
    return state, jax.jit(
        lambda p: _cast_floating(p, compute_dtype),
        out_shardings=param_shardings,
    )(params)

  checkpointer = checkpointing.TrainCheckpointer(
      workdir / CHECKPOINT_DIR,
      max_to_keep=run.checkpoint.max_to_keep or None,
      async_save=run.checkpoint.async_save,
  )
  start_time = time.perf_counter()
  params = None
  if run.init_checkpoint or lora_config or split_towers:
    params = initial_params()
  towers = None
  if split_towers:
    # The towers are not in the train state, so a resumed run reads them
    # again from the starting parameters.
    params, towers = step_lib.split_towers(params)
  abstract_state = jax.eval_shape(
      lambda p: initial_state(p)[0],
      jax.eval_shape(random_params) if params is None else params,
  )
  if mesh is not None:
    abstract_state = _with_shardings(
        abstract_state, placement.tree_shardings(abstract_state, mesh, rules)
    )
  latest = checkpointer.latest_step()
  if latest is not None:
    base_params = None
    if params is not None and lora_config is not None:
      base_params = _cast_floating(params, compute_dtype)
    state, data_state = checkpointer.restore(latest, abstract_state)
    batches.set_state(data_state)
    logging.info(
        'resumed from the checkpoint of step %d in %s (%.1f s)',
        latest, checkpointer.directory, time.perf_counter() - start_time,
    )
  else:
    if params is None:
      params = initial_params()
    if mesh is None:
      state, base_params = initial_state(params)
    else:
      state, base_params = sharded_state(params, abstract_state)
    logging.info(
        'initialised %s from %s (%.1f s)',
        cfg.name, run.init_checkpoint or f'random, seed {run.seed}',
        time.perf_counter() - start_time,
    )
  del params
  start_step = int(state.step)

  trainable = lora_lib.describe_trainable(state.params)
  logging.info('trainable parameters%s:\n%s',
               ' (LoRA adapters)' if lora_config else '', trainable)
  opt_bytes = sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state)
  )
  logging.info('optimizer state: %.1f MiB', opt_bytes / 2**20)

  train_step = step_lib.make_train_step(
      model,
      opt_config,
      lora=lora_config,
      loss_chunk_size=run.loss_chunk_size,
      load_balancing_weight=run.model.load_balancing_weight,
      mesh=mesh,
      rules=rules,
  )

  def run_step(state, batch):
    if lora_config is None and towers:
      return train_step(state, batch, towers)
    if lora_config is None:
      return train_step(state, batch)
    return train_step(state, batch, base_params)

  def eval_params(state):
    if lora_config is None:
      decoder = _cast_floating(state.params, compute_dtype)
      if towers:
        return layouts.merge_trees(decoder, towers)
      return decoder
    return lora_lib.apply_adapters(
        base_params, state.params, lora_config, compute_dtype
    )

  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step) if is_chief else None
  end_step = opt_config.total_steps
  if run.stop_after_steps:
    end_step = min(end_step, run.stop_after_steps)

  perplexity_result = None

  def evaluate_perplexity(state, step):
    nonlocal perplexity_result
    eval_batches = evaluation.evaluation_batches(
        run.data.eval,
        tokenizer,
        seq_len=run.data.seq_len,
        batch_size=run.data.batch_size,
        source=run.data.source,
    )
    started = time.perf_counter()
    perplexity_result = evaluation.perplexity(
        model, eval_params(state), eval_batches, chunk_size=run.loss_chunk_size
    )
    logging.info(
        'step %d: eval loss %.4f, perplexity %.3f over %d tokens (%.1f s)',
        step, perplexity_result.loss, perplexity_result.perplexity,
        perplexity_result.num_tokens, time.perf_counter() - started,
    )
    if writer:
      writer.write(step, {
          'eval_loss': perplexity_result.loss,
          'eval_perplexity': perplexity_result.perplexity,
      })

  last_metrics: dict[str, Any] = {}
  preempted = False
  step = start_step
  interval_tokens = 0.0
  interval_start = time.perf_counter()
  progress = tqdm.tqdm(
      total=end_step, initial=start_step, desc='train', unit='step',
      disable=not is_chief, dynamic_ncols=True,
  )
  with _PreemptionSignal() as preemption:
    while step < end_step:
      batch = next(batches)
      state, metrics = run_step(state, batch)
      step += 1
      interval_tokens += _count_tokens(batch['segment_ids'])
      progress.update(1)

      if step % run.log_every_steps == 0 or step == end_step:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - interval_start
        values['tokens_per_second'] = float(interval_tokens) / max(elapsed, 1e-9)
        interval_tokens, interval_start = 0.0, time.perf_counter()
        last_metrics = {'step': step, **values}
        progress.set_postfix(
            loss=f'{values["loss"]:.4f}',
            tok_s=f'{values["tokens_per_second"]:.0f}',
            lr=f'{values["learning_rate"]:.2e}',
        )
        if writer:
          writer.write(step, values)

      preempted = preemption.any_process_received()
      if (
          preempted
          or step % run.checkpoint.every_steps == 0
          or step == end_step
      ):
        checkpointer.save(step, state, batches.get_state())
      if run.data.eval and run.eval.every_steps and (
          step % run.eval.every_steps == 0
      ):
        evaluate_perplexity(state, step)
      if preempted:
        logging.warning('stopping at step %d after the signal', step)
        break
  progress.close()
  if step == start_step and step == end_step:
    logging.info('the run is already at step %d; nothing to train', step)
  checkpointer.close()
  logging.info('checkpoint of step %d saved in %s', step, checkpointer.directory)

  result = RunResult(
      workdir=workdir,
      start_step=start_step,
      last_step=step,
      preempted=preempted,
      last_metrics=last_metrics,
      tokenizer_path=tok_path,
  )
  if preempted or step < opt_config.total_steps:
    if writer:
      writer.close()
    return result

  # The run is complete: final evaluations and the exported model.
  if run.data.eval and not (
      run.eval.every_steps and step % run.eval.every_steps == 0
  ):
    evaluate_perplexity(state, step)
  result.perplexity = perplexity_result

  final_params = eval_params(state)
  if run.export.layout:
    export_dir = workdir / EXPORT_DIR
    exported = _cast_floating(
        final_params if lora_config is None
        else lora_lib.merge(base_params, state.params, lora_config),
        dtype_from_name(run.export.dtype),
    )
    result.export_path = _save_export(exported, export_dir, run.export.layout)
  if run.export.layout and is_chief:
    shutil.copyfile(tok_path, export_dir / 'tokenizer.model')
    # The config lets `gemma4-jax generate --ckpt` and `eval.evaluate` run a
    # custom model, whose shapes fit no preset, without a --model flag.
    config_path = export_dir / generation_cli.MODEL_CONFIG_FILE
    config_path.with_suffix('.tmp').write_text(generation_cli.config_to_json(cfg))
    os.replace(config_path.with_suffix('.tmp'), config_path)
    if lora_config is not None and jax.process_count() == 1:
      lora_lib.save_adapters(
          state.params, lora_config, export_dir / 'adapters', overwrite=True
      )
    elif lora_config is not None:
      # NOTE: `lora.save_adapters` writes from one process only.
      logging.warning(
          'the LoRA adapters are not exported on their own by a run of %d'
          ' processes; the merged model is in %s',
          jax.process_count(), result.export_path,
      )
    logging.info('exported the %s model to %s', run.export.layout, result.export_path)

  if run.data.eval and run.eval.generation_examples:
    result.generation = score_generation(
        model, final_params, tokenizer, run, writer, step
    )
  if writer:
    writer.close()
  return result


def _save_export(params: Any, export_dir: Path, layout: str) -> Path:
  """Write `params` to `export_dir/checkpoint`, from every process.

  Every process writes the shards its devices hold; a single process
  replaces an earlier export in place.
  """
  path = export_dir / 'checkpoint'
  if jax.process_count() == 1:
    export_dir.mkdir(exist_ok=True)
    return checkpoint_lib.save_params(
        params, path, layout=layout, overwrite=True
    )

  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  # All processes must find the path absent, so that they all take part in
  # one Orbax save instead of the rename that replaces a checkpoint.
  if jax.process_index() == 0:
    export_dir.mkdir(exist_ok=True)
    if path.exists():
      shutil.rmtree(path)
  multihost_utils.sync_global_devices('gemma4_jax export: old checkpoint removed')
  return checkpoint_lib.save_params(params, path, layout=layout)


def score_generation(
    model: Transformer,
    params: Any,
    tokenizer: Tokenizer,
    run: ml_collections.ConfigDict,
    writer: metrics_lib.MetricWriter | None,
    step: int,
) -> evaluation.GenerationResult:
  """Score greedy generations on the first held-out conversations."""
  from gemma4_jax.sampling.sampler import Sampler  # pylint: disable=g-import-not-at-top
  from gemma4_jax.training import records as records_lib  # pylint: disable=g-import-not-at-top

  records = records_lib.read_jsonl(run.data.eval, source=run.data.source)
  examples = evaluation.generation_examples(
      records, tokenizer, thinking=False,
      max_examples=run.eval.generation_examples,
  )
  started = time.perf_counter()
  result = evaluation.generation_accuracy(
      Sampler(model, params, tokenizer),
      examples,
      max_new_tokens=run.eval.max_new_tokens,
      batch_size=run.eval.batch_size,
      progress=jax.process_index() == 0,
  )
  logging.info(
      'generation exact match %.1f%% (%d of %d held-out conversations, %.1f s)',
      100 * result.accuracy, result.num_hits, result.num_examples,
      time.perf_counter() - started,
  )
  if writer:
    writer.write(step, {'generation_exact_match': result.accuracy})
    # One line per scored conversation: expected and parsed answer, raw text.
    path = Path(run.workdir) / GENERATION_FILE
    with open(path.with_suffix('.tmp'), 'w', encoding='utf-8') as file:
      for example in result.examples:
        file.write(json.dumps(example.to_json(), ensure_ascii=False) + '\n')
    os.replace(path.with_suffix('.tmp'), path)
  return result
