"""A tiny E2B-like decoder for the CPU round-trip example and smoke runs.

    python -m eval.roundtrip --config=configs/tiny_e2b.py

runs in under a minute on a 2-core CPU. It keeps every E2B feature (MQA,
per-layer embeddings, KV sharing of the last layers with a double-wide MLP,
the 4 local : 1 global pattern) at toy width.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.preset = 'e2b'  # The family whose features are kept.
  config.model = ml_collections.ConfigDict(
      dict(
          vocab_size=1024,
          embed_dim=128,
          num_layers=10,
          num_heads=4,
          head_dim=32,
          num_kv_heads=1,
          global_head_dim=64,
          num_global_kv_heads=1,
          sliding_window=16,
          hidden_dim=256,
          kv_shared_hidden_dim=512,
          per_layer_input_dim=16,
          num_kv_shared_layers=5,
      )
  )
  config.seed = 0
  config.batch_size = 2
  config.length = 64
  config.workdir = '/tmp/gemma4_jax_roundtrip'
  return config
