"""Input checks of the decoder and invariants that need no oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.transformer import Transformer
from tests import oracle


@pytest.fixture(scope='module')
def model_and_params():
  cfg = oracle.DENSE_LIKE
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  return model, params


def test_one_dimensional_tokens_rejected(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match=r'\[batch, length\].*tokens\[None\]'):
    model.apply(params, jnp.ones((5,), jnp.int32))


def test_float_tokens_rejected(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match='integer ids.*astype'):
    model.apply(params, jnp.ones((1, 5), jnp.float32))


def test_padding_does_not_change_valid_logits(model_and_params):
  """A row's logits do not depend on the padding after it or on other rows."""
  model, params = model_and_params
  rng = np.random.default_rng(0)
  short = rng.integers(1, 512, (1, 13)).astype(np.int32)
  batch = rng.integers(1, 512, (3, 29)).astype(np.int32)
  batch[1, :13] = short[0]
  batch[1, 13:] = 0

  alone = model.apply(params, jnp.asarray(short)).logits
  in_batch = model.apply(params, jnp.asarray(batch)).logits

  np.testing.assert_allclose(
      np.asarray(in_batch[1, :13]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize(
    'name, shape',
    [
        ('positions', (4,)),
        ('input_mask', (1, 5)),
        ('segment_ids', (1, 3)),
        ('attention_mask', (1, 4)),
    ],
)
def test_optional_input_shape_checked(model_and_params, name, shape):
  model, params = model_and_params
  value = jnp.zeros(shape, jnp.int32)
  with pytest.raises(ValueError, match=f'{name} must have shape'):
    model.apply(params, jnp.ones((1, 4), jnp.int32), **{name: value})


@pytest.mark.parametrize(
    'changes, field',
    [
        (dict(num_kv_heads=0), 'num_kv_heads'),
        (dict(num_heads=0), 'num_heads'),
        (dict(sliding_window=0), 'sliding_window'),
        (dict(final_logit_softcap=0.0), 'final_logit_softcap'),
        (dict(attention_pattern=()), 'attention_pattern'),
        (dict(global_rope_proportion=1.5), 'global_rope_proportion'),
        (dict(experts_per_token=2), 'experts_per_token'),
    ],
)
def test_invalid_config_field_named(changes, field):
  with pytest.raises(ValueError, match=field):
    oracle.small_config('31b_like', **changes)
