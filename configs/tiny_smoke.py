"""A tiny E2B-like model trained from scratch: smoke runs and loop tests.

    python -m train.finetune --config=configs/tiny_smoke.py \
        --config.workdir=/tmp/smoke --config.data.train=train.jsonl

Keeps the E2B features (per-layer embeddings, KV sharing, local and global
layers) at toy width, in float32. The vocabulary is the tokenizer's: with
a few hundred pieces (`gemma4_jax.text.train_tokenizer`) a step takes
milliseconds; with the released 262144-piece tokenizer about a second.
"""

import ml_collections

from gemma4_jax.training import run_config


def get_config() -> ml_collections.ConfigDict:
  config = run_config.base_config()
  config.model.preset = 'e2b'
  config.model.overrides = ml_collections.ConfigDict(
      dict(
          name='tiny_smoke',
          vocab_size=0,  # The tokenizer's.
          embed_dim=32,
          num_layers=4,
          attention_pattern=('local', 'global'),
          num_heads=2,
          head_dim=16,
          num_kv_heads=1,
          global_head_dim=32,
          num_global_kv_heads=1,
          sliding_window=8,
          hidden_dim=64,
          kv_shared_hidden_dim=64,
          per_layer_input_dim=4,
          num_kv_shared_layers=2,
      )
  )
  config.model.dtype = 'float32'
  config.data.seq_len = 64
  config.data.batch_size = 2
  config.optimizer.learning_rate = 1e-3
  config.optimizer.total_steps = 40
  config.optimizer.warmup_steps = 4
  config.log_every_steps = 1
  config.checkpoint.every_steps = 4
  config.export.dtype = 'float32'
  return config
