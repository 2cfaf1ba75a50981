"""The vision encoder equals the official `gemma` 4.0.1 implementation.

Each family gets a small random tower: clipped linears as in E2B/E4B, or a
standardised output as in 26B-A4B/31B. Its parameters have the official tree
and random values chosen so that every path matters. Both encoders run on the
same batch (a 4000×300 panorama, a portrait and a 32×32 icon) at two
soft-token budgets. The official encoder is built with `output_length` equal
to the budget, the only setting in which its pooling uses 3×3 blocks.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.vision import encoder as encoder_lib
from gemma4_jax.vision import preprocess
from tests import oracle

# Small towers, one per family. The 26B/31B-like one has head_dim 10, so the
# 2-D RoPE splits each head unevenly (4 channels by column, 6 by row).
FAMILIES = {
    'e2b_e4b_like': encoder_lib.VisionConfig(
        embed_dim=32, num_layers=2, num_heads=4, hidden_dim=48,
        clipped_linears=True,
    ),
    '26b_31b_like': encoder_lib.VisionConfig(
        embed_dim=40, num_layers=2, num_heads=4, hidden_dim=64,
        standardize=True,
    ),
}
BUDGETS = (70, 140)


def official_encoder(cfg: encoder_lib.VisionConfig, budget: int):
  from gemma.gm.nn.gemma4.vision import _encoder

  return _encoder.VisionEncoder(
      d_model=cfg.embed_dim,
      num_layers=cfg.num_layers,
      num_heads=cfg.num_heads,
      ffw_hidden=cfg.hidden_dim,
      output_length=budget,
      use_clipped_linears=cfg.clipped_linears,
      standardize_embeddings=cfg.standardize,
  )


def mixed_images():
  rng = np.random.default_rng(0)
  return [
      rng.integers(0, 256, (300, 4000, 3), np.uint8),  # panorama
      rng.integers(0, 256, (640, 360, 3), np.uint8),  # portrait
      rng.integers(0, 256, (32, 32, 3), np.uint8),  # icon
  ]


def random_params(shapes, seed: int = 1):
  """Random values for a tree of parameter shapes, so every path matters.

  Official init leaves norm scales at zero, clip bounds at ±inf and weights
  tiny. Here scales are 1 ± 0.3, standardisation biases ±0.3, clip bounds
  finite (inputs ±3, outputs ±2) and weights of stddev 0.1 (position table
  0.2), which gives soft tokens of magnitude 10-40.
  """
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in flax.traverse_util.flatten_dict(shapes, sep='/').items():
    leaf = name.rsplit('/', 1)[-1]
    noise = rng.standard_normal(shape.shape).astype(np.float32)
    if leaf.startswith('clip_'):
      bound = 3.0 if 'input' in leaf else 2.0
      out[name] = jnp.full(shape.shape, -bound if 'min' in leaf else bound)
    elif leaf == 'scale':
      out[name] = 1.0 + 0.3 * noise
    elif leaf == 'bias':
      out[name] = 0.3 * noise
    elif leaf == 'pos_emb':
      out[name] = 0.2 * noise
    else:
      out[name] = 0.1 * noise
  out = {name: jnp.asarray(value, jnp.float32) for name, value in out.items()}
  return flax.traverse_util.unflatten_dict(out, sep='/')


def random_params_for(module, *inputs, method=None, seed: int = 1):
  """Random parameters for `module`'s tree (shapes from `eval_shape`)."""
  shapes = jax.eval_shape(
      lambda: module.init(jax.random.key(0), *inputs, method=method)
  )
  return random_params(shapes['params'], seed)


def assert_close(ours, official, where=None):
  ours, official = np.asarray(ours), np.asarray(official)
  if where is not None:
    ours, official = ours[where], official[where]
  bound = 1e-4 * max(1.0, float(np.abs(official).max()))
  error = float(np.abs(ours - official).max())
  assert error <= bound, f'max |ours - official| = {error:.3g} > {bound:.3g}'


@pytest.fixture(scope='module', params=BUDGETS, ids=lambda b: f'budget{b}')
def batch(request):
  return request.param, preprocess.preprocess_images(
      mixed_images(), request.param
  )


@pytest.mark.parametrize('family', FAMILIES)
def test_param_tree_matches_official(family):
  cfg = FAMILIES[family]
  patches = jnp.zeros((1, 630, cfg.patch_dim))
  positions = jnp.full((1, 630, 2), -1, jnp.int32)

  init = lambda model: jax.eval_shape(
      lambda: model.init(jax.random.key(0), patches, positions)
  )['params']

  official = init(official_encoder(cfg, 70))
  ours = init(encoder_lib.VisionEncoder(cfg))

  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert describe(ours) == describe(official)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(ours))


@pytest.mark.parametrize('preset', tuple(encoder_lib.VISION_PRESETS))
def test_preset_param_tree_matches_official(preset):
  from gemma import gm

  classes = {
      'e2b': gm.nn.Gemma4_E2B,
      'e4b': gm.nn.Gemma4_E4B,
      '26b_a4b': gm.nn.Gemma4_26B_A4B,
      '31b': gm.nn.Gemma4_31B,
  }
  official = classes[preset].config.vision_encoder
  cfg = encoder_lib.VISION_PRESETS[preset]
  # The released towers pool to 280 tokens, so they need 280 * 9 patches.
  patches = jnp.zeros((1, 280 * 9, cfg.patch_dim))
  positions = jnp.full((1, 280 * 9, 2), -1, jnp.int32)
  init = lambda model: jax.eval_shape(
      lambda: model.init(jax.random.key(0), patches, positions)
  )['params']

  describe = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  ours = init(encoder_lib.VisionEncoder(cfg))
  assert describe(ours) == describe(init(official))


@pytest.mark.parametrize('family', FAMILIES)
def test_soft_tokens_match_official(family, batch):
  budget, images = batch
  cfg = FAMILIES[family]
  patches = jnp.asarray(images.patches)
  positions = jnp.asarray(images.positions_xy)
  official = official_encoder(cfg, budget)
  params = random_params_for(official, patches, positions)

  ((expected, expected_mask),) = jax.jit(official.apply)(
      {'params': params}, patches, positions
  )
  tokens, is_token = jax.jit(encoder_lib.VisionEncoder(cfg).apply)(
      {'params': params}, patches, positions
  )

  assert tokens.dtype == jnp.float32
  assert tokens.shape == (3, budget, cfg.embed_dim)
  np.testing.assert_array_equal(is_token, expected_mask)
  assert is_token.sum(axis=1).tolist() == list(images.soft_token_counts)
  real_tokens = np.asarray(expected)[np.asarray(expected_mask)]
  assert float(np.abs(real_tokens).max()) > 5.0
  assert_close(tokens, expected, where=np.asarray(expected_mask))


def test_clip_bounds_change_official_output():
  """The clip bounds of `random_params` are reached, so parity covers clips."""
  cfg = FAMILIES['e2b_e4b_like']
  images = preprocess.preprocess_images(mixed_images()[2:], 70)
  patches = jnp.asarray(images.patches)
  positions = jnp.asarray(images.positions_xy)
  official = official_encoder(cfg, 70)
  params = random_params_for(official, patches, positions)
  unclipped = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.sign(x) * jnp.inf if 'clip_' in str(path[-1]) else x,
      params,
  )

  ((clipped_out, mask),) = official.apply(
      {'params': params}, patches, positions
  )
  ((free_out, _),) = official.apply({'params': unclipped}, patches, positions)

  difference = np.abs(np.asarray(clipped_out) - np.asarray(free_out))
  difference = difference[np.asarray(mask)]
  assert difference.max() > 0.1


@pytest.mark.parametrize('family', FAMILIES)
def test_text_embedding_path_matches_official(family):
  """Encoder, token selection and projection equal `_encode_vision`."""
  from gemma.gm.nn.gemma4 import _gemma4
  from gemma.gm.nn.gemma4 import _transformer

  budget = 140
  images = preprocess.preprocess_images(mixed_images(), budget)
  cfg = FAMILIES[family]
  text_config = dataclasses.replace(
      oracle.official_config(oracle.DENSE_LIKE),
      vision_encoder=official_encoder(cfg, budget),
  )
  model = _gemma4._Gemma4Base(  # pylint: disable=protected-access
      config=text_config, dtype=jnp.float32, text_only=False
  )
  vision_input = _transformer.PreprocessedVisionInput(
      patches=jnp.asarray(images.patches).reshape(1, -1, cfg.patch_dim),
      positions_xy=jnp.asarray(images.positions_xy).reshape(1, -1, 2),
      soft_token_counts=images.soft_token_counts,
  )
  # pylint: disable-next=protected-access
  encode = lambda module, inputs: module._encode_vision(inputs)
  params = random_params_for(model, vision_input, method=encode)

  expected = model.apply({'params': params}, vision_input, method=encode)[0]

  tokens, _ = encoder_lib.VisionEncoder(cfg).apply(
      {'params': params['vision_encoder']},
      jnp.asarray(images.patches),
      jnp.asarray(images.positions_xy),
  )
  flat = encoder_lib.concatenate_soft_tokens(tokens, images.soft_token_counts)
  projection = encoder_lib.SoftTokenProjection(
      cfg.embed_dim, oracle.DENSE_LIKE.embed_dim
  )
  embedded = projection.apply(
      {'params': params['embedder']['mm_input_projection']}, flat
  )

  assert embedded.shape == expected.shape
  assert embedded.dtype == jnp.float32
  assert_close(embedded, expected)


def test_projection_params_match_official():
  from gemma.gm.nn.gemma4 import _modules

  official = _modules.Embedder(vocab_size=16, embed_dim=24, vision_proj_dim=40)
  x = jnp.ones((1, 1, 5, 40))
  expected = jax.eval_shape(
      lambda: official.init(jax.random.key(0), x, method='encode_vision')
  )
  ours = jax.eval_shape(
      lambda: encoder_lib.SoftTokenProjection(40, 24).init(jax.random.key(0), x)
  )

  assert jax.tree.map(jnp.shape, ours['params']) == jax.tree.map(
      jnp.shape, expected['params']['mm_input_projection']
  )


def test_bfloat16_params_compute_in_float32():
  cfg = FAMILIES['26b_31b_like']
  images = preprocess.preprocess_images(mixed_images()[2:], 70)
  patches = jnp.asarray(images.patches)
  positions = jnp.asarray(images.positions_xy)
  model = encoder_lib.VisionEncoder(cfg)
  params = random_params_for(model, patches, positions)
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), as_bf16)

  tokens, _ = model.apply({'params': as_bf16}, patches, positions)
  reference, _ = model.apply({'params': as_f32}, patches, positions)

  assert tokens.dtype == jnp.float32
  np.testing.assert_array_equal(tokens, reference)


def test_mask_padding_ignores_padding_length():
  """With `mask_padding`, extra padding patches leave soft tokens unchanged."""
  cfg = FAMILIES['e2b_e4b_like']
  icon = preprocess.preprocess_images(mixed_images()[2:], 70)
  count = icon.soft_token_counts[0]
  params = random_params_for(
      encoder_lib.VisionEncoder(cfg), icon.patches, icon.positions_xy
  )

  # The same image padded to 140 * 9 patches in place of 70 * 9.
  patches = np.zeros((1, 140 * 9, cfg.patch_dim), np.float32)
  positions = np.full((1, 140 * 9, 2), -1, np.int32)
  patches[:, : 70 * 9] = icon.patches
  positions[:, : 70 * 9] = icon.positions_xy

  def padding_effect(mask_padding: bool) -> tuple[float, float]:
    model = encoder_lib.VisionEncoder(
        dataclasses.replace(cfg, mask_padding=mask_padding)
    )
    short, _ = model.apply({'params': params}, icon.patches, icon.positions_xy)
    long, _ = model.apply({'params': params}, patches, positions)
    change = np.abs(np.asarray(long[0, :count]) - np.asarray(short[0, :count]))
    return float(change.max()), float(np.abs(short[0, :count]).max())

  masked_change, scale = padding_effect(mask_padding=True)
  unmasked_change, _ = padding_effect(mask_padding=False)

  # Masked, only the summation order differs.
  assert masked_change <= 1e-5 * scale
  assert unmasked_change > 1e-2 * scale


def test_position_outside_table_gives_nan():
  table = jnp.ones((4, 2, 3))
  positions = jnp.array([[[0, 0], [3, 1], [-1, -1], [4, 0]]])
  embedding = np.asarray(encoder_lib.position_embedding(table, positions))
  assert np.isfinite(embedding[0, :2]).all()
  np.testing.assert_array_equal(embedding[0, 2], 0.0)
  assert np.isnan(embedding[0, 3]).all()


def test_bad_patch_count_rejected():
  cfg = FAMILIES['e2b_e4b_like']
  model = encoder_lib.VisionEncoder(cfg)
  with pytest.raises(ValueError, match='not a multiple of 9'):
    model.init(
        jax.random.key(0),
        jnp.zeros((1, 100, cfg.patch_dim)),
        jnp.zeros((1, 100, 2), jnp.int32),
    )
