"""The decode-speed code paths, checked against the official model.

A decode step multiplies weights in chunks (`layers.streamed_einsum`),
attends with block-diagonal products (`attention._attend_one_token`) and
rebuilds the keys of keys-equal-values global layers from a shared RoPE table
(`layers.apply_rope_by_slot`). With the small test models the weights are
below one chunk, so these tests shrink the chunk size until every projection
goes through the chunked loop. They then compare each decode step's logits
with the official model's forward pass over the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import attention
from gemma4_jax import layers
from gemma4_jax.sampling import cache as cache_lib
from gemma4_jax.transformer import Transformer
from tests import oracle
from tests.test_parity import perturbed_official_params

PROMPT, STEPS = 20, 12


def cached_logits(cfg, params, tokens, dtype):
  """Logits [B, T, V] of a prefill of PROMPT tokens, then one-token steps."""
  model = Transformer(config=cfg, dtype=dtype)
  step = jax.jit(
      functools.partial(model.apply, method=Transformer.cached),
      static_argnames=('mode', 'last_only'),
  )
  batch, length = tokens.shape
  cache = cache_lib.init_cache(cfg, batch, length, dtype)
  out, cache = step(
      {'params': params}, tokens[:, :PROMPT], cache, mode='fresh',
      last_only=False,
  )
  outputs = [out]
  for t in range(PROMPT, length):
    out, cache = step(
        {'params': params}, tokens[:, t : t + 1], cache, mode='extend',
        last_only=False,
    )
    outputs.append(out)
  return np.concatenate([np.asarray(o, np.float32) for o in outputs], axis=1)


@pytest.mark.parametrize('family', ('31b_like', 'e2b_like'))
@pytest.mark.parametrize(
    'mode, chunk_bytes', (('chunked', 256), ('chunked', 4096), ('padded', 256))
)
def test_chunked_decode_steps_match_official_forward(
    family, mode, chunk_bytes, monkeypatch
):
  # Two KV heads everywhere, so that the global layer also takes the
  # block-diagonal attention (the 31B-like test model has one).
  cfg = dataclasses.replace(
      oracle.SMALL_CONFIGS[family], num_global_kv_heads=2
  )
  monkeypatch.setattr(layers, 'STREAM_CHUNK_BYTES', chunk_bytes)
  monkeypatch.setattr(layers, 'SINGLE_ROW_PRODUCT', mode)
  params = perturbed_official_params(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(
      rng.integers(1, cfg.vocab_size, (2, PROMPT + STEPS)), jnp.int32
  )
  official = oracle.official_model(cfg, jnp.float32).apply(
      {'params': params}, tokens
  )
  expected = np.asarray(official.logits, np.float32)
  ours = cached_logits(cfg, params, tokens, jnp.float32)
  bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(ours - expected).max())
  assert error <= bound, f'max |ours - official| = {error:.3g} > {bound:.3g}'


@pytest.mark.parametrize('mode', ('chunked', 'padded'))
def test_bfloat16_decode_steps_match_official_forward(mode, monkeypatch):
  """In bfloat16 the streamed steps stay as close to the official forward
  pass as our own unstreamed forward pass is."""
  cfg = dataclasses.replace(oracle.DENSE_LIKE, num_global_kv_heads=2)
  monkeypatch.setattr(layers, 'STREAM_CHUNK_BYTES', 512)
  monkeypatch.setattr(layers, 'SINGLE_ROW_PRODUCT', mode)
  params = jax.tree.map(
      lambda x: x.astype(jnp.bfloat16), perturbed_official_params(cfg)
  )
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(
      rng.integers(1, cfg.vocab_size, (2, PROMPT + STEPS)), jnp.int32
  )
  official = oracle.official_model(cfg, jnp.bfloat16).apply(
      {'params': params}, tokens
  )
  expected = np.asarray(official.logits, np.float32)
  forward = Transformer(config=cfg, dtype=jnp.bfloat16).apply(
      {'params': params}, tokens
  )
  forward_error = np.abs(np.asarray(forward.logits, np.float32) - expected)
  ours = cached_logits(cfg, params, tokens, jnp.bfloat16)
  error = np.abs(ours - expected)
  scale = float(np.abs(expected).max())
  # bfloat16 has 8 significant bits: a few units of 2**-8 of the logit scale.
  assert float(error.max()) <= max(2 * float(forward_error.max()),
                                   0.05 * scale)
  assert float(error.mean()) <= 2 * float(forward_error.mean()) + 1e-3 * scale


@pytest.mark.parametrize(
    'equation, x_shape, w_shape',
    [
        ('BTD,NDH->BTNH', (1, 1, 32), (4, 32, 16)),
        ('BSD,CKDH->CBSKH', (1, 1, 32), (2, 3, 32, 16)),
        ('BTNH,NHD->BTD', (1, 1, 4, 16), (4, 16, 32)),
        ('...D,CFD->...CF', (1, 1, 32), (2, 64, 32)),
        ('...F,FD->...D', (1, 1, 64), (64, 32)),
        ('BTD,VD->BTV', (1, 1, 32), (96, 32)),
        ('BTD,DLP->BTLP', (1, 1, 32), (32, 3, 8)),
        ('BTD,VD->BTV', (3, 5, 32), (96, 32)),
        ('...D,CFD->...CF', (2, 7, 32), (2, 64, 32)),
        ('BTD,NDH->BTNH', (2, 3, 32), (4, 32, 16)),
    ],
)
@pytest.mark.parametrize('dtype', (jnp.float32, jnp.bfloat16))
def test_streamed_einsum_is_a_float32_einsum(equation, x_shape, w_shape,
                                             dtype):
  """Every equation the model uses, one row (chunked) and several (not)."""
  x = jax.random.normal(jax.random.key(0), x_shape, dtype)
  w = jax.random.normal(jax.random.key(1), w_shape, dtype)
  exact = jnp.einsum(
      equation, x.astype(jnp.float32), w.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )
  for chunk_bytes, mode in (
      (64, 'chunked'), (1000, 'chunked'), (1 << 20, 'chunked'), (64, 'padded')
  ):
    out = layers.streamed_einsum(
        equation, x, w, chunk_bytes=chunk_bytes, mode=mode
    )
    assert out.dtype == dtype
    assert out.shape == exact.shape
    # float32: summation order only; bfloat16: one rounding of the result.
    tolerance = 1e-5 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(exact),
        rtol=tolerance, atol=tolerance * float(jnp.abs(exact).max()),
    )


# KV-shared layers (E2B-like) and keys-equal-values global layers (31B-like).
@pytest.mark.parametrize('family', ('e2b_like', '31b_like'))
def test_blocked_prefill_matches_official_forward(family, monkeypatch):
  # Blocks of 8 tokens over a 48-token prompt with a window of 8: query
  # blocks see one, two or all earlier key blocks. Row 1 is right-padded.
  monkeypatch.setattr(attention, 'BLOCKED_PREFILL_MIN_LENGTH', 16)
  monkeypatch.setattr(attention, 'PREFILL_BLOCKS', (8,))
  cfg = oracle.SMALL_CONFIGS[family]
  params = perturbed_official_params(cfg)
  lengths = (48, 29)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, cfg.vocab_size, (2, 48)).astype(np.int32)
  mask = np.arange(48)[None] < np.asarray(lengths)[:, None]
  tokens = np.where(mask, tokens, 0)

  model = Transformer(config=cfg, dtype=jnp.float32)
  cache = cache_lib.init_cache(cfg, 2, 64, jnp.float32)
  logits, _ = jax.jit(
      functools.partial(model.apply, method=Transformer.cached),
      static_argnames=('mode', 'last_only'),
  )({'params': params}, jnp.asarray(tokens), cache,
    input_mask=jnp.asarray(mask), mode='fresh', last_only=False)
  assert attention.prefill_block((2, 48, cfg.num_heads, 16)) == 8

  official = oracle.official_model(cfg, jnp.float32)
  for row, length in enumerate(lengths):
    expected = np.asarray(
        official.apply({'params': params}, tokens[row : row + 1, :length])
        .logits[0], np.float32,
    )
    ours = np.asarray(logits[row, :length], np.float32)
    bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
    error = float(np.abs(ours - expected).max())
    assert error <= bound, (
        f'row {row}: max |ours - official| = {error:.3g} > {bound:.3g}'
    )


def test_auto_mode_timed_inside_trace(monkeypatch):
  monkeypatch.setattr(layers, 'SINGLE_ROW_PRODUCT', 'auto')
  monkeypatch.setattr(layers, '_timed_single_row_modes', {})
  x = jnp.ones((1, 1, 64), jnp.bfloat16)
  w = jnp.ones((4096, 64), jnp.bfloat16)
  # 512 KiB of weight in 1 KiB chunks: a one-row product, which needs a mode.
  product = jax.jit(
      lambda x, w: layers.streamed_einsum('BTD,VD->BTV', x, w, chunk_bytes=1024)
  )
  np.testing.assert_array_equal(np.asarray(product(x, w), np.float32), 64.0)
  assert layers._timed_single_row_modes[('bfloat16', 'bfloat16')] in (
      'chunked', 'padded'
  )
  monkeypatch.setattr(layers, 'SINGLE_ROW_PRODUCT', 'fast')
  with pytest.raises(ValueError, match="invalid SINGLE_ROW_PRODUCT='fast'"):
    layers.single_row_mode(jnp.float32, jnp.float32)
