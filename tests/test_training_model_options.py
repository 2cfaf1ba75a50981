"""Rematerialisation and the MoE load-balancing loss.

Gradients under each remat policy are compared with `jax.grad` of the
official `gemma` 4.0.1 model, and the memory saving is read from XLA's
memory analysis. The load-balancing loss is checked against values worked
out by hand and against its effect on routing when trained on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gemma4_jax import moe
from gemma4_jax.training import loss as loss_lib
from gemma4_jax.transformer import Transformer
from tests import oracle
from tests.test_training_step import (
    max_abs,
    max_abs_difference,
    packed_attention_mask,
    packed_batch,
    plain_cross_entropy,
)


@pytest.mark.parametrize('remat', ('dots', 'full'))
def test_remat_gradients_match_official(remat):
  cfg = oracle.SMALL_CONFIGS['e2b_like']
  official = oracle.official_model(cfg, jnp.float32)
  params = official.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  params = params['params']
  batch = {k: jnp.asarray(v) for k, v in packed_batch(cfg.vocab_size).items()}
  mask = jnp.asarray(packed_attention_mask(np.asarray(batch['segment_ids'])))

  def official_loss(p):
    logits = official.apply(
        {'params': p},
        batch['tokens'],
        positions=batch['positions'],
        attention_mask=mask,
    ).logits
    return plain_cross_entropy(logits, batch['targets'], batch['loss_weights'])

  model = Transformer(config=cfg, dtype=jnp.float32, remat=remat)

  def our_loss(p):
    return loss_lib.model_loss(model, p, batch, chunk_size=8)[0]

  expected = jax.jit(jax.grad(official_loss))(params)
  grads = jax.jit(jax.grad(our_loss))(params)
  # Without remat the difference is about 1e-5 of the largest gradient; the
  # recomputed forward pass fuses and sums in another order, about 2e-5.
  error = max_abs_difference(grads, expected)
  assert error <= 5e-5 * max(1.0, max_abs(expected)), error


def test_remat_lowers_training_memory():
  cfg = oracle.small_config('31b_like', num_layers=6)
  length = 512
  batch = {
      'tokens': jax.ShapeDtypeStruct((2, length), jnp.int32),
      'targets': jax.ShapeDtypeStruct((2, length), jnp.int32),
      'loss_weights': jax.ShapeDtypeStruct((2, length), jnp.float32),
      'positions': jax.ShapeDtypeStruct((2, length), jnp.int32),
      'segment_ids': jax.ShapeDtypeStruct((2, length), jnp.int32),
  }

  def temp_bytes(remat: str) -> int:
    model = Transformer(config=cfg, dtype=jnp.float32, remat=remat)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    )['params']
    grad = jax.jit(
        jax.grad(lambda p, b: loss_lib.model_loss(model, p, b, chunk_size=128)[0])
    )
    compiled = grad.lower(params, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  sizes = {remat: temp_bytes(remat) for remat in ('none', 'dots', 'full')}
  print({k: f'{v / 2**20:.1f} MiB' for k, v in sizes.items()})
  assert sizes['full'] < sizes['dots'] < sizes['none']
  assert sizes['full'] < 0.6 * sizes['none']


def test_unknown_remat_policy_is_named():
  model = Transformer(config=oracle.SMALL_CONFIGS['31b_like'], remat='some')
  with pytest.raises(ValueError, match="remat='some'"):
    model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))


def test_load_balancing_loss_values():
  num_experts = 4
  # Uniform probabilities: 1 whatever the assignment.
  uniform = jnp.zeros((6, num_experts))
  experts = jnp.array([[0, 1]] * 6)
  loss = moe.load_balancing_loss(uniform, experts, num_experts)
  np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)

  # Every token sends all its probability mass and both its choices to
  # experts 0 and 1: f = p = (1/2, 1/2, 0, 0), loss = 4 * 2 * 1/4 = 2.
  peaked = jnp.tile(jnp.array([[30.0, 30.0, -30.0, -30.0]]), (6, 1))
  loss = moe.load_balancing_loss(peaked, experts, num_experts)
  np.testing.assert_allclose(float(loss), 2.0, rtol=1e-6)

  # One token, k = 1, probabilities (0.7, 0.1, 0.1, 0.1), choice 0:
  # f = (1, 0, 0, 0), loss = 4 * 0.7.
  logits = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]]))
  loss = moe.load_balancing_loss(logits, jnp.array([[0]]), num_experts)
  np.testing.assert_allclose(float(loss), 2.8, rtol=1e-6)


def test_load_balancing_weight_evens_out_routing():
  """Training on the auxiliary loss alone spreads the routing."""
  cfg = oracle.SMALL_CONFIGS['26b_a4b_like']
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']
  # Skew every router towards expert 0, so the start is unbalanced.
  for name, layer in params.items():
    if name.startswith('layer_'):
      w = layer['mlp']['router_logits']['w']
      layer['mlp']['router_logits']['w'] = w.at[:, 0].add(3.0)
  batch = {k: jnp.asarray(v) for k, v in packed_batch(cfg.vocab_size).items()}

  def objective(p):
    _, metrics = loss_lib.model_loss(
        model, p, batch, chunk_size=8, load_balancing_weight=1.0
    )
    aux = metrics['objective_sum'] - metrics['loss_sum']
    return aux / metrics['weight_sum'], metrics

  grad_fn = jax.jit(jax.grad(objective, has_aux=True))
  optimizer = optax.adam(0.05)
  opt_state = optimizer.init(params)
  _, first = objective(params)
  for _ in range(15):
    grads, _ = grad_fn(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(params, updates)
  _, last = objective(params)
  print('load-balancing loss', float(first['load_balancing_loss']), '->',
        float(last['load_balancing_loss']))
  # Uniform routing gives 1; training must close most of the gap.
  start = float(first['load_balancing_loss'])
  end = float(last['load_balancing_loss'])
  assert start > 1.1
  assert end - 1.0 < 0.5 * (start - 1.0)


def test_load_balancing_weight_zero_leaves_objective():
  cfg = oracle.SMALL_CONFIGS['26b_a4b_like']
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))['params']
  batch = {k: jnp.asarray(v) for k, v in packed_batch(cfg.vocab_size).items()}
  _, plain = loss_lib.model_loss(model, params, batch, chunk_size=8)
  _, weighted = loss_lib.model_loss(
      model, params, batch, chunk_size=8, load_balancing_weight=0.01
  )
  assert 'load_balancing_loss' not in plain
  np.testing.assert_allclose(plain['objective_sum'], plain['loss_sum'])
  balance = float(weighted['load_balancing_loss'])
  assert balance > 0
  np.testing.assert_allclose(
      float(weighted['objective_sum']),
      float(plain['loss_sum'] + 0.01 * balance * plain['weight_sum']),
      rtol=1e-6,
  )
