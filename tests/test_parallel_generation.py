"""Greedy generation on sharded meshes of 8 simulated CPU devices.

A `Sampler` with a mesh places the parameters by the logical-axis rules and
keeps its KV cache split over the batch and KV-head axes. For each small
family its greedy tokens must equal those of one device, whose sampler
tests/test_sampler.py checks against the official one, and the logits of
the prefill must agree to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma4_jax.parallel import mesh as mesh_lib
from gemma4_jax.sampling import sampler as sampler_lib
from gemma4_jax.sampling.cache import init_cache
from tests.test_parallel_sharding import ALL_MESHES
from tests.test_parallel_sharding import family_config
from tests.test_parallel_sharding import grid_cases
from tests.test_parallel_sharding import init_params

if jax.device_count() < 8:
  pytest.skip(
      'needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8'
      ' (scripts/test.sh does)',
      allow_module_level=True,
  )

NEW_TOKENS = 8
# In CI each mesh axis appears at least once (tests/test_parallel_moe.py
# checks the MoE's logits and train step on expert=8); the rest of the
# family x mesh grid runs with GEMMA4_JAX_PARALLEL_GRID=1.
CASES = [
    ('e2b_like', 'data=2,fsdp=2,tensor=2'),
    ('31b_like', 'tensor=8'),
    ('26b_a4b_like', 'data=2,expert=4'),
]


def prompts(vocab_size):
  """Four prompts of different lengths, some longer than the window of 8."""
  rng = np.random.default_rng(0)
  return [[2] + list(rng.integers(3, vocab_size, n)) for n in (5, 30, 17, 9)]


@pytest.mark.parametrize('family,mesh_name', grid_cases(CASES))
def test_greedy_tokens_match_one_device(family, mesh_name):
  cfg = family_config(family)
  model, params = init_params(cfg)
  if cfg.is_moe:
    # Experts on their own devices, tokens sent to them with all-to-all.
    model = model.clone(moe_implementation='all_to_all')
  batch = prompts(cfg.vocab_size)
  single = sampler_lib.Sampler(model, params).generate(
      batch, max_new_tokens=NEW_TOKENS
  )

  shape = ALL_MESHES[mesh_name]
  mesh = mesh_lib.make_mesh(shape)
  sharded = sampler_lib.Sampler(model, params, mesh=mesh)
  out = sharded.generate(batch, max_new_tokens=NEW_TOKENS)
  assert out.tokens == single.tokens

  # The cache stays split over the mesh after decoding.
  cache = out.state.cache
  values = [layer.values for layer in cache.layers if layer is not None]
  assert all(len(v.sharding.device_set) == 8 for v in values)
  rows_split = any(
      not v.sharding.is_fully_replicated for v in values
  )
  # Rows split over the data and fsdp axes that divide the 4 prompts.
  divides = any(
      shape.get(axis, 1) > 1 and len(batch) % shape[axis] == 0
      for axis in ('data', 'fsdp')
  )
  assert rows_split or not divides


def test_prefill_logits_match_one_device():
  cfg = family_config('31b_like')
  model, params = init_params(cfg)
  rows = prompts(cfg.vocab_size)
  length = max(map(len, rows))
  tokens = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)] = row
  mask = tokens != 0

  def prefill_logits(sampler):
    steps = sampler.steps(sampler_lib.GREEDY)
    cache = sampler._place_cache(  # pylint: disable=protected-access
        init_cache(cfg, len(rows), 64, jnp.float32)
    )
    placed = sampler._place_rows(tokens, mask)  # pylint: disable=protected-access
    logits, _ = steps.prefill(sampler.params, *placed, cache)
    return np.asarray(logits)

  expected = prefill_logits(sampler_lib.Sampler(model, params))
  mesh = mesh_lib.make_mesh({'data': 2, 'tensor': 4})
  ours = prefill_logits(sampler_lib.Sampler(model, params, mesh=mesh))
  bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
  assert float(np.abs(ours - expected).max()) <= bound
