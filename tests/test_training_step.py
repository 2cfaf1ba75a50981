"""The chunked loss and the train step against independent expectations.

Loss and gradients are compared with a plain cross-entropy on the official
`gemma` 4.0.1 model's logits. The optimizer is checked against the AdamW and
schedule formulas, and memory against the size of the logits never formed.
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.config import GLOBAL
from gemma4_jax.training import loss as loss_lib
from gemma4_jax.training import step as step_lib
from gemma4_jax.transformer import Transformer
from tests import oracle

# The 31B-like family compiles in about 20 s on a 2-core CPU; the deeper or
# MoE families take 30-45 s each, so they are marked slow.
FAMILIES = tuple(
    family if family == '31b_like'
    else pytest.param(family, marks=pytest.mark.slow)
    for family in oracle.SMALL_CONFIGS
)


def packed_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Two rows of 20 positions: packed segments, padding and zero weights.

  Row 0 contains segments of 7 and 13 tokens; row 1 segments of 9 and 6 tokens
  and 5 positions of padding. Each segment's first 3 positions (a prompt)
  and all padding have loss weight 0.
  """
  rng = np.random.default_rng(seed)
  length = 20
  layouts = ((7, 13), (9, 6))
  batch = {
      name: np.zeros((2, length), np.int32)
      for name in ('tokens', 'targets', 'positions', 'segment_ids')
  }
  batch['loss_weights'] = np.zeros((2, length), np.float32)
  for row, segments in enumerate(layouts):
    start = 0
    for segment_id, size in enumerate(segments, start=1):
      span = slice(start, start + size)
      batch['tokens'][row, span] = rng.integers(1, vocab_size, size)
      batch['targets'][row, span] = rng.integers(1, vocab_size, size)
      batch['positions'][row, span] = np.arange(size)
      batch['segment_ids'][row, span] = segment_id
      batch['loss_weights'][row, start + 3 : start + size] = 1.0
      start += size
  return batch


def packed_attention_mask(segment_ids: np.ndarray) -> np.ndarray:
  """[B, T, T]: causal, within one segment, and only between valid tokens."""
  length = segment_ids.shape[1]
  causal = np.tril(np.ones((length, length), bool))[None]
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  valid = (segment_ids != 0)[:, None, :]
  return causal & same_segment & valid


def plain_cross_entropy(logits, targets, weights):
  """Weighted mean of -log softmax(logits)[target], from full logits."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], -1)
  return -jnp.sum(target_log_probs[..., 0] * weights) / jnp.sum(weights)


def max_abs_difference(tree_a, tree_b) -> float:
  diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), tree_a, tree_b)
  return float(max(jax.tree.leaves(diffs)))


def max_abs(tree) -> float:
  return float(max(jax.tree.leaves(jax.tree.map(jnp.max, jax.tree.map(jnp.abs, tree)))))


@pytest.mark.parametrize('family', FAMILIES)
def test_loss_and_grads_match_official(family):
  cfg = oracle.SMALL_CONFIGS[family]
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

  model = Transformer(config=cfg, dtype=jnp.float32)

  def our_loss(p):
    return loss_lib.model_loss(model, p, batch, chunk_size=6)[0]

  expected_loss, expected_grads = jax.jit(jax.value_and_grad(official_loss))(
      params
  )
  loss, grads = jax.jit(jax.value_and_grad(our_loss))(params)

  assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(
      float(expected_loss)
  )
  scale = max(1.0, max_abs(expected_grads))
  assert max_abs(expected_grads) > 0
  error = max_abs_difference(grads, expected_grads)
  # Float32 rounding differs with the CPU's kernels: on an AMX CPU the
  # E2B-like gradients differ by 3.3e-5 of the largest one.
  assert error <= 1e-4 * scale, f'max |grad diff| = {error:.3g}'


@pytest.mark.parametrize('chunk_size', (1, 4, 5, 7, 12, 64))
def test_chunked_loss_equals_unchunked(chunk_size):
  batch, length, dim, vocab, cap = 3, 12, 8, 50, 5.0
  keys = jax.random.split(jax.random.key(chunk_size), 4)
  hidden = jax.random.normal(keys[0], (batch, length, dim))
  embedding = jax.random.normal(keys[1], (vocab, dim))
  targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
  weights = jax.random.uniform(keys[3], (batch, length))
  weights = weights.at[:, :3].set(0.0)

  loss, metrics = loss_lib.chunked_cross_entropy(
      hidden,
      embedding,
      targets,
      weights,
      final_logit_softcap=cap,
      chunk_size=chunk_size,
  )

  logits = jnp.tanh(hidden @ embedding.T / cap) * cap
  expected = plain_cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  np.testing.assert_allclose(
      float(metrics['weight_sum']), float(weights.sum()), rtol=1e-6
  )
  assert float(metrics['num_tokens']) == batch * (length - 3)


def test_loss_without_weighted_tokens_is_zero():
  loss, metrics = loss_lib.chunked_cross_entropy(
      jnp.ones((1, 4, 2)),
      jnp.ones((3, 2)),
      jnp.zeros((1, 4), jnp.int32),
      jnp.zeros((1, 4)),
      final_logit_softcap=None,
      chunk_size=3,
  )
  assert float(loss) == 0.0
  assert float(metrics['num_tokens']) == 0.0


def test_step_memory_below_full_logits():
  """At V = 262144 and L = 2048 the step's scratch memory is below [B, L, V]."""
  cfg = oracle.small_config(
      '31b_like',
      vocab_size=262144,
      embed_dim=32,
      num_layers=1,
      attention_pattern=(GLOBAL,),
      hidden_dim=32,
  )
  length = 2048
  model = Transformer(config=cfg, dtype=jnp.float32)
  config = step_lib.OptimizerConfig(learning_rate=1e-3, total_steps=10)

  def init_state():
    params = model.init(
        jax.random.key(0), jnp.ones((1, 8), jnp.int32), return_logits=False
    )['params']
    return step_lib.init_train_state(params, config, jax.random.key(1))

  state = jax.eval_shape(init_state)
  batch = {
      'tokens': jax.ShapeDtypeStruct((1, length), jnp.int32),
      'targets': jax.ShapeDtypeStruct((1, length), jnp.int32),
      'loss_weights': jax.ShapeDtypeStruct((1, length), jnp.float32),
      'positions': jax.ShapeDtypeStruct((1, length), jnp.int32),
      'segment_ids': jax.ShapeDtypeStruct((1, length), jnp.int32),
  }
  train_step = step_lib.make_train_step(model, config, loss_chunk_size=256)
  compiled = train_step.lower(state, batch).compile()

  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  logits_bytes = 1 * length * cfg.vocab_size * 4
  print(f'train step temp memory {temp_bytes / 2**20:.1f} MiB,'
        f' full float32 logits {logits_bytes / 2**20:.1f} MiB')
  assert temp_bytes < logits_bytes


def tiny_setup(num_layers: int = 2, **optimizer_settings):
  cfg = oracle.small_config('31b_like', num_layers=num_layers)
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = model.init(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32), return_logits=False
  )['params']
  config = step_lib.OptimizerConfig(**optimizer_settings)
  state = step_lib.init_train_state(params, config, jax.random.key(1))
  return cfg, model, config, state


def test_step_updates_params():
  cfg, model, config, state = tiny_setup(learning_rate=1e-3, total_steps=10)
  before = jax.tree.map(np.asarray, state.params)
  batch = packed_batch(cfg.vocab_size)

  state, metrics = step_lib.make_train_step(model, config)(state, batch)

  changed = jax.tree.map(
      lambda a, b: bool(np.any(a != np.asarray(b))), before, state.params
  )
  assert all(jax.tree.leaves(changed))
  assert int(state.step) == 1
  assert float(metrics['num_tokens']) == float((batch['loss_weights'] > 0).sum())
  assert math.isfinite(float(metrics['loss']))
  assert float(metrics['loss']) > 0


def test_weight_decay_mask_on_zero_grads():
  """With zero gradients AdamW's update is only decay: p <- p (1 - lr wd)."""
  lr, wd = 1e-2, 0.1
  cfg, model, config, state = tiny_setup(
      learning_rate=lr, total_steps=10, weight_decay=wd
  )
  before = jax.tree.map(np.asarray, state.params)
  batch = packed_batch(cfg.vocab_size)
  batch['loss_weights'][:] = 0.0

  state, metrics = step_lib.make_train_step(model, config)(state, batch)
  after = flax.traverse_util.flatten_dict(state.params, sep='/')
  before = flax.traverse_util.flatten_dict(before, sep='/')

  assert float(metrics['grad_norm']) == 0.0
  for name in ('final_norm/scale', 'layer_0/skip_scale',
               'layer_0/pre_attention_norm/scale', 'embedder/input_embedding'):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name in ('layer_0/attn/q_einsum/w', 'layer_1/mlp/linear'):
    np.testing.assert_allclose(
        after[name], before[name] * (1 - lr * wd), rtol=1e-6, err_msg=name
    )


def test_weight_decay_mask_names():
  cfg = oracle.SMALL_CONFIGS['26b_a4b_like']
  model = Transformer(config=cfg, dtype=jnp.float32)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  )['params']

  for decay_embeddings in (False, True):
    mask = flax.traverse_util.flatten_dict(
        step_lib.weight_decay_mask(params, decay_embeddings), sep='/'
    )
    for name in ('layer_0/mlp/per_expert_scale', 'layer_0/mlp/router_scale',
                 'layer_0/skip_scale', 'final_norm/scale'):
      assert not mask[name], name
    for name in ('layer_0/mlp/gating_einsum/w', 'layer_0/mlp/router_logits/w',
                 'layer_0/mlp2/linear'):
      assert mask[name], name
    assert mask['embedder/input_embedding'] == decay_embeddings


def test_learning_rate_schedule_formula():
  peak, end_fraction, warmup, total = 1e-3, 0.1, 10, 100
  schedule = step_lib.learning_rate_schedule(
      step_lib.OptimizerConfig(
          learning_rate=peak,
          total_steps=total,
          warmup_steps=warmup,
          end_learning_rate_fraction=end_fraction,
      )
  )
  end = peak * end_fraction

  def expected(step):
    if step < warmup:
      return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return end + (peak - end) * (1 + math.cos(math.pi * progress)) / 2

  for step in (0, 5, warmup, 55, total - 1, total):
    np.testing.assert_allclose(
        float(schedule(step)), expected(step), rtol=1e-5, err_msg=str(step)
    )
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(total)), end, rtol=1e-5)


def test_microbatches_match_whole_batch():
  # A first Adam step moves each weight by about lr * sign(g), which float32
  # noise flips where g is near 0. With eps = 1 the update lr g / (|g| + 1)
  # is smooth in g, so equal gradients give params equal to within two
  # float32 ulps of 1 (the params are at most about 1 in magnitude).
  settings = dict(
      learning_rate=1e-3, total_steps=10, weight_decay=0.01, eps=1.0
  )
  cfg, model, config, state = tiny_setup(num_layers=1, **settings)
  _, _, split_config, split_state = tiny_setup(
      num_layers=1, num_microbatches=2, **settings
  )
  batch = packed_batch(cfg.vocab_size)

  whole, whole_metrics = step_lib.make_train_step(model, config)(state, batch)
  split, split_metrics = step_lib.make_train_step(model, split_config)(
      split_state, batch
  )

  np.testing.assert_allclose(
      float(split_metrics['loss']), float(whole_metrics['loss']), rtol=1e-6
  )
  np.testing.assert_allclose(
      float(split_metrics['grad_norm']),
      float(whole_metrics['grad_norm']),
      rtol=1e-5,
  )
  assert max_abs_difference(split.params, whole.params) <= 2.5e-7
