"""The official `gemma` 4.0.1 package as a test oracle.

Builds the official text decoder for any `Gemma4Config`, so that parity tests
can create parameters with the official `init`, save them with the official
`gm.ckpts.save_params` and compare our outputs with the official `apply`.
Only tests import this module: the library never depends on `gemma`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from gemma4_jax import config as config_lib
from gemma4_jax.config import GLOBAL, LOCAL, Gemma4Config


def _official():
  # Imported lazily: importing gemma takes several seconds.
  from gemma.gm.nn.gemma4 import _config as official_config_lib
  from gemma.gm.nn.gemma4 import _gemma4 as official_gemma4
  from gemma.gm.nn.gemma4 import _modules as official_modules

  return official_config_lib, official_gemma4, official_modules


def official_config(cfg: Gemma4Config):
  """Translate our config into the official `TransformerConfig` (text only)."""
  official_config_lib, _, official_modules = _official()
  kind_map = {
      LOCAL: official_modules.AttentionType.LOCAL_SLIDING,
      GLOBAL: official_modules.AttentionType.GLOBAL,
  }
  sharing = None
  if cfg.num_kv_shared_layers:
    sharing = official_config_lib.KVCacheSharingConfig(
        frac_shared_layers=cfg.num_kv_shared_layers / cfg.num_layers,
        share_global=True,
        share_local=True,
    )
  return official_config_lib.TransformerConfig(
      num_embed=cfg.vocab_size,
      embed_dim=cfg.embed_dim,
      hidden_dim=cfg.hidden_dim,
      num_heads=cfg.num_heads,
      head_dim=cfg.head_dim,
      num_kv_heads=cfg.num_kv_heads,
      final_logit_softcap=cfg.final_logit_softcap,
      use_post_attn_norm=True,
      use_post_ffw_norm=True,
      attention_types=tuple(kind_map[k] for k in cfg.layer_kinds),
      sliding_window_size=cfg.sliding_window,
      qk_norm_with_scale=True,
      num_global_kv_heads=cfg.num_global_kv_heads,
      global_key_size=cfg.global_head_dim,
      k_eq_v_global=cfg.k_eq_v_global,
      global_rope_proportion=cfg.global_rope_proportion,
      local_rope_proportion=cfg.local_rope_proportion,
      local_base_frequency=cfg.local_rope_base,
      global_base_frequency=cfg.global_rope_base,
      per_layer_input_dim=cfg.per_layer_input_dim,
      kv_cache_sharing_config=sharing,
      override_kv_shared_ffw_hidden=cfg.kv_shared_hidden_dim,
      enable_moe=cfg.is_moe,
      num_experts=cfg.num_experts,
      expert_dim=cfg.expert_hidden_dim,
      top_k_experts=cfg.experts_per_token or 8,
      moe_dense_hidden_dim=cfg.hidden_dim if cfg.is_moe else 0,
      use_bidirectional_attention='vision' if cfg.vision_bidirectional else None,
      vision_encoder=None,
      audio_encoder=None,
  )


def official_model(cfg: Gemma4Config, dtype=jnp.float32):
  """The official text-only Gemma 4 decoder for `cfg`, with `dtype` params."""
  _, official_gemma4, _ = _official()
  return official_gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=official_config(cfg), dtype=dtype, text_only=True
  )


def official_preset_model(name: str, dtype=jnp.bfloat16):
  """The official released model class for preset `name`, text only."""
  from gemma import gm

  classes = {
      'e2b': gm.nn.Gemma4_E2B,
      'e4b': gm.nn.Gemma4_E4B,
      '26b_a4b': gm.nn.Gemma4_26B_A4B,
      '31b': gm.nn.Gemma4_31B,
  }
  return classes[name](dtype=dtype, text_only=True)


# Small random configs, one per released family. Each keeps the features of
# its family at toy width so that the official model runs in seconds on a CPU.
# A sliding window of 8 lets 32-token sequences cross it several times.

E2B_LIKE = Gemma4Config(
    name='e2b_like',
    vocab_size=512,
    embed_dim=64,
    num_layers=10,
    attention_pattern=(LOCAL,) * 4 + (GLOBAL,),
    num_heads=4,
    head_dim=16,
    num_kv_heads=1,  # MQA
    global_head_dim=32,
    num_global_kv_heads=1,
    sliding_window=8,
    hidden_dim=96,
    kv_shared_hidden_dim=192,  # double-wide MLP in the KV-shared layers
    per_layer_input_dim=8,
    # Layers 5..9 share: the last unshared layer (4) is global and the one
    # before it local, as in the release.
    num_kv_shared_layers=5,
)

E4B_LIKE = Gemma4Config(
    name='e4b_like',
    vocab_size=512,
    embed_dim=64,
    num_layers=12,
    num_heads=4,
    head_dim=16,
    num_kv_heads=2,
    global_head_dim=32,
    num_global_kv_heads=2,
    sliding_window=8,
    hidden_dim=128,
    per_layer_input_dim=8,
    num_kv_shared_layers=6,
)

MOE_LIKE = Gemma4Config(
    name='26b_a4b_like',
    vocab_size=512,
    embed_dim=64,
    num_layers=6,
    num_heads=4,
    head_dim=16,
    num_kv_heads=2,
    global_head_dim=32,
    num_global_kv_heads=1,
    k_eq_v_global=True,
    sliding_window=8,
    hidden_dim=48,
    num_experts=8,
    expert_hidden_dim=16,
    experts_per_token=2,
    vision_bidirectional=True,
)

DENSE_LIKE = Gemma4Config(
    name='31b_like',
    vocab_size=512,
    embed_dim=64,
    num_layers=6,
    num_heads=4,
    head_dim=16,
    num_kv_heads=2,
    global_head_dim=32,
    num_global_kv_heads=1,
    k_eq_v_global=True,
    sliding_window=8,
    hidden_dim=128,
    vision_bidirectional=True,
)

SMALL_CONFIGS = {
    c.name: c for c in (E2B_LIKE, E4B_LIKE, MOE_LIKE, DENSE_LIKE)
}


def small_config(name: str, **overrides) -> Gemma4Config:
  return dataclasses.replace(SMALL_CONFIGS[name], **overrides)


PRESET_NAMES = tuple(config_lib.PRESETS)
