"""The tool-calling demo: a small Gemma 4 learns function calling on a CPU.

    python -m train.finetune --config=configs/tool_calling_demo.py \\
        --config.workdir=/tmp/tool_calling_demo

Generates seeded conversations over six tools (`gemma4_jax.demo_data`),
trains a SentencePiece tokenizer with the Gemma 4 special pieces on them,
trains an E2B-like decoder (per-layer embeddings, local and global layers)
from random parameters, then answers the held-out requests greedily and
prints the share whose tool call (name and typed arguments) or text answer
is exactly right. The exported checkpoint loads with the official
`gm.ckpts.load_params`.

Float32 throughout: XLA's CPU backend runs bfloat16 matrix products several
times slower than float32 ones.
"""

import ml_collections

from gemma4_jax.training import run_config


def get_config() -> ml_collections.ConfigDict:
  config = run_config.base_config()
  config.demo = 'tool_calling'
  config.demo_data.num_train = 16000
  config.demo_data.num_heldout = 200
  config.demo_data.num_tools = 1
  config.demo_data.vocab_size = 1536

  config.model.preset = 'e2b'
  config.model.overrides = ml_collections.ConfigDict(
      dict(
          name='tool_calling_demo',
          vocab_size=0,  # The tokenizer's.
          embed_dim=128,
          num_layers=5,
          attention_pattern=('local', 'local', 'local', 'local', 'global'),
          num_heads=2,
          head_dim=64,
          num_kv_heads=1,
          global_head_dim=128,
          num_global_kv_heads=1,
          sliding_window=64,
          hidden_dim=256,
          kv_shared_hidden_dim=None,
          per_layer_input_dim=16,
          num_kv_shared_layers=0,
      )
  )
  config.model.dtype = 'float32'
  # Unit-variance attention logits at the start: from scratch, this more
  # than halved the loss after 100 steps (0.61 against 1.10).
  config.model.query_norm_init = 'inverse_sqrt'

  config.data.seq_len = 256
  config.data.batch_size = 16
  config.optimizer.learning_rate = 3e-3
  config.optimizer.total_steps = 1000
  config.optimizer.warmup_steps = 30
  config.optimizer.end_learning_rate_fraction = 0.05

  config.log_every_steps = 50
  config.checkpoint.every_steps = 200
  config.eval.every_steps = 0
  config.eval.generation_examples = 200
  config.eval.max_new_tokens = 96
  config.eval.batch_size = 50
  config.eval.show_examples = 3
  config.export.dtype = 'float32'
  return config
