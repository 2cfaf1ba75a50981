"""Prefill and decode speed and KV-cache size: ours against the official
`gemma` 4.0.1 sampler, same parameters, same machine, same run.

    python benchmarks/decode.py                       # the full 31B-shaped run
    python benchmarks/decode.py --embed 256 --ffw 1024 --vocab 32768 \
        --cases 1x256,1x1024 --window 128            # a quick smoke run

The default model is a reduced 31B: six layers (5 local + 1 global), embed
2048, 16 query heads, 8 local KV heads of 256, 2 global KV heads of 512 with
keys equal to values, window 1024, FFW 8192, the 262144-token vocabulary,
bfloat16. For each case BATCHxPROMPT it generates `--new-tokens` greedy
tokens with both samplers and prints prefill and decode tokens/s, their
ratios (ours / official, above 1 means we are faster), both KV-cache sizes,
and our bytes read per decode step against the memory bandwidth measured in
this run. Each sampler is compiled in a warm-up round, then timed over
`--repeats` rounds (fresh cache, prefill, decode); medians are printed.
The official prefill computes float32 attention over the whole cache for
all heads at once. In a case where that would need more than
`--official-max-gib` for the whole batch but not for one row (16x8192 on a
24 GiB machine), each sampler prefills one row and decodes that row's cache
copied to every row, so decode is still measured at full batch. Cases where
one row does not fit either run ours only. See also `--prefill-chunk`.
Needs the test extra (`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, '.')
from gemma4_jax.config import GLOBAL, LOCAL, Gemma4Config  # pylint: disable=g-import-not-at-top
from gemma4_jax.sampling import cache as cache_lib  # pylint: disable=g-import-not-at-top
from gemma4_jax.sampling.sampler import make_steps, sample_tokens, GREEDY  # pylint: disable=g-import-not-at-top
from gemma4_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
from tests import oracle  # pylint: disable=g-import-not-at-top


def reduced_31b(args) -> Gemma4Config:
  return Gemma4Config(
      name='31b_reduced',
      vocab_size=args.vocab,
      embed_dim=args.embed,
      num_layers=6,
      attention_pattern=(LOCAL,) * 5 + (GLOBAL,),
      num_heads=16,
      head_dim=256,
      num_kv_heads=8,
      global_head_dim=512,
      num_global_kv_heads=2,
      k_eq_v_global=True,
      sliding_window=args.window,
      hidden_dim=args.ffw,
      vision_bidirectional=True,
  )


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes per second of a jitted sum over a `num_bytes` bfloat16 array."""
  x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
  total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  total(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    times.append(time.perf_counter() - start)
  del x
  return num_bytes / statistics.median(times)


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def tile_rows(tree, rows: int):
  """Repeat each array of `tree` whose batch axis is 1 to `rows` rows."""
  def tile(x):
    if isinstance(x, jax.Array) and x.ndim and x.shape[0] == 1:
      return jnp.repeat(x, rows, axis=0)
    return x
  return jax.tree.map(tile, tree)


def run_ours(model, params, tokens, new_tokens: int, repeats: int,
             prefill_chunk: int, tile: int = 1):
  """Time our prefill and our compiled decode loop, as a dict.

  With `prefill_chunk` > 0 the prompt goes in chunks of that many tokens:
  the first through `prefill`, the others through `extend`. With `tile` > 1,
  `tokens` has one row: it is prefilled alone and its cache copied to
  `tile` rows (not timed) before the decode loop.
  """
  cfg = model.config
  batch, prompt = tokens.shape
  steps = make_steps(model, GREEDY)
  chunk = prefill_chunk or prompt
  if prompt % chunk:
    raise ValueError(
        f'invalid --prefill-chunk {chunk}: it must divide the prompt length'
        f' {prompt}; pick a divisor or 0'
    )
  starts = range(0, prompt, chunk)

  def prefill(num_chunks=None):
    cache = cache_lib.init_cache(cfg, batch, prompt + new_tokens, model.dtype)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    for begin in list(starts)[:num_chunks]:
      part = tokens[:, begin : begin + chunk]
      step = steps.prefill if begin == 0 else steps.extend
      logits, cache = step(params, part, jnp.ones(part.shape, bool), cache)
    logits.block_until_ready()
    return logits, cache, time.perf_counter() - start

  def decode(logits, cache):
    if tile > 1:
      logits, cache = tile_rows((logits, cache), tile)
    first = sample_tokens(logits, jax.random.key(0), GREEDY)
    jax.block_until_ready((first, cache))
    start = time.perf_counter()
    out, cache = steps.decode_loop(
        params, first, cache, jax.random.key(1), new_tokens, ()
    )
    out.block_until_ready()
    return out, cache, time.perf_counter() - start

  # Warm-up: compile each step on a prefix of the prompt (a chunk of each
  # kind fills the compile caches) and the decode loop.
  logits, cache, _ = prefill(num_chunks=2)
  decode(logits, cache)
  del logits, cache

  prefill_times, decode_times = [], []
  for _ in range(repeats):
    logits, cache, prefill_s = prefill()
    out, cache, decode_s = decode(logits, cache)
    out = np.asarray(out)
    prefill_times.append(prefill_s)
    decode_times.append(decode_s)
    cache_bytes = cache.nbytes()
    del cache, logits
  return dict(
      prefill_s=statistics.median(prefill_times),
      decode_s=statistics.median(decode_times),
      cache_bytes=cache_bytes,
      tokens=out,
  )


def run_official(official, params, tokens, new_tokens: int, repeats: int,
                 tile: int = 1):
  """Time the official prefill and its compiled sampling loop.

  `tile` works as in `run_ours`.
  """
  from gemma.gm.text import _prefill
  from gemma.gm.text import _sampler_loop
  from gemma.gm.text import _sampling
  from gemma.gm.text import _tokenizer
  from gemma.gm.utils import _types

  batch, prompt = tokens.shape
  cache_length = prompt + new_tokens
  inputs = _types.Input(
      text=tokens, images=None, config=official.config.input_config
  )
  loop = _sampler_loop.SamplerLoop(
      model=official,
      end_tokens=(),
      forbidden_tokens=None,
      sampling=_sampling.Greedy(),
      cache_length=cache_length,
      special_tokens=_tokenizer.Gemma4Tokenizer.special_tokens,
  )
  prefill = functools.partial(
      _prefill.prefill,
      model=official,
      params=params,
      input=inputs,
      last_state=None,
      cache_length=cache_length,
      max_out_length=new_tokens,
      pad_length=None,
      rng=jax.random.key(0),
      sharding=None,
  )

  def decode(state):
    return loop.sample(
        params=params,
        init_state=state,
        max_new_tokens=jnp.asarray(new_tokens),
    )

  prefill_times, decode_times = [], []
  for _ in range(repeats + 1):  # The first round compiles: not counted.
    start = time.perf_counter()
    state = prefill()
    jax.block_until_ready(state)
    prefill_times.append(time.perf_counter() - start)
    if tile > 1:
      state = tile_rows(state, tile)
      jax.block_until_ready(state)
    cache_bytes = tree_bytes(state.cache)

    start = time.perf_counter()
    final = decode(state)
    jax.block_until_ready(final.predicted_tokens)
    decode_times.append(time.perf_counter() - start)
    out = np.asarray(final.predicted_tokens)
    del state, final
  return dict(
      prefill_s=statistics.median(prefill_times[1:]),
      decode_s=statistics.median(decode_times[1:]),
      cache_bytes=cache_bytes,
      tokens=out,
  )


def official_prefill_gib(cfg: Gemma4Config, batch: int, prompt: int,
                         new_tokens: int) -> float:
  """Estimate the peak GiB of the official prefill's attention.

  It holds float32 logits and probabilities over the whole cache for all
  heads at once; the estimate counts those two arrays only.
  """
  return 2 * batch * prompt * cfg.num_heads * (prompt + new_tokens) * 4 / 2**30


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--embed', type=int, default=2048)
  parser.add_argument('--ffw', type=int, default=8192)
  parser.add_argument('--vocab', type=int, default=262_144)
  parser.add_argument('--window', type=int, default=1024)
  parser.add_argument('--cases', default='1x256,1x8192,16x8192',
                      help='comma-separated BATCHxPROMPT cases')
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16',
                      choices=['bfloat16', 'float32'])
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed rounds per case after a warm-up round;'
                      ' medians are printed')
  parser.add_argument('--prefill-chunk', type=int, default=0,
                      help='feed our prompt in chunks of this many tokens'
                      ' (0: whole prompt at once, as the official does)')
  parser.add_argument('--official-max-gib', type=float, default=14.0,
                      help='skip the official sampler in cases whose'
                      ' prefill attention would need more memory than this')
  args = parser.parse_args()

  cfg = reduced_31b(args)
  dtype = jnp.dtype(args.dtype)
  model = Transformer(config=cfg, dtype=dtype)
  official = oracle.official_model(cfg, dtype)
  start = time.perf_counter()
  params = jax.jit(model.init)(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']
  params_bytes = tree_bytes(params)
  print(f'{cfg.name}: {sum(x.size for x in jax.tree.leaves(params)) / 1e9:.2f}'
        f' B parameters ({params_bytes / 2**30:.2f} GiB {args.dtype}),'
        f' initialised in {time.perf_counter() - start:.1f} s;'
        f' backend {jax.default_backend()}, {jax.device_count()} device(s)')
  bandwidth = measure_bandwidth()
  print(f'memory bandwidth (jitted 1 GiB sum): {bandwidth / 1e9:.1f} GB/s')

  rng = np.random.default_rng(0)
  for case in args.cases.split(','):
    batch, prompt = (int(v) for v in case.lower().split('x'))
    tokens = jnp.asarray(
        rng.integers(3, cfg.vocab_size, (batch, prompt)), jnp.int32
    )
    need = official_prefill_gib(cfg, batch, prompt, args.new_tokens)
    # When the official prefill of the whole batch does not fit but one row
    # does, both samplers prefill one row and decode it copied to every row.
    tile = 1
    if (need > args.official_max_gib and batch > 1
        and need / batch <= args.official_max_gib):
      tile, need = batch, need / batch
      tokens = tokens[:1]
    ours = run_ours(model, params, tokens, args.new_tokens, args.repeats,
                    args.prefill_chunk, tile)
    step_bytes = params_bytes + ours['cache_bytes']
    step_s = ours['decode_s'] / (args.new_tokens - 1)
    decoded = batch * (args.new_tokens - 1)
    ours_decode = decoded / ours['decode_s']
    prefilled = batch * prompt // tile
    ours_prefill = prefilled / ours['prefill_s']
    chunking = (f', our prompt in chunks of {args.prefill_chunk}'
                if args.prefill_chunk else '')
    print(f'\ncase batch {batch}, prompt {prompt}, {args.new_tokens} new'
          f' tokens (medians of {args.repeats}{chunking})')
    if tile > 1:
      print(f'  the official prefill of {batch} rows needs'
            f' ~{need * batch:.0f} GiB (over --official-max-gib'
            f' {args.official_max_gib:g}), so each sampler prefills one row'
            f' and decodes it copied to {batch} rows; prefill figures are'
            ' for that one row')
    print(f'  ours: decode {ours_decode:.1f} tokens/s, prefill'
          f' {ours_prefill:.1f} tokens/s, KV cache'
          f' {ours["cache_bytes"] / 2**20:.1f} MiB', flush=True)
    theirs = None
    if need <= args.official_max_gib:
      theirs = run_official(official, params, tokens, args.new_tokens,
                            args.repeats, tile)
    else:
      print(f'  official skipped: its prefill attention needs ~{need:.0f} GiB'
            f' (over --official-max-gib {args.official_max_gib:g})')
    if theirs is not None:
      theirs_decode = decoded / theirs['decode_s']
      theirs_prefill = prefilled / theirs['prefill_s']
      agree = float(np.mean(
          ours['tokens'][:, : args.new_tokens]
          == theirs['tokens'][:, : args.new_tokens]
      ))
      print(f'  greedy tokens agree at {agree:.0%}')
      print(f'  decode  tokens/s: ours {ours_decode:9.1f}  official'
            f' {theirs_decode:9.1f}  ratio {ours_decode / theirs_decode:.2f}x')
      print(f'  prefill tokens/s: ours {ours_prefill:9.1f}  official'
            f' {theirs_prefill:9.1f}  ratio'
            f' {ours_prefill / theirs_prefill:.2f}x')
      print(f'  KV cache: ours {ours["cache_bytes"] / 2**20:9.1f} MiB  official'
            f' {theirs["cache_bytes"] / 2**20:9.1f} MiB  ratio'
            f' {ours["cache_bytes"] / theirs["cache_bytes"]:.3f}')
    print(f'  bytes read per decode step (params + cache):'
          f' {step_bytes / 2**20:.1f} MiB; at {bandwidth / 1e9:.1f} GB/s that'
          f' takes {step_bytes / bandwidth * 1e3:.1f} ms, measured'
          f' {step_s * 1e3:.1f} ms per step'
          f' ({step_bytes / bandwidth / step_s:.0%} of the bandwidth limit)',
          flush=True)


if __name__ == '__main__':
  main()
