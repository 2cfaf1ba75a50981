"""The shipped run configs build the model, optimizer and LoRA they describe.

Each release config is loaded as `train.finetune` loads it, and its model
and adapters are built abstractly (`jax.eval_shape`, no memory) at the
released sizes. The expected parameter counts come from the checkpoint
shape tables, independent of the model code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from gemma4_jax import checkpoint
from gemma4_jax.config import get_preset
from gemma4_jax.training import lora as lora_lib
from gemma4_jax.training import trainer
from gemma4_jax.transformer import Transformer

CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
RELEASE = tuple(
    f'{preset}_{kind}'
    for preset in ('e2b', 'e4b', '26b_a4b', '31b')
    for kind in ('lora', 'full')
)


class _ReleaseTokenizer:
  vocab_size = 262144


def load(name: str):
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name', RELEASE)
def test_release_config_builds(name):
  run = load(name)
  cfg = trainer.model_config(run, _ReleaseTokenizer())
  assert cfg == get_preset(run.model.preset)
  opt = trainer.optimizer_config(run)
  assert run.data.batch_size % opt.num_microbatches == 0
  assert run.model.remat in ('none', 'dots', 'full')

  model = Transformer(config=cfg, dtype=jnp.bfloat16, remat=run.model.remat)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  )['params']
  expected = checkpoint.count_params(checkpoint.expected_param_shapes(cfg))
  assert sum(x.size for x in jax.tree.leaves(params)) == expected

  if run.lora.rank:
    lora = trainer._lora_config(run)  # pylint: disable=protected-access
    adapters = jax.eval_shape(
        lambda p: lora_lib.init_adapters(
            p, lora, jax.random.key(0), model_config=cfg
        ),
        params,
    )
    counts = lora_lib.trainable_counts(adapters)
    print(name, lora_lib.describe_trainable(adapters))
    assert counts['total']['params'] < 0.05 * expected
    if cfg.is_moe:
      assert counts['experts_gating']['params'] > 0
      assert counts['experts_linear']['params'] > 0
