"""Forward-pass speed and compiled memory: gemma4-jax against the official
`gemma` 4.0.1 package, same parameters, same machine, same process.

    python benchmarks/forward.py --family 26b_a4b_like --batch 4 --length 512

Both models are jit-compiled on the same parameters; each is timed over
`--repeats` calls after a warm-up, and the script prints medians, the ratio
official / ours (above 1 means we are faster) and XLA's compiled temporary
memory for each. Needs the test extra (`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, '.')
from gemma4_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
from tests import oracle  # pylint: disable=g-import-not-at-top


def time_calls(fn, *args, repeats: int) -> list[float]:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def temp_bytes(fn, *args) -> int:
  analysis = fn.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, 'temp_size_in_bytes', 0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--family', default='26b_a4b_like',
                      choices=sorted(oracle.SMALL_CONFIGS))
  parser.add_argument('--width', type=int, default=4,
                      help='multiply embed, hidden and expert widths by this')
  parser.add_argument('--experts', type=int, default=0,
                      help='override the expert count of MoE configs')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()

  base = oracle.SMALL_CONFIGS[args.family]
  changes = dict(
      embed_dim=base.embed_dim * args.width,
      hidden_dim=base.hidden_dim * args.width,
      sliding_window=128,
  )
  if base.kv_shared_hidden_dim:
    changes['kv_shared_hidden_dim'] = base.kv_shared_hidden_dim * args.width
  if base.is_moe:
    changes['expert_hidden_dim'] = base.expert_hidden_dim * args.width
    if args.experts:
      changes['num_experts'] = args.experts
  cfg = dataclasses.replace(base, **changes)
  dtype = jnp.dtype(args.dtype)

  official = oracle.official_model(cfg, dtype)
  tokens = np.random.default_rng(0).integers(
      1, cfg.vocab_size, (args.batch, args.length)
  ).astype(np.int32)
  tokens = jnp.asarray(tokens)
  params = official.init(jax.random.key(0), tokens[:, :8])['params']
  ours = Transformer(config=cfg, dtype=dtype)

  official_fn = jax.jit(
      lambda p, t: official.apply({'params': p}, t).logits
  )
  ours_fn = jax.jit(lambda p, t: ours.apply({'params': p}, t).logits)

  official_times = time_calls(official_fn, params, tokens,
                              repeats=args.repeats)
  ours_times = time_calls(ours_fn, params, tokens, repeats=args.repeats)
  official_median = statistics.median(official_times)
  ours_median = statistics.median(ours_times)
  official_temp = temp_bytes(official_fn, params, tokens)
  ours_temp = temp_bytes(ours_fn, params, tokens)

  print(f'config {cfg.name}: embed {cfg.embed_dim}, layers {cfg.num_layers},'
        f' experts {cfg.num_experts}, batch {args.batch}, length'
        f' {args.length}, {args.dtype}, backend {jax.default_backend()}')
  print(f'official forward: median {official_median * 1e3:8.1f} ms,'
        f' compiled temp {official_temp / 2**20:8.1f} MiB')
  print(f'ours forward:     median {ours_median * 1e3:8.1f} ms,'
        f' compiled temp {ours_temp / 2**20:8.1f} MiB')
  print(f'speed ratio official/ours: {official_median / ours_median:.2f}x;'
        f' temp memory ratio official/ours:'
        f' {official_temp / max(ours_temp, 1):.2f}x')


if __name__ == '__main__':
  main()
