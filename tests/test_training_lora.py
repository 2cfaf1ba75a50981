"""LoRA adapters and the LoRA train step against independent expectations.

The merged checkpoint is checked with the official `gemma` 4.0.1 loader and
model, each adapter layout against an explicit `x A B` product, the
trainable counts against counts computed by hand from the config, and the
optimizer state against the adapters' size.
"""

from __future__ import annotations

import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.checkpoint import io as checkpoint_io
from gemma4_jax.config import GLOBAL, LOCAL
from gemma4_jax.training import lora
from gemma4_jax.training import step as step_lib
from gemma4_jax.transformer import Transformer
from tests import oracle

RANK = 4
ALPHA = 8.0
NUM_STEPS = 4

# Two-layer versions of the small families (one local and one global layer)
# keep each train step's compile time to seconds on a 2-core CPU. The E2B-like
# config keeps its KV sharing in a third layer, which reuses the keys and
# values of layer 0.
_TWO_KINDS = dict(attention_pattern=(LOCAL, GLOBAL))
CONFIGS = {
    '31b_like': oracle.small_config('31b_like', num_layers=2, **_TWO_KINDS),
    '26b_a4b_like': oracle.small_config(
        '26b_a4b_like', num_layers=2, **_TWO_KINDS
    ),
    'e2b_like': oracle.small_config(
        'e2b_like', num_layers=3, num_kv_shared_layers=1, **_TWO_KINDS
    ),
}
# A one-layer model for the test that compiles two steps.
ALL_CONFIGS = {
    **CONFIGS,
    'one_global_layer': oracle.small_config(
        '31b_like', num_layers=1, attention_pattern=(GLOBAL,)
    ),
}


def lora_config(name: str) -> lora.LoraConfig:
  targets = lora.DEFAULT_TARGETS
  if ALL_CONFIGS[name].is_moe:
    targets += lora.EXPERT_TARGETS
  return lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)


def abstract_params(name: str, dtype=jnp.float32):
  model = Transformer(config=ALL_CONFIGS[name], dtype=dtype)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  )['params']


@functools.cache
def base_params(name: str):
  """Float32 seeded random parameters of `name` (the release's NESTED tree).

  Filled with numpy rather than `model.init`, which compiles for seconds.
  Scales and norms are near 1, matrices have standard deviation 0.1.
  """
  rng = np.random.default_rng(0)

  def fill(leaf):
    values = rng.standard_normal(leaf.shape, dtype=np.float32) * 0.1
    if len(leaf.shape) == 1:
      values += 1.0
    return jnp.asarray(values)

  return jax.tree.map(fill, abstract_params(name))


def fresh_adapters(name: str, params=None, seed: int = 0):
  """Adapters of `lora_config(name)` for `params` (default `base_params(name)`)."""
  if params is None:
    params = base_params(name)
  return lora.init_adapters(
      params,
      lora_config(name),
      jax.random.key(seed),
      model_config=ALL_CONFIGS[name],
  )


def memorisable_batch(vocab_size: int) -> dict[str, np.ndarray]:
  """One row of 16 random tokens whose targets are the next tokens."""
  rng = np.random.default_rng(0)
  sequence = rng.integers(1, vocab_size, 17).astype(np.int32)
  return {
      'tokens': sequence[None, :-1],
      'targets': sequence[None, 1:],
      'loss_weights': np.ones((1, 16), np.float32),
      'positions': np.arange(16, dtype=np.int32)[None],
      'segment_ids': np.ones((1, 16), np.int32),
  }


@functools.cache
def trained(name: str):
  """Run NUM_STEPS LoRA steps on `name`; return what the tests inspect."""
  cfg = CONFIGS[name]
  config = lora_config(name)
  model = Transformer(config=cfg, dtype=jnp.float32)
  base = base_params(name)
  base_before = jax.tree.map(np.array, base)

  adapters = fresh_adapters(name, seed=1)
  optimizer_config = step_lib.OptimizerConfig(
      learning_rate=1e-2, total_steps=NUM_STEPS, weight_decay=0.01
  )
  state = step_lib.init_train_state(adapters, optimizer_config, jax.random.key(2))
  initial_adapters = jax.tree.map(np.array, state.params)
  initial_opt_state = jax.tree.map(np.array, state.opt_state)

  train_step = step_lib.make_train_step(model, optimizer_config, lora=config)
  batch = memorisable_batch(cfg.vocab_size)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = train_step(state, batch, base)
    losses.append(float(metrics['loss']))

  return dict(
      model=model,
      base=base,
      base_before=base_before,
      initial_adapters=initial_adapters,
      initial_opt_state=initial_opt_state,
      adapters=state.params,
      losses=losses,
  )


def flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


def size(tree) -> int:
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------ adapter layouts


# Each adapted weight with the contraction the decoder applies to it
# (attention.py, layers.py, moe.py). Outputs are written with the token axis T
# first and the other axes in B's order, which reorders the output without
# changing what is contracted: `kv_einsum` runs as 'BSD,CKDH->CBSKH' in the
# model, here as 'TD,CKDH->TCKH'.
LAYOUT_CASES = {
    'q': (('attn', 'q_einsum', 'w'), (3, 5, 4), 'TD,NDH->TNH', (5,)),
    'kv': (('attn', 'kv_einsum', 'w'), (2, 2, 5, 4), 'TD,CKDH->TCKH', (5,)),
    'kv_k_eq_v': (('attn', 'k_einsum', 'w'), (2, 5, 4), 'TD,KDH->TKH', (5,)),
    'o': (('attn', 'attn_vec_einsum', 'w'), (3, 4, 5), 'TNH,NHD->TD', (3, 4)),
    'gating': (('mlp', 'gating_einsum'), (2, 6, 5), 'TD,CFD->TCF', (5,)),
    'gating_mlp2': (('mlp2', 'gating_einsum'), (2, 6, 5), 'TD,CFD->TCF', (5,)),
    'linear': (('mlp', 'linear'), (6, 5), 'TF,FD->TD', (6,)),
    'linear_mlp2': (('mlp2', 'linear'), (6, 5), 'TF,FD->TD', (6,)),
    'router': (('mlp', 'router_logits', 'w'), (5, 7), 'TD,DE->TE', (5,)),
    # Per expert: the weight's slice e, as in `_tiled_expert_mlp`.
    'experts_gating': (
        ('mlp', 'gating_einsum', 'w'), (3, 2, 6, 5), 'TD,CFD->TCF', (5,)
    ),
    'experts_linear': (('mlp', 'linear', 'w'), (3, 6, 5), 'TF,FD->TD', (6,)),
}


@pytest.mark.parametrize('case', LAYOUT_CASES)
def test_merged_weight_is_x_a_b(case):
  """`x W'` equals `x W + scale * (x A) B` with x flattened over W's inputs."""
  path, weight_shape, equation, input_shape = LAYOUT_CASES[case]
  target = case.removesuffix('_k_eq_v').removesuffix('_mlp2')
  config = lora.LoraConfig(rank=3, alpha=1.5, targets=(target,))
  experts = target.startswith('experts_')

  rng = np.random.default_rng(len(case))
  weight = rng.standard_normal(weight_shape, dtype=np.float32)
  a_shape = (*((weight_shape[0],) if experts else ()), *input_shape, 3)
  out_shape = np.einsum(
      equation,
      np.zeros((1, *input_shape), np.float32),
      weight[0] if experts else weight,
  ).shape[1:]
  b_shape = (*((weight_shape[0],) if experts else ()), 3, *out_shape)
  a = rng.standard_normal(a_shape, dtype=np.float32)
  b = rng.standard_normal(b_shape, dtype=np.float32)
  x = rng.standard_normal((2, *input_shape), dtype=np.float32)

  base = flax.traverse_util.unflatten_dict({('layer_0', *path): weight})
  adapters = flax.traverse_util.unflatten_dict(
      {('layer_0', *path, 'lora_a'): a, ('layer_0', *path, 'lora_b'): b}
  )
  merged = flat(lora.merge(base, adapters, config))['/'.join(('layer_0', *path))]

  x_flat = x.reshape(2, -1).astype(np.float64)

  def reference(w, a, b):
    low_rank = x_flat @ a.reshape(-1, 3) @ b.reshape(3, -1)
    base_out = np.einsum(equation, x.astype(np.float64), w)
    return base_out + config.scale * low_rank.reshape(base_out.shape)

  def ours(w):
    return np.einsum(equation, x.astype(np.float64), np.asarray(w, np.float64))

  if experts:
    for e in range(weight_shape[0]):
      np.testing.assert_allclose(
          ours(merged[e]), reference(weight[e], a[e], b[e]),
          rtol=1e-5, atol=1e-5, err_msg=f'expert {e}',
      )
  else:
    np.testing.assert_allclose(
        ours(merged), reference(weight, a, b), rtol=1e-5, atol=1e-5
    )
  assert merged.dtype == weight.dtype


def test_fresh_adapters_change_nothing():
  name = '26b_a4b_like'
  base = base_params(name)
  config = lora_config(name)
  adapters = fresh_adapters(name)

  for key, value in flat(adapters).items():
    if key.endswith('lora_a'):
      assert float(jnp.std(value)) > 0, key
    else:
      assert not np.any(np.asarray(value)), key

  applied = flat(lora.apply_adapters(base, adapters, config, jnp.float32))
  expected = flat(base)
  assert sorted(applied) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(applied[key], expected[key], err_msg=key)


# ---------------------------------------------------------- trainable counts


def expected_counts(cfg, rank: int) -> dict[str, int]:
  """LoRA parameters per target, from the config: rank * (inputs + outputs)."""
  counts = dict.fromkeys(lora.TARGET_LABELS, 0)
  d, n = cfg.embed_dim, cfg.num_heads
  for layer in range(cfg.num_layers):
    h = cfg.layer_head_dim(layer)
    k = cfg.layer_num_kv_heads(layer)
    counts['q'] += rank * (d + n * h)
    counts['o'] += rank * (n * h + d)
    if not cfg.is_kv_shared(layer):
      kv_outputs = k * h if cfg.layer_k_eq_v(layer) else 2 * k * h
      counts['kv'] += rank * (d + kv_outputs)
    f = cfg.hidden_dim if cfg.is_moe else cfg.layer_hidden_dim(layer)
    counts['gating'] += rank * (d + 2 * f)
    counts['linear'] += rank * (f + d)
    if cfg.is_moe:
      e, fe = cfg.num_experts, cfg.expert_hidden_dim
      counts['experts_gating'] += e * rank * (d + 2 * fe)
      counts['experts_linear'] += e * rank * (fe + d)
  return {target: count for target, count in counts.items() if count}


@pytest.mark.parametrize('name', CONFIGS)
def test_trainable_counts_match_config(name):
  cfg = CONFIGS[name]
  params = abstract_params(name)
  config = lora_config(name)
  # Shapes only: eval_shape traces init_adapters without compiling it.
  adapters = jax.eval_shape(lambda: fresh_adapters(name, params))

  counts = lora.trainable_counts(adapters)
  total = counts.pop('total')
  expected = expected_counts(cfg, RANK)

  assert {g: c['params'] for g, c in counts.items()} == expected
  assert total['params'] == sum(expected.values())
  assert total['bytes'] == 4 * total['params']
  if cfg.is_moe:
    assert counts['experts_gating']['params'] > 0
    assert counts['experts_linear']['params'] > 0
  text = lora.describe_trainable(adapters)
  print(text)
  for group in expected:
    assert group in text
  assert f'{total["params"]:,}' in text


def test_kv_shared_layers_without_model_config():
  """Without the model config the unused 'kv' of KV-shared layer 2 is adapted."""
  params = abstract_params('e2b_like')
  config = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=('kv',))
  with_config = jax.eval_shape(
      lambda: lora.init_adapters(
          params, config, jax.random.key(0), model_config=CONFIGS['e2b_like']
      )
  )
  without_config = jax.eval_shape(
      lambda: lora.init_adapters(params, config, jax.random.key(0))
  )

  assert 'layer_2' not in with_config
  assert set(without_config) == {'layer_0', 'layer_1', 'layer_2'}
  cfg = CONFIGS['e2b_like']
  shared_kv = RANK * (cfg.embed_dim + 2 * cfg.num_kv_heads * cfg.head_dim)
  assert (
      lora.trainable_counts(without_config)['kv']['params']
      == lora.trainable_counts(with_config)['kv']['params'] + shared_kv
  )


def test_trainable_counts_of_full_params():
  cfg = CONFIGS['26b_a4b_like']
  params = abstract_params('26b_a4b_like', jnp.bfloat16)
  counts = lora.trainable_counts(params)

  e, fe, d = cfg.num_experts, cfg.expert_hidden_dim, cfg.embed_dim
  expected_experts = cfg.num_layers * (e * 3 * fe * d + e)  # + per_expert_scale
  assert counts['experts']['params'] == expected_experts
  assert counts['embedding']['params'] == cfg.vocab_size * d
  assert counts['total']['params'] == size(params)
  assert counts['total']['bytes'] == 2 * size(params)


# ------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(rank=0, alpha=1.0), 'rank=0'),
        (dict(rank=-2, alpha=1.0), 'rank=-2'),
        (dict(rank=2.5, alpha=1.0), '2.5'),
        (dict(rank=4, alpha=0.0), 'alpha=0.0'),
        (dict(rank=4, alpha=1.0, targets=('q', 'qkv')), "'qkv'"),
        (dict(rank=4, alpha=1.0, targets='q'), "targets=('q',)"),
        (dict(rank=4, alpha=1.0, targets=()), 'at least one'),
        (dict(rank=4, alpha=1.0, targets=('q', 'q')), 'q more than once'),
    ],
)
def test_invalid_lora_config_raises(settings, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    lora.LoraConfig(**settings)


@pytest.mark.parametrize('targets', [('q', 'experts_gating'), ('router',)])
def test_moe_targets_on_dense_model_raise(targets):
  cfg = CONFIGS['31b_like']
  params = abstract_params('31b_like')
  config = lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)

  with pytest.raises(ValueError) as error:
    lora.init_adapters(params, config, jax.random.key(0), model_config=cfg)
  assert repr(targets[-1]) in str(error.value)
  assert 'remove them from LoraConfig.targets' in str(error.value)


def test_adapters_of_other_model_raise():
  dense_base = base_params('31b_like')
  config = lora_config('26b_a4b_like')
  adapters = fresh_adapters('26b_a4b_like')

  with pytest.raises(ValueError, match='another model'):
    lora.apply_adapters(dense_base, adapters, config, jnp.float32)


def test_params_of_other_config_raise():
  message = "params have 2 decoder layers, but model config 'e2b_like' has 3"
  with pytest.raises(ValueError, match=message):
    lora.init_adapters(
        abstract_params('31b_like'),
        lora_config('31b_like'),
        jax.random.key(0),
        model_config=CONFIGS['e2b_like'],
    )


def test_wrong_rank_raises():
  base = base_params('31b_like')
  adapters = fresh_adapters('31b_like')
  other_rank = lora.LoraConfig(rank=RANK + 1, alpha=ALPHA)

  with pytest.raises(ValueError, match='rank 5'):
    lora.merge(base, adapters, other_rank)


# ------------------------------------------------------- saving and loading


def test_save_load_round_trip(tmp_path):
  name = '26b_a4b_like'
  adapters = trained(name)['adapters']
  config = lora_config(name)

  lora.save_adapters(adapters, config, tmp_path / 'adapters')
  loaded, loaded_config = lora.load_adapters(tmp_path / 'adapters', config=config)

  assert loaded_config == config
  expected = flat(adapters)
  actual = flat(loaded)
  assert sorted(actual) == sorted(expected)
  for key in expected:
    assert actual[key].dtype == jnp.float32, key
    np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)


def test_load_errors(tmp_path):
  config = lora_config('31b_like')
  adapters = fresh_adapters('31b_like')
  path = lora.save_adapters(adapters, config, tmp_path / 'saved')

  missing = tmp_path / 'missing'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    lora.load_adapters(missing)

  not_adapters = tmp_path / 'empty'
  not_adapters.mkdir()
  with pytest.raises(FileNotFoundError, match='lora_config.json is missing'):
    lora.load_adapters(not_adapters)

  other = lora.LoraConfig(rank=8, alpha=ALPHA)
  with pytest.raises(ValueError, match=r'rank=4 \(expected 8\)'):
    lora.load_adapters(path, config=other)

  with pytest.raises(FileExistsError, match='overwrite=True'):
    lora.save_adapters(adapters, config, path)

  with pytest.raises(ValueError, match='does not fit'):
    lora.save_adapters(adapters, other, tmp_path / 'mismatch')


def test_save_overwrites(tmp_path):
  config = lora_config('31b_like')
  first = fresh_adapters('31b_like', seed=0)
  second = fresh_adapters('31b_like', seed=1)

  path = lora.save_adapters(first, config, tmp_path / 'a')
  lora.save_adapters(second, config, path, overwrite=True)
  loaded, _ = lora.load_adapters(path)

  key = 'layer_0/attn/q_einsum/w/lora_a'
  np.testing.assert_array_equal(flat(loaded)[key], flat(second)[key])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a']


# ------------------------------------------------------------- train step


def test_optimizer_state_holds_adapters_only():
  run = trained('31b_like')
  adapter_size = size(run['initial_adapters'])
  opt_leaves = jax.tree.leaves(run['initial_opt_state'])
  opt_size = sum(leaf.size for leaf in opt_leaves)
  scalars = [leaf for leaf in opt_leaves if leaf.size == 1]
  print(
      f'LoRA adapters {adapter_size:,} parameters; optimizer state'
      f' {opt_size:,} values ({len(scalars)} scalars)'
  )

  assert opt_size == 2 * adapter_size + len(scalars)
  assert len(scalars) <= 4  # Adam's and the schedule's step counts
  base_shapes = {np.shape(leaf) for leaf in jax.tree.leaves(run['base'])}
  for leaf in opt_leaves:
    if leaf.size > 1:
      assert leaf.shape not in base_shapes, leaf.shape
      assert leaf.dtype == np.float32


@pytest.mark.parametrize('name', ['31b_like', '26b_a4b_like'])
def test_lora_steps_train_adapters_only(name):
  run = trained(name)

  for key, before in flat(run['base_before']).items():
    np.testing.assert_array_equal(
        np.asarray(flat(run['base'])[key]), before, err_msg=key
    )

  initial = flat(run['initial_adapters'])
  for key, value in flat(run['adapters']).items():
    assert np.any(np.asarray(value) != initial[key]), key

  losses = run['losses']
  print(f'{name} LoRA losses: {losses}')
  assert losses[-1] < losses[0]
  assert all(math.isfinite(loss) for loss in losses)


def test_base_params_in_other_dtype_raise():
  cfg = CONFIGS['31b_like']
  config = lora_config('31b_like')
  base = base_params('31b_like')  # float32
  adapters = fresh_adapters('31b_like')
  optimizer_config = step_lib.OptimizerConfig(learning_rate=1e-3, total_steps=1)
  state = step_lib.init_train_state(adapters, optimizer_config, jax.random.key(1))
  model = Transformer(config=cfg, dtype=jnp.bfloat16)
  train_step = step_lib.make_train_step(model, optimizer_config, lora=config)

  with pytest.raises(ValueError, match='has dtype float32, but the model'):
    train_step(state, memorisable_batch(cfg.vocab_size), base)


def test_lora_microbatches_match_whole_batch():
  # eps = 1 makes Adam's first update lr g / (|g| + 1), smooth in g, so equal
  # gradients give equal adapters up to float32 rounding.
  name = 'one_global_layer'
  cfg, config = ALL_CONFIGS[name], lora_config(name)
  base = base_params(name)
  model = Transformer(config=cfg, dtype=jnp.float32)
  rows = memorisable_batch(cfg.vocab_size)
  batch = {key: np.concatenate([value, value[:, ::-1]]) for key, value in rows.items()}
  batch['positions'] = np.concatenate([rows['positions']] * 2)
  batch['loss_weights'][1, :5] = 0.0

  results = []
  for num_microbatches in (1, 2):
    optimizer_config = step_lib.OptimizerConfig(
        learning_rate=1e-2, total_steps=4, eps=1.0,
        num_microbatches=num_microbatches,
    )
    adapters = fresh_adapters(name)
    state = step_lib.init_train_state(
        adapters, optimizer_config, jax.random.key(1)
    )
    train_step = step_lib.make_train_step(model, optimizer_config, lora=config)
    state, metrics = train_step(state, batch, base)
    results.append((state.params, metrics))

  (whole, whole_metrics), (split, split_metrics) = results
  np.testing.assert_allclose(
      float(split_metrics['loss']), float(whole_metrics['loss']), rtol=1e-6
  )
  assert float(split_metrics['weight_sum']) == 2 * 16 - 5
  for key, value in flat(whole).items():
    np.testing.assert_allclose(
        flat(split)[key], value, rtol=0, atol=1e-6, err_msg=key
    )


def test_weight_decay_mask_decays_adapters():
  adapters = fresh_adapters('26b_a4b_like')
  mask = step_lib.weight_decay_mask(adapters)
  assert all(jax.tree.leaves(mask))


# ------------------------------------------------- merged checkpoint parity


@pytest.mark.parametrize('name', CONFIGS)
def test_merged_checkpoint_matches_official(tmp_path, name):
  """The official model on our merged checkpoint gives our adapted logits.

  Tolerance: 1e-4 of the largest |logit|, for float32 sums in a different
  order in the two implementations.
  """
  cfg = CONFIGS[name]
  run = trained(name)
  config = lora_config(name)
  tokens = jnp.asarray(
      np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 12)), jnp.int32
  )

  merged = lora.merge(run['base'], run['adapters'], config)
  checkpoint_io.save_params(merged, tmp_path / 'ckpt')
  from gemma import gm  # pylint: disable=g-import-not-at-top

  loaded = gm.ckpts.load_params(tmp_path / 'ckpt')
  official = oracle.official_model(cfg, jnp.float32)
  official_logits = jax.jit(
      lambda params: official.apply({'params': params}, tokens).logits
  )
  expected = official_logits(loaded)
  base_logits = official_logits(run['base'])

  @jax.jit
  def adapted_logits(base, adapters):
    applied = lora.apply_adapters(base, adapters, config, jnp.float32)
    return run['model'].apply({'params': applied}, tokens).logits

  logits = adapted_logits(run['base'], run['adapters'])

  tolerance = 1e-4 * float(jnp.max(jnp.abs(expected)))
  error = float(jnp.max(jnp.abs(logits - expected)))
  change = float(jnp.max(jnp.abs(expected - base_logits)))
  print(f'{name}: max |logit| diff {error:.3g}, tolerance {tolerance:.3g},'
        f' change from the base {change:.3g}')
  assert error <= tolerance
  assert change > 100 * tolerance  # the adapters do change the model
