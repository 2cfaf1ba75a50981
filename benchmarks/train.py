"""Train-step speed and model-FLOPs utilisation: our compiled step against a
plain optax loop around the official `gemma` 4.0.1 model, same machine, same
process, same parameters and batch.

    python benchmarks/train.py                    # the mid-sized float32 run
    python benchmarks/train.py --embed 256 --ffw 1024 --vocab 8192 \
        --length 256 --repeats 3                  # a quick smoke run

The model is a reduced 31B: `--layers` decoder layers in the 31B pattern
(5 local, 1 global), k_eq_v global layers, 8 query heads. The batch is
`--batch` rows of `--length` positions, each row packed with documents of
random length, so attention never crosses a document (segment ids).

Three train steps run on that batch, one after another in each round, so
that load from other processes hits all of them alike:

  official full  `official.apply` gives the [B, L, V] logits, then a float32
                 cross-entropy over the weighted targets, `jax.value_and_grad`,
                 global-norm clipping and `optax.adamw`, in one `jax.jit`
                 with parameters and optimizer state donated. The packed
                 segments become its [B, L, L] `attention_mask`.
  ours full      `make_train_step(model, config,
                 loss_chunk_size=--loss-chunk)`.
  ours LoRA      `make_train_step(model, config, lora=...)`: rank 16 on the
                 q, kv, o, gating and linear weights, frozen base parameters.

There is no official LoRA row: in `gemma` 4.0.1 the `gm.nn.LoRA` wrapper
replaces only the Einsum class of Gemma 1 to 3, so it adds no adapter to a
Gemma 4 model. Both LoRA and full steps are compared with the official full
step.

Both full steps keep float32 master parameters and compute in `--dtype`, so
with the default float32 the two compute the same function. Each round also
times a jitted `--peak-size`-cubed matmul in the compute dtype. The median
of those is the peak FLOP/s of this run, and each step's model-FLOPs
utilisation (MFU) is its model FLOPs per second over that peak.

Model FLOPs of one step, counted over the T non-padding tokens of a batch:

    forward matmuls  F = 2 T (P + V D)
    attention        A = sum over layers and tokens of 4 N H_l S_t
    full step        3 F + 3 A
    LoRA step        2 F + 3 A + 6 T P_lora

P is the number of weights of every decoder-layer matmul and V D that of
the output projection, which is the tied embedding (the input lookup is not
a matmul). N is the number of query heads and H_l the layer's head width.
S_t is the number of keys that token t sees: itself and the earlier tokens
of its own document, at most `sliding_window` of them in local layers.
Attention therefore counts the causal, windowed work only, not the
masked-out part of the L x L score matrix that both implementations
compute. A full step's backward pass costs twice its forward pass
(gradients of activations and of weights). A LoRA step does not need the
frozen weights' gradients, so its backward pass over the frozen model costs
one forward pass, plus the adapters' own forward and backward pass (P_lora
adapter weights). The LoRA figure is then the utilisation of the work LoRA
needs, whatever the step computes.

tokens/s is non-padding tokens per second. "vs official" is the official
step's time over ours in the same round (the median over the rounds), so
above 1 means ours is faster. "CPU s" is the process CPU time of one step
(all threads), and "CPU vs official" the same ratio on CPU time: when other
processes share the cores, wall time includes the time they take and CPU
time does not, so the two ratios bracket the effect of that load. "temp
MiB" is XLA's compiled temporary memory of each step. Needs the test extra
(`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, '.')
from gemma4_jax.config import GLOBAL, LOCAL, Gemma4Config  # pylint: disable=g-import-not-at-top
from gemma4_jax.training import lora as lora_lib  # pylint: disable=g-import-not-at-top
from gemma4_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
from gemma4_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top
from tests import oracle  # pylint: disable=g-import-not-at-top


def reduced_31b(args) -> Gemma4Config:
  return Gemma4Config(
      name='31b_mid',
      vocab_size=args.vocab,
      embed_dim=args.embed,
      num_layers=args.layers,
      attention_pattern=(LOCAL,) * 5 + (GLOBAL,),
      num_heads=8,
      head_dim=args.head_dim,
      num_kv_heads=4,
      global_head_dim=2 * args.head_dim,
      num_global_kv_heads=1,
      k_eq_v_global=True,
      sliding_window=args.window,
      hidden_dim=args.ffw,
      vision_bidirectional=True,
  )


def packed_batch(
    vocab_size: int, batch: int, length: int, seed: int = 0
) -> dict[str, np.ndarray]:
  """Build rows filled with documents of 1/8 to 1/2 of a row, the last one cut.

  Every position is a real token. The first 16 positions of each document
  (a prompt) have loss weight 0, the rest weight 1.
  """
  rng = np.random.default_rng(seed)
  arrays = {
      name: np.zeros((batch, length), np.int32)
      for name in ('tokens', 'targets', 'positions', 'segment_ids')
  }
  arrays['loss_weights'] = np.zeros((batch, length), np.float32)
  for row in range(batch):
    start, segment = 0, 1
    while start < length:
      size = min(int(rng.integers(length // 8, length // 2 + 1)), length - start)
      span = slice(start, start + size)
      arrays['tokens'][row, span] = rng.integers(1, vocab_size, size)
      arrays['targets'][row, span] = rng.integers(1, vocab_size, size)
      arrays['positions'][row, span] = np.arange(size)
      arrays['segment_ids'][row, span] = segment
      arrays['loss_weights'][row, start + 16 : start + size] = 1.0
      start += size
      segment += 1
  return arrays


def visible_keys(cfg: Gemma4Config, positions: np.ndarray,
                 segment_ids: np.ndarray) -> int:
  """Return the sum over layers and non-padding tokens of N H_l S_t."""
  valid = segment_ids != 0
  seen_global = np.where(valid, positions + 1, 0).sum()
  seen_local = np.where(
      valid, np.minimum(positions + 1, cfg.sliding_window), 0
  ).sum()
  total = 0
  for layer, kind in enumerate(cfg.layer_kinds):
    seen = seen_global if kind == GLOBAL else seen_local
    total += cfg.num_heads * cfg.layer_head_dim(layer) * int(seen)
  return total


def matmul_weights(params: Any) -> int:
  """Count the weights of the decoder layers' matmuls (leaves of 2+ axes)."""
  return sum(
      leaf.size
      for name, layer in params.items()
      if name.startswith('layer_')
      for leaf in jax.tree.leaves(layer)
      if leaf.ndim >= 2
  )


def model_flops(cfg: Gemma4Config, params: Any, adapters: Any,
                batch: dict[str, np.ndarray]) -> tuple[float, float]:
  """Return the model FLOPs of one full and one LoRA step (module docstring)."""
  tokens = int((batch['segment_ids'] != 0).sum())
  forward = 2 * tokens * (
      matmul_weights(params) + cfg.vocab_size * cfg.embed_dim
  )
  attention = 4 * visible_keys(cfg, batch['positions'], batch['segment_ids'])
  adapter_weights = sum(x.size for x in jax.tree.leaves(adapters))
  full = 3 * forward + 3 * attention
  lora = 2 * forward + 3 * attention + 6 * tokens * adapter_weights
  return float(full), float(lora)


def official_train_step(official, config: step_lib.OptimizerConfig):
  """Build a train step as a user of the official package would write it.

  Full logits from `official.apply`, a float32 cross-entropy, one `jax.jit`
  with the parameters and optimizer state donated. The optimizer has our
  hyper-parameters, built from optax directly.

  Returns:
    The jitted step `(params, opt_state, batch) -> (params, opt_state,
    loss)` and its optimizer.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps,
      end_value=config.learning_rate * config.end_learning_rate_fraction,
  )
  optimizer = optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      optax.adamw(
          schedule,
          b1=config.b1,
          b2=config.b2,
          eps=config.eps,
          weight_decay=config.weight_decay,
          # Matrices and embeddings only, as `decay_embeddings=True` does in
          # ours: the two masks agree on this model.
          mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
      ),
  )

  def loss_fn(params, batch):
    segment_ids = batch['segment_ids']
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    mask = causal & same_segment & (segment_ids != 0)[:, None, :]
    logits = official.apply(
        {'params': params},
        batch['tokens'],
        positions=batch['positions'],
        attention_mask=mask,
    ).logits
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(log_probs, batch['targets'][..., None], -1)
    weights = batch['loss_weights']
    return -jnp.sum(target[..., 0] * weights) / jnp.sum(weights)

  def train_step(params, opt_state, batch):
    compute = jax.tree.map(lambda x: x.astype(official.dtype), params)
    loss, grads = jax.value_and_grad(loss_fn)(compute, batch)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1)), optimizer


class TimedStep:
  """A compiled step, its current state and the wall time of each call."""

  def __init__(self, name: str, jitted, state: tuple, extra: tuple,
               flops: float):
    self.name = name
    self.compiled = jitted.lower(*state, *extra).compile()
    analysis = self.compiled.memory_analysis()
    self.temp_bytes = int(getattr(analysis, 'temp_size_in_bytes', 0))
    self.state = state
    self.extra = extra
    self.flops = flops
    self.times: list[float] = []
    self.cpu_times: list[float] = []
    self.losses: list[float] = []

  def call(self) -> tuple[float, float]:
    """Run one step; return its wall time and process CPU time, in seconds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    out = self.compiled(*self.state, *self.extra)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    cpu_elapsed = time.process_time() - cpu_start
    *state, loss = out
    self.state = tuple(state)
    self.losses.append(float(loss))
    return elapsed, cpu_elapsed


def timed_peak(size: int, dtype) -> Callable[[], float]:
  """Return a function that times one jitted size^3 matmul, in FLOP/s."""
  keys = jax.random.split(jax.random.key(1))
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()

  def measure() -> float:
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    return 2 * size**3 / (time.perf_counter() - start)

  return measure


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--embed', type=int, default=512)
  parser.add_argument('--layers', type=int, default=6)
  parser.add_argument('--head-dim', type=int, default=128,
                      help='local head width; global heads are twice as wide')
  parser.add_argument('--ffw', type=int, default=2048, help='MLP hidden width')
  parser.add_argument('--vocab', type=int, default=32768)
  parser.add_argument('--window', type=int, default=256,
                      help='sliding window of the local layers, in tokens')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16'],
                      help='compute dtype of all three steps and of the peak')
  parser.add_argument('--lora-rank', type=int, default=16)
  parser.add_argument('--loss-chunk', type=int, default=512,
                      help='loss_chunk_size of our steps, in positions (512'
                      ' is the default of make_train_step)')
  parser.add_argument('--remat', default='none', choices=['none', 'dots', 'full'],
                      help='remat of our model (the official one has none)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed rounds after two warm-up rounds')
  parser.add_argument('--peak-size', type=int, default=2048,
                      help='side of the square matmul that measures the peak')
  return parser.parse_args()


def build_steps(args, cfg: Gemma4Config) -> tuple[list[TimedStep], int]:
  """Compile the three steps on shared parameters and one packed batch."""
  dtype = jnp.dtype(args.dtype)
  config = step_lib.OptimizerConfig(
      learning_rate=1e-5,
      total_steps=1000,
      warmup_steps=10,
      weight_decay=0.01,
      decay_embeddings=True,
      max_grad_norm=1.0,
  )
  lora_config = lora_lib.LoraConfig(rank=args.lora_rank, alpha=32.0)

  # float32 parameters, as the official `init` makes them. Each step gets
  # its own copy, because each donates its state.
  params = jax.jit(oracle.official_model(cfg, jnp.float32).init)(
      jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  base_params = jax.tree.map(lambda x: x.astype(dtype), params)
  adapters = lora_lib.init_adapters(
      params, lora_config, jax.random.key(2), model_config=cfg
  )
  batch_np = packed_batch(cfg.vocab_size, args.batch, args.length)
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  tokens = int((batch_np['segment_ids'] != 0).sum())
  full_flops, lora_flops = model_flops(cfg, params, adapters, batch_np)

  print(f'config {cfg.name}:'
        f' {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M'
        f' parameters, embed {cfg.embed_dim}, {cfg.num_layers} layers, FFW'
        f' {cfg.hidden_dim}, vocab {cfg.vocab_size}, window'
        f' {cfg.sliding_window}; batch {args.batch} x {args.length} packed'
        f' ({int(batch_np["segment_ids"].max())} documents in the longest'
        f' row), {args.dtype}, loss chunk {args.loss_chunk}, backend'
        f' {jax.default_backend()}, {os.cpu_count()} CPUs')
  print(f'model FLOPs per step: full {full_flops / 1e12:.3f} T, LoRA'
        f' {lora_flops / 1e12:.3f} T (rank {args.lora_rank},'
        f' {sum(x.size for x in jax.tree.leaves(adapters)) / 1e6:.2f} M'
        ' adapter weights)')

  def with_loss(step_fn):
    # Our steps return (state, metrics), and TimedStep expects (*state, loss).
    def run(state, *rest):
      state, metrics = step_fn(state, *rest)
      return state, metrics['loss']
    return jax.jit(run, donate_argnums=0)

  start = time.perf_counter()
  official = oracle.official_model(cfg, dtype)
  official_step, official_optimizer = official_train_step(official, config)
  official_params = copy(params)
  official_state = (official_params, official_optimizer.init(official_params))
  steps = [
      TimedStep('official full', official_step, official_state, (batch,),
                full_flops)
  ]

  model = Transformer(config=cfg, dtype=dtype, remat=args.remat)
  full_step = step_lib.make_train_step(
      model, config, loss_chunk_size=args.loss_chunk
  )
  full_state = step_lib.init_train_state(copy(params), config,
                                         jax.random.key(3))
  steps.append(TimedStep('ours full', with_loss(full_step), (full_state,),
                         (batch,), full_flops))

  lora_step = step_lib.make_train_step(
      model, config, lora=lora_config, loss_chunk_size=args.loss_chunk
  )
  lora_state = step_lib.init_train_state(adapters, config, jax.random.key(3))
  steps.append(TimedStep('ours LoRA', with_loss(lora_step), (lora_state,),
                         (batch, base_params), lora_flops))
  print(f'compiled the three steps in {time.perf_counter() - start:.1f} s')
  return steps, tokens


def main() -> None:
  args = parse_args()
  cfg = reduced_31b(args)
  steps, tokens = build_steps(args, cfg)

  # Each round calls every step once, each call followed by one peak matmul,
  # in an order rotated by one step per round, so that a change of load hits
  # every figure alike.
  peak = timed_peak(args.peak_size, jnp.dtype(args.dtype))
  peaks = []
  loads = []
  for round_index in range(2 + args.repeats):
    warm_up = round_index < 2
    shift = round_index % len(steps)
    for step in steps[shift:] + steps[:shift]:
      elapsed, cpu_elapsed = step.call()
      if not warm_up:
        step.times.append(elapsed)
        step.cpu_times.append(cpu_elapsed)
        peaks.append(peak())
    loads.append(os.getloadavg()[0])
  peak_flops = statistics.median(peaks)

  print(f'\nmatmul peak ({args.peak_size}^3 {args.dtype}, median of'
        f' {len(peaks)}): {peak_flops / 1e9:.1f} GFLOP/s; load average'
        f' (1 min) after each round: {", ".join(f"{x:.1f}" for x in loads)}')
  print(f'{args.repeats} timed rounds after 2 warm-up rounds, {tokens}'
        ' tokens per step; medians over the rounds\n')
  header = (f'{"step":<14} {"ms/step":>9} {"tokens/s":>9} {"MFU":>6}'
            f' {"vs official":>11} {"(range)":>11} {"CPU s":>6}'
            f' {"CPU vs official":>15} {"temp MiB":>9}  loss (first, last)')
  print(header)
  print('-' * len(header))
  for step in steps:
    median = statistics.median(step.times)
    ratios = [
        official / ours for official, ours in zip(steps[0].times, step.times)
    ]
    cpu_ratios = [
        official / ours
        for official, ours in zip(steps[0].cpu_times, step.cpu_times)
    ]
    ratio_range = f'{min(ratios):.2f}-{max(ratios):.2f}'
    print(f'{step.name:<14} {median * 1e3:9.1f} {tokens / median:9.1f}'
          f' {step.flops / median / peak_flops:6.1%}'
          f' {statistics.median(ratios):10.2f}x {ratio_range:>11}'
          f' {statistics.median(step.cpu_times):6.2f}'
          f' {statistics.median(cpu_ratios):14.2f}x'
          f' {step.temp_bytes / 2**20:9.1f}'
          f'  {step.losses[0]:.4f}, {step.losses[-1]:.4f}')
  print('\nms per round: ' + '; '.join(
      f'{step.name} ' + ' '.join(f'{t * 1e3:.0f}' for t in step.times)
      for step in steps
  ))


if __name__ == '__main__':
  main()
