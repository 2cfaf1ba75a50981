"""Vision tower throughput: gemma4-jax against the official `gemma` 4.0.1 encoder.

    python benchmarks/vision.py --family e2b --budgets 280,1120 --layers 2

For each soft-token budget, a batch of images of different aspect ratios is
preprocessed once (`vision.preprocess.preprocess_images`) and both encoders
run jit-compiled on the same parameters and patches. Each is timed over
`--repeats` calls after a warm-up; the script prints the median images/s of
each, the ratio ours / official (above 1 means we are faster), XLA's
compiled temporary memory, and the largest difference between the two
outputs. `--layers` cuts the tower to its first layers (the released towers
have 16 and 27), which keeps a run on a CPU short; the cost per layer is the
same. Needs the test extra (`pip install -e .[test]`).
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
from gemma4_jax.vision import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
from gemma4_jax.vision import preprocess  # pylint: disable=g-import-not-at-top
from tests.test_vision_encoder import official_encoder, random_params  # pylint: disable=g-import-not-at-top


def sample_images(count: int) -> list[np.ndarray]:
  """Random RGB images: landscape, portrait, square, panorama, in turn."""
  rng = np.random.default_rng(0)
  shapes = [(480, 640), (900, 600), (512, 512), (300, 2000)]
  return [
      rng.integers(0, 256, (*shapes[i % len(shapes)], 3), np.uint8)
      for i in range(count)
  ]


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def temp_bytes(fn, *args) -> int:
  analysis = fn.lower(*args).compile().memory_analysis()
  return int(getattr(analysis, 'temp_size_in_bytes', 0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--family', default='e2b',
                      choices=sorted(encoder_lib.VISION_PRESETS))
  parser.add_argument('--layers', type=int, default=2,
                      help='transformer layers of the tower (default: 2)')
  parser.add_argument('--budgets', default='280,1120',
                      help='comma-separated soft-token budgets')
  parser.add_argument('--images', type=int, default=2,
                      help='images per batch (default: 2)')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  cfg = dataclasses.replace(
      encoder_lib.VISION_PRESETS[args.family], num_layers=args.layers
  )
  images = sample_images(args.images)
  print(
      f'vision tower of {args.family}: width {cfg.embed_dim}, {cfg.num_layers}'
      f' layers, {cfg.num_heads} heads, float32; {args.images} image(s) per'
      f' batch; backend {jax.default_backend()}, {jax.device_count()}'
      ' device(s)'
  )
  for budget in (int(b) for b in args.budgets.split(',')):
    batch = preprocess.preprocess_images(images, budget)
    patches = jnp.asarray(batch.patches)
    positions = jnp.asarray(batch.positions_xy)
    official = official_encoder(cfg, budget)
    params = random_params(
        jax.eval_shape(
            lambda: official.init(jax.random.key(0), patches, positions)
        )['params']
    )
    ours = encoder_lib.VisionEncoder(cfg)
    official_fn = jax.jit(
        lambda p, x, xy: official.apply({'params': p}, x, xy)[0][0]
    )
    ours_fn = jax.jit(lambda p, x, xy: ours.apply({'params': p}, x, xy)[0])

    official_seconds = median_seconds(
        official_fn, params, patches, positions, repeats=args.repeats
    )
    ours_seconds = median_seconds(
        ours_fn, params, patches, positions, repeats=args.repeats
    )
    difference = float(jnp.max(jnp.abs(
        ours_fn(params, patches, positions)
        - official_fn(params, patches, positions)
    )))
    official_temp = temp_bytes(official_fn, params, patches, positions)
    ours_temp = temp_bytes(ours_fn, params, patches, positions)

    count = len(images)
    print(
        f'budget {budget} ({patches.shape[1]} patches per image, soft tokens'
        f' {list(batch.soft_token_counts)}):'
    )
    print(
        f'  images/s: ours {count / ours_seconds:8.2f}  official'
        f' {count / official_seconds:8.2f}  ratio'
        f' {official_seconds / ours_seconds:.2f}x'
    )
    print(
        f'  compiled temp: ours {ours_temp / 2**20:8.1f} MiB  official'
        f' {official_temp / 2**20:8.1f} MiB; max |ours - official|'
        f' {difference:.2e}'
    )


if __name__ == '__main__':
  main()
