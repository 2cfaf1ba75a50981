"""Bytes an expert-parallel MoE block exchanges per step, against gathering weights.

    python benchmarks/moe_exchange.py                      # small layer, seconds
    python benchmarks/moe_exchange.py --shape 26b_a4b --tokens-per-device 4096

The MoE block with `implementation='all_to_all'` is compiled (not run) on a
mesh of `--devices` simulated CPU devices on the `expert` axis, for the
forward pass and for the forward and backward pass of a training step.
Parameters and tokens are abstract (`jax.ShapeDtypeStruct`), so the 26B-A4B
layer compiles without allocating its weights. The script prints:

- the all-to-all bytes per device read from the compiled HLO text (the
  result shapes of every `all-to-all`), and the part that leaves the device
  ((n - 1) / n of it, since one chunk of each buffer stays local);
- the analytic count: routed token rows (tokens x k x D x bytes per element)
  each way, and the fixed-size buffers that carry them;
- the bytes one device receives to all-gather every expert's weights of the
  layer: (n - 1) / n of E x 3 x F x D x bytes per element. A block without
  expert parallelism moves that much when XLA gathers the weights;
- the ratio of the two (below 1: the exchange moves fewer bytes).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys

# Simulated CPU devices must be requested before JAX starts.
if '--xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''
):
  _devices = 8
  for _i, _arg in enumerate(sys.argv):
    if _arg == '--devices' and _i + 1 < len(sys.argv):
      _devices = int(sys.argv[_i + 1])
    elif _arg.startswith('--devices='):
      _devices = int(_arg.split('=', 1)[1])
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={_devices}'
  )

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

sys.path.insert(0, '.')
from gemma4_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from gemma4_jax import moe  # pylint: disable=g-import-not-at-top
from gemma4_jax.parallel import expert as expert_parallel  # pylint: disable=g-import-not-at-top
from gemma4_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

# Layer shapes: (embed D, experts E, expert hidden F, experts per token k).
# 'small' is a toy layer that compiles in seconds.
SHAPES = {
    'small': (256, 32, 64, 4),
    '26b_a4b': tuple(
        getattr(config_lib.PRESETS['26b_a4b'], name)
        for name in ('embed_dim', 'num_experts', 'expert_hidden_dim',
                     'experts_per_token')
    ),
}

_BYTES_PER_ELEMENT = {
    'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2,
    'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8,
}


def collective_bytes(hlo: str, op: str) -> tuple[int, int]:
  """Count `op` instructions in HLO text and the bytes of their results."""
  instruction = re.compile(rf'^\s*\S+ = (.+?) {op}(?:-start)?\(')
  count = 0
  total = 0
  for line in hlo.splitlines():
    match = instruction.match(line)
    if not match:
      continue
    count += 1
    for dtype, dims in re.findall(r'([a-z]+\d*)\[([\d,]*)\]', match.group(1)):
      size = math.prod(int(d) for d in dims.split(',') if d)
      total += size * _BYTES_PER_ELEMENT[dtype]
  return count, total


def mib(num_bytes: float) -> str:
  return f'{num_bytes / 2**20:.2f} MiB'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', choices=sorted(SHAPES), default='small',
                      help='layer shape: a toy layer or the 26B-A4B MoE layer')
  parser.add_argument('--devices', type=int, default=8,
                      help='devices on the expert axis')
  parser.add_argument('--tokens-per-device', type=int, default=512,
                      help='tokens each device routes per step')
  parser.add_argument('--dtype', choices=('bfloat16', 'float32'),
                      default='bfloat16', help='parameter and token dtype')
  parser.add_argument('--capacity-factor', type=float, default=None,
                      help='buffer size as a multiple of the mean load;'
                      ' default: buffers that never overflow')
  args = parser.parse_args()

  embed_dim, num_experts, hidden_dim, top_k = SHAPES[args.shape]
  dtype = jnp.dtype(args.dtype)
  itemsize = dtype.itemsize
  n = args.devices
  mesh = mesh_lib.make_mesh({'expert': n}, jax.devices()[:n])
  num_tokens = args.tokens_per_device * n

  block = moe.MoE(
      embed_dim=embed_dim,
      hidden_dim=hidden_dim,
      num_experts=num_experts,
      experts_per_token=top_k,
      dtype=dtype,
      implementation='all_to_all',
      capacity_factor=args.capacity_factor,
  )
  x = jax.ShapeDtypeStruct(
      (num_tokens, embed_dim), dtype, sharding=NamedSharding(mesh, P('expert'))
  )
  params = jax.eval_shape(block.init, jax.random.key(0), x)['params']

  def with_sharding(path, leaf):
    # Expert weights (leading dimension E) are split; the router is not.
    names = [getattr(entry, 'key', '') for entry in path]
    split = leaf.shape and leaf.shape[0] == num_experts and (
        'router_logits' not in names
    )
    spec = P('expert') if split else P()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=NamedSharding(mesh, spec))

  params = jax.tree_util.tree_map_with_path(with_sharding, params)

  def forward(params, x):
    return block.apply({'params': params}, x)

  def train(params, x):
    return jax.grad(
        lambda p, x: jnp.sum(forward(p, x).astype(jnp.float32) ** 2),
        argnums=(0, 1),
    )(params, x)

  expert_weights = num_experts * 3 * hidden_dim * embed_dim * itemsize
  gather_received = expert_weights * (n - 1) / n
  capacity = expert_parallel.exchange_capacity(
      args.tokens_per_device, top_k, num_experts, n, args.capacity_factor
  )
  routed = args.tokens_per_device * top_k * embed_dim * itemsize
  buffer = n * capacity * embed_dim * itemsize

  print(f'layer {args.shape}: D={embed_dim} E={num_experts} F={hidden_dim}'
        f' k={top_k} {args.dtype}; mesh expert={n},'
        f' {args.tokens_per_device} tokens per device'
        f' ({num_tokens} per step); capacity {capacity} rows per device pair'
        f' ({"never overflows" if args.capacity_factor is None else f"factor {args.capacity_factor}"})')
  print(f'all-gather of every expert weight: {mib(expert_weights)} per layer,'
        f' {mib(gather_received)} received per device')
  print(f'analytic routed token rows per device: {mib(routed)} each way;'
        f' buffers {mib(buffer)} each way ({buffer / routed:.2f}x the rows)')

  with jax.set_mesh(mesh):
    for name, fn, gathers in (('forward', forward, 1),
                              ('forward+backward', train, 2)):
      lowered = jax.jit(fn).lower(params, x)
      # Without expert parallelism a training step gathers the weights and
      # reduce-scatters their gradients, the same bytes again.
      baseline = gathers * gather_received
      print(f'{name}: weight all-gather baseline {mib(baseline)} per device')
      # The lowered program keeps the requested dtype. XLA's CPU compiler
      # then runs bfloat16 collectives in float32, which doubles their bytes.
      # Accelerators keep bfloat16.
      for stage, hlo in (
          ('lowered', lowered.as_text(dialect='hlo')),
          ('compiled for CPU', lowered.compile().as_text()),
      ):
        count, total = collective_bytes(hlo, 'all-to-all')
        gather_count, gather_total = collective_bytes(hlo, 'all-gather')
        leaving = total * (n - 1) / n
        print(f'  {stage}: {count} all-to-alls, {mib(total)} per device,'
              f' {mib(leaving)} leave the device; ratio to the baseline'
              f' {leaving / baseline:.4f}; all-gathers: {gather_count}'
              f' ({mib(gather_total)})')


if __name__ == '__main__':
  main()
