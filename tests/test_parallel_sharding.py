"""Sharded parameters and forward passes on 8 simulated CPU devices.

Every parameter is placed by the logical-axis rules, and the forward pass
of each small family on each mesh must give the logits of one device. The
official package has no sharded forward pass, so the reference here is our
single-device forward pass, which tests/test_parity.py compares with the
official model.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gemma4_jax.parallel import mesh as mesh_lib
from gemma4_jax.parallel import rules
from gemma4_jax.transformer import Transformer
from tests import oracle

if jax.device_count() < 8:
  pytest.skip(
      'needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8'
      ' (scripts/test.sh does)',
      allow_module_level=True,
  )

# Widths that every mesh below divides, so that sharding actually splits.
SHARDABLE = dict(num_heads=8, embed_dim=64, vocab_size=512)
MESHES = {
    'data=8': {'data': 8},
    'fsdp=8': {'fsdp': 8},
    'tensor=8': {'tensor': 8},
    'data=2,fsdp=2,tensor=2': {'data': 2, 'fsdp': 2, 'tensor': 2},
}
MOE_MESHES = {'expert=8': {'expert': 8}, 'data=2,expert=4': {'data': 2, 'expert': 4}}
ALL_MESHES = {**MESHES, **MOE_MESHES}

# Every small family on every mesh, and the MoE also on its expert meshes.
# CI runs the cases each test lists; GEMMA4_JAX_PARALLEL_GRID=1 runs the
# rest too (45 minutes on one core of the 2-core CPU, 2026-12-05):
#   GEMMA4_JAX_PARALLEL_GRID=1 bash scripts/test.sh tests/test_parallel_*.py
FULL_GRID = os.environ.get('GEMMA4_JAX_PARALLEL_GRID') == '1'
GRID = [
    (family, mesh_name)
    for family in ('e2b_like', 'e4b_like', '26b_a4b_like', '31b_like')
    for mesh_name in MESHES
] + [('26b_a4b_like', mesh_name) for mesh_name in MOE_MESHES]


def grid_cases(ci_cases):
  """`ci_cases`, then the rest of GRID, skipped unless FULL_GRID."""
  rest = [
      pytest.param(
          *case,
          marks=pytest.mark.skipif(
              not FULL_GRID,
              reason='full family x mesh grid: set GEMMA4_JAX_PARALLEL_GRID=1',
          ),
      )
      for case in GRID
      if case not in ci_cases
  ]
  return list(ci_cases) + rest


def family_config(family: str):
  return dataclasses.replace(oracle.SMALL_CONFIGS[family], **SHARDABLE)


def param_shapes(cfg):
  """Shapes of the parameters, without computing them."""
  model = Transformer(config=cfg, dtype=jnp.float32)
  return jax.eval_shape(
      model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']


def init_params(cfg):
  model = Transformer(config=cfg, dtype=jnp.float32)
  return model, jax.jit(model.init)(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']


def test_parse_mesh_rejects_unknown_axis():
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    mesh_lib.parse_mesh('model=8')


def test_make_mesh_rejects_wrong_device_count():
  with pytest.raises(ValueError, match='needs 16 devices but 8'):
    mesh_lib.make_mesh('tensor=8,fsdp=2')


def test_dense_shardings_follow_rules():
  cfg = family_config('31b_like')
  params = param_shapes(cfg)
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'tensor': 4})
  specs = rules.parameter_specs(params, mesh)
  layer = specs['layer_0']
  assert layer['attn']['q_einsum']['w'] == P('tensor', 'fsdp', None)
  assert layer['attn']['attn_vec_einsum']['w'] == P('tensor', None, 'fsdp')
  # Two local KV heads do not divide over 4 tensor devices: replicated.
  assert layer['attn']['kv_einsum']['w'] == P(None, None, 'fsdp', None)
  assert layer['mlp']['gating_einsum'] == P(None, 'tensor', 'fsdp')
  assert layer['mlp']['linear'] == P('tensor', 'fsdp')
  assert specs['embedder']['input_embedding'] == P('tensor', 'fsdp')
  assert specs['final_norm']['scale'] == P(None)


def test_per_layer_embeddings_split_over_fsdp():
  # The largest array of E2B and E4B: [vocab, layers, ple] with its ple axis
  # over the FSDP devices, and vocab over tensor.
  cfg = family_config('e2b_like')
  _, params = init_params(cfg)
  mesh = mesh_lib.make_mesh({'fsdp': 4, 'tensor': 2})
  placed = jax.device_put(params, rules.parameter_shardings(params, mesh))
  table = placed['embedder']['per_layer_embeddings']
  assert table.sharding.spec == P('tensor', None, 'fsdp')
  rows, layers, width = table.shape
  assert {shard.data.shape for shard in table.addressable_shards} == {
      (rows // 2, layers, width // 4)
  }


def test_moe_experts_shard_over_expert_axis():
  cfg = family_config('26b_a4b_like')
  params = param_shapes(cfg)
  mesh = mesh_lib.make_mesh({'expert': 8})
  specs = rules.parameter_specs(params, mesh)
  mlp = specs['layer_0']['mlp']
  assert mlp['gating_einsum']['w'] == P('expert', None, None, None)
  assert mlp['linear']['w'] == P('expert', None, None)
  assert mlp['router_logits']['w'] == P(None, None)


def test_placed_parameters_carry_rule_shardings():
  cfg = family_config('31b_like')
  _, params = init_params(cfg)
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  shardings = rules.parameter_shardings(params, mesh)
  placed = jax.device_put(params, shardings)
  for (path, array), expected in zip(
      jax.tree_util.tree_flatten_with_path(placed)[0],
      jax.tree.leaves(shardings),
  ):
    assert array.sharding.is_equivalent_to(expected, array.ndim), path


def test_compiled_parameter_bytes_per_device():
  cfg = family_config('31b_like')
  model, params = init_params(cfg)
  mesh = mesh_lib.make_mesh({'fsdp': 2, 'tensor': 4})
  specs = rules.parameter_specs(params, mesh)
  expected = 0
  for array, spec in zip(
      jax.tree.leaves(params),
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
  ):
    shards = 1
    for entry in spec:
      for axis in (entry if isinstance(entry, tuple) else (entry,)):
        if axis is not None:
          shards *= mesh.shape[axis]
    expected += array.size * array.dtype.itemsize / shards
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  # Most bytes must be split, or the comparison below would prove little.
  assert expected < total / 2

  tokens = jnp.ones((8, 16), jnp.int32)
  placed = jax.device_put(params, rules.parameter_shardings(params, mesh))
  compiled = jax.jit(
      lambda p, t: model.apply({'params': p}, t).logits
  ).lower(placed, tokens).compile()
  measured = compiled.memory_analysis().argument_size_in_bytes - tokens.nbytes
  assert abs(measured - expected) <= 0.1 * expected, (measured, expected)


def forward_logits(model, params, tokens, mesh=None):
  if mesh is not None:
    params = jax.device_put(params, rules.parameter_shardings(params, mesh))
    tokens = jax.device_put(
        tokens,
        rules.activation_sharding(('batch', 'length'), tokens.shape, mesh),
    )
  forward = jax.jit(lambda p, t: model.apply({'params': p}, t).logits)
  if mesh is None:
    return np.asarray(forward(params, tokens))
  # The model's activations follow the rules while it traces.
  with jax.set_mesh(mesh), rules.activation_rules(mesh):
    return np.asarray(forward(params, tokens))


# In CI: the dense flagship on the meshes that split its weights, the other
# families on the meshes that exercise what they add (KV sharing, PLE,
# experts). The generation tests cover e2b_like on data=2,fsdp=2,tensor=2,
# and the rest of the grid runs with GEMMA4_JAX_PARALLEL_GRID=1.
CASES = [
    ('31b_like', 'fsdp=8'),
    ('31b_like', 'tensor=8'),
    ('31b_like', 'data=2,fsdp=2,tensor=2'),
    ('e2b_like', 'tensor=8'),
    ('e4b_like', 'fsdp=8'),
    ('26b_a4b_like', 'expert=8'),
    ('26b_a4b_like', 'data=2,expert=4'),
]


@pytest.mark.parametrize('family,mesh_name', grid_cases(CASES))
def test_sharded_forward_matches_one_device(family, mesh_name):
  cfg = family_config(family)
  model, params = init_params(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (8, 24)), jnp.int32)
  expected = forward_logits(model, params, tokens)
  shape = ALL_MESHES[mesh_name]
  ours = forward_logits(model, params, tokens, mesh_lib.make_mesh(shape))
  # Sharded products add in another order: float32 rounding differences
  # reach about 4e-5 of the largest logit (E2B-like on tensor=8).
  bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
  error = float(np.abs(ours - expected).max())
  assert error <= bound, f'{mesh_name}: max |sharded - one device| = {error:.3g}'


def packed_rows(vocab_size: int, rows: int = 8, length: int = 24):
  """A batch of `rows` rows of two packed segments each, prompts unweighted."""
  rng = np.random.default_rng(3)
  batch = {
      'tokens': rng.integers(1, vocab_size, (rows, length)),
      'targets': rng.integers(1, vocab_size, (rows, length)),
      'positions': np.tile(np.r_[np.arange(10), np.arange(length - 10)],
                           (rows, 1)),
      'segment_ids': np.tile(np.r_[np.ones(10), 2 * np.ones(length - 10)],
                             (rows, 1)),
      'loss_weights': np.tile(np.r_[np.zeros(3), np.ones(7), np.zeros(3),
                                    np.ones(length - 13)], (rows, 1)),
  }
  return {
      name: jnp.asarray(value, jnp.float32 if name == 'loss_weights'
                        else jnp.int32)
      for name, value in batch.items()
  }


def first_moments(opt_state) -> dict[str, np.ndarray]:
  """AdamW's `mu` leaves of an optax state, by path."""
  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
      if '.mu' in jax.tree_util.keystr(path)
  }


STEP_CASES = [
    ('31b_like', 'fsdp=8'),
    ('31b_like', 'data=2,fsdp=2,tensor=2'),
    ('e2b_like', 'tensor=8'),
    ('26b_a4b_like', 'data=2,expert=4'),
]


@pytest.mark.parametrize('family,mesh_name', grid_cases(STEP_CASES))
def test_sharded_train_step_matches_one_device(family, mesh_name):
  from gemma4_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg = family_config(family)
  model, params = init_params(cfg)
  config = step_lib.OptimizerConfig(learning_rate=1e-2, total_steps=10)
  batch = packed_rows(cfg.vocab_size)

  def run(mesh):
    # The step donates its state, which shares the float32 parameters.
    fresh = jax.tree.map(jnp.copy, params)
    state = step_lib.init_train_state(fresh, config, jax.random.key(1))
    step = step_lib.make_train_step(
        model, config, loss_chunk_size=16, mesh=mesh
    )
    state, metrics = step(state, batch)
    return state, jax.tree.map(float, metrics)

  expected_state, expected = run(None)
  mesh = mesh_lib.make_mesh(ALL_MESHES[mesh_name])
  state, metrics = run(mesh)

  assert abs(metrics['loss'] - expected['loss']) <= 1e-5 * expected['loss']
  assert abs(metrics['grad_norm'] - expected['grad_norm']) <= (
      1e-4 * expected['grad_norm']
  )
  # AdamW's first moment after one step is 0.1 times the clipped gradient.
  ours_mu = first_moments(state.opt_state)
  theirs_mu = first_moments(expected_state.opt_state)
  assert len(ours_mu) == len(jax.tree.leaves(params))
  scale = max(float(np.abs(x).max()) for x in theirs_mu.values())
  for name, theirs in theirs_mu.items():
    error = float(np.abs(ours_mu[name] - theirs).max())
    assert error <= 1e-4 * scale, f'{name}: {error:.3g} (max {scale:.3g})'
  specs = rules.parameter_specs(params, mesh)
  q_spec = specs['layer_0']['attn']['q_einsum']['w']
  assert state.params['layer_0']['attn']['q_einsum']['w'].sharding.spec == (
      q_spec
  )
