"""End-to-end check on CPU: build a small Gemma 4, save it in every layout,
inspect and reload each checkpoint, and confirm the logits do not change.

    python -m eval.roundtrip --config=configs/tiny_e2b.py

Prints the checkpoint summaries, load times and the greedy next tokens of a
random batch. Exits non-zero if a reloaded checkpoint gives different logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

from absl import app
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from gemma4_jax import checkpoint
from gemma4_jax import config as config_lib
from gemma4_jax.checkpoint import inspect as inspect_lib
from gemma4_jax.transformer import Transformer

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/tiny_e2b.py', 'Run configuration file.'
)

LAYOUTS = ('nested', 'flat', 'stacked')


def main(argv) -> int:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Orbax logs every save step at INFO through absl; keep only its warnings.
  logging.getLogger('absl').setLevel(logging.WARNING)
  run = _CONFIG.value

  model_config = dataclasses.replace(
      config_lib.get_preset(run.preset),
      name=f'tiny_{run.preset}',
      **run.model.to_dict(),
  )
  model = Transformer(config=model_config, dtype=jnp.float32)
  rng = np.random.default_rng(run.seed)
  tokens = rng.integers(
      1, model_config.vocab_size, (run.batch_size, run.length)
  ).astype(np.int32)
  tokens[-1, run.length // 2 :] = 0  # Right padding on the last row.

  start = time.perf_counter()
  params = model.init(jax.random.key(run.seed), jnp.asarray(tokens))['params']
  num_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info(
      'initialised %s: %d parameters in %.1f s',
      model_config.name,
      num_params,
      time.perf_counter() - start,
  )

  forward = jax.jit(lambda p, t: model.apply({'params': p}, t).logits)
  reference = np.asarray(forward(params, jnp.asarray(tokens)))
  valid = tokens != 0

  workdir = run.workdir
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  failures = 0
  for layout in LAYOUTS:
    path = os.path.join(workdir, layout)
    start = time.perf_counter()
    try:
      checkpoint.save_params(params, path, layout=layout)
    except checkpoint.CheckpointError as error:
      # E2B-style models cannot be stacked: their KV-shared layers have a
      # wider MLP than the other layers at the same pattern position.
      print(f'{layout:8s} skipped: {error}\n')
      continue
    saved_in = time.perf_counter() - start

    print(inspect_lib.format_summary(checkpoint.inspect_checkpoint(path)))

    start = time.perf_counter()
    loaded = checkpoint.load_params(
        path, config=model_config, dtype=jnp.float32
    )
    loaded_in = time.perf_counter() - start
    logits = np.asarray(forward(loaded, jnp.asarray(tokens)))
    error = float(np.abs(logits - reference)[valid].max())
    status = 'ok' if error == 0.0 else 'MISMATCH'
    failures += error != 0.0
    print(
        f'{layout:8s} saved in {saved_in:.2f} s, loaded in {loaded_in:.2f} s,'
        f' max |logits - original| = {error:.3g} [{status}]\n'
    )

  greedy = reference.argmax(-1)
  for row in range(tokens.shape[0]):
    n = int(valid[row].sum())
    print(f'row {row}: last inputs {tokens[row, n - 4:n].tolist()}'
          f' -> greedy next tokens {greedy[row, n - 4:n].tolist()}')
  return 1 if failures else 0


if __name__ == '__main__':
  app.run(main)
