"""Decoder logits of prompts with images equal the official `gemma` 4.0.1 model.

Two small random models, one per vision family: an E2B-like decoder (PLE, KV
sharing, causal everywhere) with a clipped-linear tower, and a 31B-like
decoder (keys equal values, bidirectional image attention in sliding layers)
with a standardised tower. Row 0 of the batch has a 4000×300 panorama and a
32×32 icon, row 1 a 360×640 portrait. The official model takes one row per
call, with its encoder's `output_length` equal to the soft-token budget.

The test vocabulary has 512 pieces, so the image delimiters get ids inside
it. The official model finds images by the placeholder id alone. It would
also drop logits after each `<|image>` (id 255999) by a fixed soft-token
count per image. These ids avoid that, so it returns every position's logits.
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax import attention as attention_lib
from gemma4_jax.sampling import cache as cache_lib
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import merge, preprocess
from tests import oracle
from tests.test_vision_encoder import FAMILIES, mixed_images, official_encoder
from tests.test_vision_encoder import random_params

# In-vocabulary stand-ins for `<|image|>`, `<|image>`, `<image|>` and `\n\n`.
IMAGE_IDS = dict(
    image_token=500, start_of_image=501, end_of_image=502, double_newline=108
)
MODELS = {
    'e2b_like': (oracle.E2B_LIKE, FAMILIES['e2b_e4b_like']),
    '31b_like': (oracle.DENSE_LIKE, FAMILIES['26b_31b_like']),
}
BUDGETS = (70, 140)


def with_vision(name):
  text_config, vision_config = MODELS[name]
  return dataclasses.replace(text_config, vision=vision_config)


def official_vision_model(name, budget):
  from gemma.gm.nn.gemma4 import _gemma4

  text_config, vision_config = MODELS[name]
  config = dataclasses.replace(
      oracle.official_config(text_config),
      vision_encoder=official_encoder(vision_config, budget),
  )
  return _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=config, dtype=jnp.float32, text_only=False
  )


def official_images(images: preprocess.ImageBatch, rows: slice):
  from gemma.gm.nn.gemma4 import _transformer

  patches = images.patches[rows]
  positions = images.positions_xy[rows]
  return _transformer.PreprocessedVisionInput(
      patches=jnp.asarray(patches).reshape(1, -1, patches.shape[-1]),
      positions_xy=jnp.asarray(positions).reshape(1, -1, 2),
      soft_token_counts=images.soft_token_counts[rows],
  )


def prompt_rows(rng):
  """Two rows of text ids with image marks: two images, then one."""
  text = lambda n: rng.integers(3, 400, n).tolist()
  mark = IMAGE_IDS['image_token']
  return [
      [2, *text(5), mark, *text(4), mark, *text(6)],
      [2, *text(3), mark, *text(9)],
  ]


def expanded_batch(budget):
  """Tokens [2, T] with placeholder runs, and the images of both rows.

  Row 0 shows the panorama and the icon, row 1 the portrait.
  """
  panorama, portrait, icon = mixed_images()
  images = preprocess.preprocess_images([panorama, icon, portrait], budget)
  rows = prompt_rows(np.random.default_rng(budget))
  padded = np.zeros((2, max(map(len, rows))), np.int32)
  for i, row in enumerate(rows):
    padded[i, : len(row)] = row
  counts = images.soft_token_counts
  tokens = merge.expand_image_placeholders(
      padded, [counts[:2], counts[2:]], **IMAGE_IDS
  )
  return tokens, images


def lively_params(shapes, seed=1):
  """Random parameters for every path; layer skip scales stay near one."""
  params = random_params(shapes, seed)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for name in flat:
    if name.endswith('skip_scale'):
      flat[name] = jnp.ones_like(flat[name])
  return flax.traverse_util.unflatten_dict(flat, sep='/')


@functools.cache
def official_setup(name, budget):
  tokens, images = expanded_batch(budget)
  official = official_vision_model(name, budget)
  row_tokens = jnp.asarray(tokens[:1])
  shapes = jax.eval_shape(
      lambda: official.init(
          jax.random.key(0), row_tokens, images=official_images(images, slice(0, 2))
      )
  )
  params = lively_params(shapes['params'])
  expected = official_logits(official, params, tokens, images)
  return tokens, images, official, params, expected


def official_logits(official, params, tokens, images):
  """Official logits of each row [T_b, V], one call per row."""
  row_images = (slice(0, 2), slice(2, 3))
  outputs = []
  for row, image_rows in enumerate(row_images):
    length = int(np.sum(tokens[row] != 0))
    out = jax.jit(official.apply)(
        {'params': params},
        jnp.asarray(tokens[row : row + 1, :length]),
        images=official_images(images, image_rows),
    )
    outputs.append(np.asarray(out.logits[0]))
  return outputs


def assert_close(ours, official):
  bound = 1e-4 * max(1.0, float(np.abs(official).max()))
  error = float(np.abs(np.asarray(ours) - official).max())
  assert error <= bound, f'max |ours - official| = {error:.3g} > {bound:.3g}'


@pytest.mark.parametrize('budget', BUDGETS)
@pytest.mark.parametrize('name', tuple(MODELS))
def test_logits_match_official(name, budget):
  tokens, images, _, params, expected = official_setup(name, budget)

  model = Transformer(config=with_vision(name), dtype=jnp.float32)
  out = jax.jit(model.apply)({'params': params}, jnp.asarray(tokens),
                             images=(images.patches, images.positions_xy))

  assert out.logits.dtype == jnp.float32
  for row, row_expected in enumerate(expected):
    assert np.abs(row_expected).max() > 1.0
    assert_close(out.logits[row, : len(row_expected)], row_expected)


@pytest.mark.parametrize('name', tuple(MODELS))
def test_prefill_logits_match_official(name):
  """The cached path (one fresh chunk) gives the official logits too."""
  budget = 70
  tokens, images, _, params, expected = official_setup(name, budget)

  cfg = with_vision(name)
  model = Transformer(config=cfg, dtype=jnp.float32)
  cache = cache_lib.init_cache(cfg, 2, 512, jnp.float32)
  logits, _ = model.apply(
      {'params': params},
      jnp.asarray(tokens),
      cache,
      mode='fresh',
      last_only=False,
      images=images,
      method=Transformer.cached,
  )
  for row, row_expected in enumerate(expected):
    assert_close(logits[row, : len(row_expected)], row_expected)


def test_causal_image_attention_differs_from_official():
  """The parity above needs the bidirectional image mask of the 31B family."""
  tokens, images, _, params, expected = official_setup('31b_like', 70)
  causal = dataclasses.replace(with_vision('31b_like'), vision_bidirectional=False)
  out = Transformer(config=causal, dtype=jnp.float32).apply(
      {'params': params}, jnp.asarray(tokens), images=images
  )
  row_expected = expected[0]
  error = np.abs(np.asarray(out.logits[0, : len(row_expected)]) - row_expected)
  assert error.max() > 1e-2 * np.abs(row_expected).max()


def test_long_prefill_with_image_matches_official():
  """A first chunk over 1024 tokens with an image in a bidirectional model."""
  name = '31b_like'
  budget = 70
  _, images, official, params, _ = official_setup(name, budget)
  rng = np.random.default_rng(3)
  mark = IMAGE_IDS['image_token']
  row = [2, *rng.integers(3, 400, 600).tolist(), mark,
         *rng.integers(3, 400, 500).tolist()]
  portrait = slice(2, 3)
  tokens = merge.expand_image_placeholders(
      np.asarray([row]), [images.soft_token_counts[portrait]], **IMAGE_IDS
  )
  out = jax.jit(official.apply)(
      {'params': params}, jnp.asarray(tokens),
      images=official_images(images, portrait),
  )
  expected = np.asarray(out.logits[0])

  cfg = with_vision(name)
  model = Transformer(config=cfg, dtype=jnp.float32)
  length = tokens.shape[1]
  padded_length = -(-length // 64) * 64
  padded = np.zeros((1, padded_length), np.int32)
  padded[0, :length] = tokens[0]
  assert attention_lib.prefill_block((1, padded_length, 4, 16)) is not None
  cache = cache_lib.init_cache(cfg, 1, padded_length, jnp.float32)
  logits, _ = jax.jit(
      functools.partial(model.apply, method=Transformer.cached),
      static_argnames=('mode', 'last_only'),
  )(
      {'params': params}, jnp.asarray(padded), cache, mode='fresh',
      last_only=False,
      images=(images.patches[portrait], images.positions_xy[portrait]),
  )
  assert_close(logits[0, :length], expected)


def test_text_only_tree_has_no_vision_params():
  cfg = oracle.DENSE_LIKE
  tokens = jnp.ones((1, 4), jnp.int32)
  text_tree = jax.eval_shape(
      lambda: Transformer(config=cfg).init(jax.random.key(0), tokens)
  )['params']
  vision_tree = jax.eval_shape(
      lambda: Transformer(config=with_vision('31b_like')).init(
          jax.random.key(0), tokens
      )
  )['params']
  assert 'vision_encoder' not in text_tree
  assert 'mm_input_projection' not in text_tree['embedder']
  assert set(vision_tree) - set(text_tree) == {'vision_encoder'}
  w = vision_tree['embedder']['mm_input_projection']['w']
  assert w.shape == (FAMILIES['26b_31b_like'].embed_dim, cfg.embed_dim)
  assert all(
      leaf.dtype == jnp.float32
      for leaf in jax.tree.leaves(vision_tree['vision_encoder'])
  )
  assert w.dtype == jnp.float32


def test_param_tree_matches_official():
  _, _, _, params, _ = official_setup('e2b_like', 70)
  ours = jax.eval_shape(
      lambda: Transformer(config=with_vision('e2b_like'), dtype=jnp.float32)
      .init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )['params']
  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert describe(ours) == describe(params)


def test_images_without_vision_config_raise():
  model = Transformer(config=oracle.DENSE_LIKE, dtype=jnp.float32)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
  images = preprocess.preprocess_images(mixed_images()[2:], 70)
  with pytest.raises(ValueError, match='no vision encoder'):
    model.apply(params, tokens, images=images)
