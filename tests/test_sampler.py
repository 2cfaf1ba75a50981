"""Prefill, decode and the sampler, checked against the official sampler.

Small random models of each family use the real 262144-piece vocabulary and
the real Gemma 4 tokenizer, so prompts are real text. The sliding window is
8 tokens: prompts are longer than it and 64 generated tokens cross it many
times.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.sampling import cache as cache_lib
from gemma4_jax.sampling.sampler import Sampler, SamplingParams
from gemma4_jax.transformer import Transformer
from tests import oracle

PROMPTS = (
    'Hello there, how are you today? Tell me a story about a dragon.',
    'Hi',
    'The quick brown fox jumps over the lazy dog near the river bank.',
)
NEW_TOKENS = 64


@functools.cache
def full_vocab_model(family: str):
  """Official init (weights x3 for livelier logits) at the real vocabulary."""
  cfg = dataclasses.replace(oracle.SMALL_CONFIGS[family], vocab_size=262_144)
  official = oracle.official_model(cfg, jnp.float32)
  params = official.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  params = jax.tree.map(
      lambda x: x * 3.0 if x.ndim >= 2 else x, params['params']
  )
  return cfg, official, params


@pytest.mark.parametrize('family', tuple(oracle.SMALL_CONFIGS))
def test_greedy_tokens_match_official_sampler(
    family, gemma4_tokenizer, gemma4_tokenizer_path
):
  from gemma import gm

  cfg, official, params = full_vocab_model(family)
  official_tokenizer = gm.text.Gemma4Tokenizer(path=str(gemma4_tokenizer_path))
  official_sampler = gm.text.Gemma4Sampler(
      model=official,
      params=params,
      tokenizer=official_tokenizer,
      cache_length=256,
      max_out_length=NEW_TOKENS + 8,
  )
  expected = official_sampler.sample(
      list(PROMPTS), max_new_tokens=NEW_TOKENS, return_state=True
  )
  expected = np.asarray(expected.state.predicted_tokens)

  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  ours = sampler.generate(list(PROMPTS), max_new_tokens=NEW_TOKENS)

  for row, tokens in enumerate(ours.tokens):
    official_row = expected[row][: len(tokens)].tolist()
    assert tokens == official_row, f'prompt {row} differs'
    if len(tokens) < NEW_TOKENS:
      # The official output is zero after its stop token.
      assert expected[row][len(tokens)] == 0
  assert min(len(t) for t in ours.tokens) > cfg.sliding_window


@pytest.mark.parametrize('family', ('e2b_like', '26b_a4b_like'))
def test_batch_rows_match_single_prompts(family, gemma4_tokenizer):
  cfg, _, params = full_vocab_model(family)
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  batch = sampler.generate(list(PROMPTS), max_new_tokens=24)
  for row, prompt in enumerate(PROMPTS):
    alone = sampler.generate([prompt], max_new_tokens=24)
    assert alone.tokens[0] == batch.tokens[row], f'prompt {row} differs'


@pytest.mark.parametrize('family', ('26b_a4b_like', '31b_like'))
def test_value_only_cache_matches_keys_and_values(family):
  """Keys-equal-values layers cache only V; keys rebuilt as RoPE(V * scale)."""
  cfg = oracle.SMALL_CONFIGS[family]
  model = Transformer(config=cfg, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 30)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)['params']
  step = jax.jit(
      functools.partial(model.apply, method=Transformer.cached),
      static_argnames=('mode', 'last_only'),
  )

  logits = {}
  nbytes = {}
  for values_only in (True, False):
    cache = cache_lib.init_cache(
        cfg, 2, 40, jnp.float32, values_only_for_k_eq_v=values_only
    )
    nbytes[values_only] = cache.nbytes()
    outputs = []
    out, cache = step(
        {'params': params}, tokens[:, :20], cache, mode='fresh',
        last_only=False,
    )
    outputs.append(out)
    for t in range(20, 30):
      out, cache = step(
          {'params': params}, tokens[:, t : t + 1], cache, mode='extend',
          last_only=False,
      )
      outputs.append(out)
    logits[values_only] = np.concatenate(outputs, axis=1)

  np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5)
  global_layers = [i for i in range(cfg.num_layers) if cfg.layer_k_eq_v(i)]
  global_kv_bytes = sum(
      2 * 40 * cfg.num_global_kv_heads * cfg.global_head_dim * 4
      for _ in global_layers
  )
  assert nbytes[False] - nbytes[True] == global_kv_bytes


def test_cache_keeps_only_what_attention_needs():
  cfg = oracle.E2B_LIKE
  cache = cache_lib.init_cache(cfg, batch_size=3, cache_length=100)
  for i, layer in enumerate(cache.layers):
    if cfg.is_kv_shared(i):
      assert layer is None, f'KV-shared layer {i} has a cache'
      continue
    slots = layer.values.shape[1]
    if cfg.layer_kinds[i].value == 'local':
      assert slots == cfg.sliding_window, f'layer {i} has {slots} slots'
    else:
      assert slots == 100, f'global layer {i} has {slots} slots'
  moe = cache_lib.init_cache(oracle.MOE_LIKE, batch_size=1, cache_length=50)
  for i, layer in enumerate(moe.layers):
    assert (layer.keys is None) == oracle.MOE_LIKE.layer_k_eq_v(i)


def test_prompt_longer_than_cache_rejected(gemma4_tokenizer):
  cfg, _, params = full_vocab_model('31b_like')
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  with pytest.raises(ValueError) as info:
    sampler.generate([PROMPTS[0]], max_new_tokens=30, cache_length=32)
  message = str(info.value)
  prompt_length = len(gemma4_tokenizer.encode(PROMPTS[0], add_bos=True))
  assert f'prompt of {prompt_length} tokens' in message
  assert 'max_new_tokens=30' in message
  assert 'holds 32' in message


def test_second_turn_reuses_cache(gemma4_tokenizer):
  """Continuing from the state equals generating on the whole history."""
  cfg, _, params = full_vocab_model('e4b_like')
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  first = sampler.generate(
      [PROMPTS[0]], max_new_tokens=12, cache_length=200
  )
  second = sampler.generate(
      [PROMPTS[2]], max_new_tokens=12, state=first.state
  )

  history = (
      gemma4_tokenizer.encode(PROMPTS[0], add_bos=True)
      + first.tokens[0]
      + gemma4_tokenizer.encode(PROMPTS[2], add_bos=False)
  )
  fresh = sampler.generate([history], max_new_tokens=12)
  assert second.tokens[0] == fresh.tokens[0]


def test_sampling_options(gemma4_tokenizer):
  cfg, _, params = full_vocab_model('31b_like')
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  greedy = sampler.generate([PROMPTS[0]], max_new_tokens=10).tokens[0]
  top1 = sampler.generate(
      [PROMPTS[0]], max_new_tokens=10,
      sampling=SamplingParams(temperature=1.0, top_k=1), seed=3,
  ).tokens[0]
  tiny_p = sampler.generate(
      [PROMPTS[0]], max_new_tokens=10,
      sampling=SamplingParams(temperature=1.0, top_p=1e-6), seed=4,
  ).tokens[0]
  hot = SamplingParams(temperature=2.0, top_k=50)
  seeded = [
      sampler.generate([PROMPTS[0]], max_new_tokens=10, sampling=hot,
                       seed=seed).tokens[0]
      for seed in (7, 7, 8)
  ]

  assert top1 == greedy
  assert tiny_p == greedy
  assert seeded[0] == seeded[1]
  assert seeded[0] != seeded[2]


def test_stream_yields_generated_tokens(gemma4_tokenizer):
  cfg, _, params = full_vocab_model('31b_like')
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  streamed = [
      int(tokens[0])
      for tokens, active in sampler.stream([PROMPTS[1]], max_new_tokens=9)
      if active[0]
  ]
  generated = sampler.generate([PROMPTS[1]], max_new_tokens=9).tokens[0]
  assert streamed == generated
  assert len(generated) == 9


def test_stop_string_ends_row(gemma4_tokenizer):
  cfg, _, params = full_vocab_model('31b_like')
  sampler = Sampler(
      Transformer(config=cfg, dtype=jnp.float32), params, gemma4_tokenizer
  )
  full = sampler.generate([PROMPTS[0]], max_new_tokens=20)
  stop = gemma4_tokenizer.decode(full.tokens[0][:5])[-2:]
  stopped = sampler.generate(
      [PROMPTS[0]], max_new_tokens=20, stop_strings=[stop]
  )
  assert stop in stopped.texts[0]
  assert len(stopped.tokens[0]) <= 5
  assert stopped.tokens[0] == full.tokens[0][: len(stopped.tokens[0])]
