"""Print the README's table of planned train-step memory for the released sizes.

Each cell is `gemma4-jax plan`'s train-step peak in GiB per chip, and
whether it fits the chip. Rows are the released sizes with LoRA rank 16 and
with full fine-tuning, both with `--remat full` at length 8192. Columns are
TPU slices and GPU hosts. The mesh of a slice is `parallel.mesh.preset_mesh_shape` of
its chip count, and the batch is one row per data and FSDP shard.

    python benchmarks/plan_table.py

It builds nothing on a device (shapes only) and takes about a minute.
"""

from __future__ import annotations

import argparse
import time

from gemma4_jax.parallel import mesh as mesh_lib
from gemma4_jax.parallel import plan as plan_lib

GIB = 1 << 30

# (column title, chip key of plan.CHIPS, chips). v5p slice names count
# TensorCores, two per chip.
SLICES = (
    ('v5e-16', 'v5e', 16),
    ('v5e-32', 'v5e', 32),
    ('v5e-64', 'v5e', 64),
    ('v5p-8', 'v5p', 4),
    ('v5p-16', 'v5p', 8),
    ('v6e-8', 'v6e', 8),
    ('v6e-16', 'v6e', 16),
    ('8 x H100', 'h100', 8),
    ('8 x H200', 'h200', 8),
)
MODELS = (('e2b', 'E2B'), ('e4b', 'E4B'), ('26b_a4b', '26B-A4B'),
          ('31b', '31B'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--lora-rank', type=int, default=16)
  parser.add_argument('--remat', default='full',
                      choices=plan_lib.REMAT_CHOICES)
  args = parser.parse_args()

  start = time.perf_counter()
  header = ['model, mode', *(title for title, _, _ in SLICES)]
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for model, label in MODELS:
    for rank in (args.lora_rank, None):
      mode = f'LoRA r{rank}' if rank else 'full'
      cells = []
      for _, chip, chips in SLICES:
        shape = mesh_lib.preset_mesh_shape(model, chips)
        batch = shape.get('data', 1) * shape.get('fsdp', 1)
        plan = plan_lib.plan_memory(
            model, shape, batch=batch, length=args.length, lora_rank=rank,
            remat=args.remat, chip=chip,
        )
        peak = plan.train_peak_bytes
        fits = 'yes' if peak <= plan_lib.CHIPS[chip].memory_bytes else 'no'
        cells.append(f'{peak / GIB:.1f} {fits}')
      lines.append(f'| {label}, {mode} | ' + ' | '.join(cells) + ' |')
  print('\n'.join(lines))
  print(f'\n{len(MODELS) * 2 * len(SLICES)} plans in'
        f' {time.perf_counter() - start:.0f} s; length {args.length},'
        f' remat {args.remat}, one row per data and FSDP shard')


if __name__ == '__main__':
  main()
