"""The fields of a fine-tuning run configuration, with their defaults.

Files in `configs/` start from `base_config()` and change what they need;
every field can then be overridden on the command line, for example

    python -m train.finetune --config=configs/e2b_lora.py \\
        --config.workdir=/tmp/run --config.optimizer.learning_rate=5e-5

Fields:

  workdir: Directory of the run: checkpoints, metrics, TensorBoard files and
    the exported model. Rerunning a command with the same workdir resumes.
  seed: Seed of the parameter initialisation (random init only), of the
    data order and of the train state's PRNG key.
  tokenizer: Path of a SentencePiece model; '' fetches the released Gemma 4
    tokenizer (`gemma4_jax.text.fetch_tokenizer`).
  init_checkpoint: A released (or our exported) checkpoint in any layout to
    start from; '' starts from random parameters of `model`.
  model.preset: 'e2b', 'e4b', '26b_a4b' or '31b'. Ignored for the shapes when
    `init_checkpoint` is set (they are read from the checkpoint).
  model.overrides: Gemma4Config fields replacing the preset's, for small
    models trained from scratch (`vocab_size: 0` takes the tokenizer's).
  model.dtype: Compute dtype of the forward and backward pass.
  model.remat: 'none', 'dots' or 'full' (see `Transformer.remat`).
  model.moe_implementation: 'auto', 'ragged' or 'tiled'.
  model.load_balancing_weight: Weight of the MoE router load-balancing loss.
  model.query_norm_init: 'ones' (as the release) or 'inverse_sqrt': initial
    query-norm scales of a random initialisation (see
    `trainer.scale_query_norms`); ignored with `init_checkpoint`.
  model.vision / model.audio: The towers of the model: '' (the preset's
    tower when `data.media.enabled`, else none), 'none', 'preset', or
    'field=value,...' of `VisionConfig` / `AudioConfig` for a custom tower.
  model.train_towers: Train the towers too; by default they are frozen and
    have no optimizer state (LoRA never adapts them).
  data.train / data.eval: JSONL files (or directories, globs, comma lists);
    eval '' skips the evaluations.
  data.source: 'auto', 'chat', 'text' or 'prompt_response'.
  data.seq_len / data.batch_size: Row length, and rows per batch over all
    processes (the global batch).
  data.num_shards: Data shards that fill equal parts of every batch (0: one
    per process). The batches depend on it and not on the number of
    processes, so resume a run with the value it started with.
  data.packing: Pack several examples per row; else pad each to a row.
  data.overlong: 'truncate' or 'drop' examples longer than seq_len.
  data.media.*: `enabled` reads image and audio parts of conversations;
    the other fields are those of `gemma4_jax.training.media.MediaConfig`.
  optimizer.*: `gemma4_jax.training.step.OptimizerConfig`;
    `optimizer.total_steps` is the length of the run.
  lora.rank: 0 for full fine-tuning; above 0 trains LoRA adapters only.
  lora.alpha / lora.targets: scaling and adapted weight groups (see
    `gemma4_jax.training.lora.LoraConfig`).
  loss_chunk_size: Sequence positions per chunk of the cross-entropy.
  log_every_steps: Steps between metric records.
  checkpoint.every_steps / max_to_keep / async_save: train checkpoints.
  eval.every_steps: Steps between perplexity evaluations on `data.eval`
    (0: only at the end).
  eval.generation_examples: Held-out conversations scored by greedy
    generation at the end of the run (0 skips it).
  eval.max_new_tokens / eval.batch_size: generation settings.
  eval.show_examples: Scored conversations printed at the end.
  export.layout: Layout of the exported model ('nested', 'flat', 'stacked';
    '' skips the export).
  export.dtype: Dtype of the exported parameters.
  mesh.shape: Device mesh over all processes' devices, for example
    'data=2,fsdp=2,tensor=2' (axes data, fsdp, expert, tensor; sizes multiply
    to the device count); '' runs on one device of a single process.
  mesh.rules: Overrides of the logical-axis rules
    (`gemma4_jax.parallel.rules.DEFAULT_RULES`), for example
    'batch=data+fsdp,mlp=tensor'; a name with nothing after '=' is
    replicated.
  stop_after_steps: End this invocation after this step (0: run to
    `optimizer.total_steps`); a later invocation continues the schedule.
  demo: '' or 'tool_calling': generate the tool-calling demo's data and
    tokenizer into `workdir/data` before training, and point `data.train`,
    `data.eval` and `tokenizer` at them (see `gemma4_jax.demo_data`).
  demo_data.num_train / num_heldout: conversations generated for training
    and for the held-out evaluation.
  demo_data.num_tools: tools declared in each conversation.
  demo_data.vocab_size: pieces of the tokenizer trained on the demo data.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Return the full set of run fields with their defaults."""
  config = ml_collections.ConfigDict()
  config.workdir = ''
  config.seed = 0
  config.tokenizer = ''
  config.init_checkpoint = ''

  config.model = ml_collections.ConfigDict()
  config.model.preset = 'e2b'
  config.model.overrides = ml_collections.ConfigDict()
  config.model.dtype = 'bfloat16'
  config.model.remat = 'none'
  config.model.moe_implementation = 'auto'
  config.model.load_balancing_weight = 0.0
  config.model.query_norm_init = 'ones'
  config.model.vision = ''
  config.model.audio = ''
  config.model.train_towers = False

  config.data = ml_collections.ConfigDict()
  config.data.train = ''
  config.data.eval = ''
  config.data.source = 'auto'
  config.data.seq_len = 2048
  config.data.batch_size = 8
  config.data.packing = True
  config.data.overlong = 'truncate'
  config.data.num_shards = 0
  config.data.media = ml_collections.ConfigDict()
  config.data.media.enabled = False
  config.data.media.image_budget = 280
  config.data.media.max_images_per_row = 2
  config.data.media.max_clips_per_row = 2
  config.data.media.max_clip_seconds = 30.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-5
  config.optimizer.total_steps = 1000
  config.optimizer.warmup_steps = 50
  config.optimizer.end_learning_rate_fraction = 0.1
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.decay_embeddings = False
  config.optimizer.max_grad_norm = 1.0
  config.optimizer.num_microbatches = 1

  config.lora = ml_collections.ConfigDict()
  config.lora.rank = 0
  config.lora.alpha = 16.0
  config.lora.targets = ('q', 'kv', 'o', 'gating', 'linear')

  config.loss_chunk_size = 512
  config.log_every_steps = 10

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 200
  config.checkpoint.max_to_keep = 3
  config.checkpoint.async_save = True

  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 0
  config.eval.generation_examples = 0
  config.eval.max_new_tokens = 128
  config.eval.batch_size = 8
  config.eval.show_examples = 3

  config.export = ml_collections.ConfigDict()
  config.export.layout = 'nested'
  config.export.dtype = 'bfloat16'

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = ''
  config.mesh.rules = ''

  config.stop_after_steps = 0
  config.demo = ''
  config.demo_data = ml_collections.ConfigDict()
  config.demo_data.num_train = 16000
  config.demo_data.num_heldout = 200
  config.demo_data.num_tools = 1
  config.demo_data.vocab_size = 1536
  return config


# Starting points for the released models on TPU: (rows per batch, positions
# per row, remat policy, micro-batches) for full fine-tuning and for LoRA.
# Estimates to start from, to be tuned to the slice and the data.
_RELEASE_SETTINGS = {
    # preset: (full, lora), each (batch, seq_len, remat, microbatches)
    'e2b': ((32, 2048, 'dots', 1), (32, 2048, 'none', 1)),
    'e4b': ((32, 2048, 'dots', 2), (32, 2048, 'dots', 1)),
    '26b_a4b': ((64, 4096, 'full', 4), (32, 4096, 'dots', 2)),
    '31b': ((64, 4096, 'full', 8), (32, 4096, 'full', 4)),
}


def release_config(preset: str, *, lora: bool) -> ml_collections.ConfigDict:
  """Return a run fine-tuning the released `preset` checkpoint.

  `init_checkpoint`, `workdir` and `data.train` are left for the command
  line. LoRA runs adapt the attention and MLP projections (and, for the MoE,
  the stacked expert weights) at rank 16 with a learning rate of 1e-4; full
  runs use 1e-5 with weight decay.
  """
  config = base_config()
  full_settings, lora_settings = _RELEASE_SETTINGS[preset]
  batch, seq_len, remat, microbatches = lora_settings if lora else full_settings
  config.model.preset = preset
  config.model.remat = remat
  config.data.batch_size = batch
  config.data.seq_len = seq_len
  config.optimizer.num_microbatches = microbatches
  config.optimizer.total_steps = 2000
  config.optimizer.warmup_steps = 100
  if lora:
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.optimizer.learning_rate = 1e-4
    if preset == '26b_a4b':
      config.lora.targets = (
          'q', 'kv', 'o', 'gating', 'linear', 'experts_gating', 'experts_linear'
      )
  else:
    config.optimizer.learning_rate = 1e-5
    config.optimizer.weight_decay = 0.01
  if preset == '26b_a4b':
    config.model.load_balancing_weight = 1e-3
  return config
