"""Building blocks shared by the decoder: RMSNorm, projections, RoPE, gated MLP.

Every module creates its parameters in `dtype` and computes in the dtype of its
inputs, so a bfloat16 model runs in bfloat16 and a float32 model in float32.
Parameter names follow the released Gemma 4 checkpoints.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import time
from typing import Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

from gemma4_jax.parallel.rules import constrain

RMS_NORM_EPS = 1e-6

# Bytes of weight that `streamed_einsum` converts and multiplies per loop
# step: small enough for the float32 copy to stay in the L2 cache.
STREAM_CHUNK_BYTES = 1 << 20

# The strategy of `streamed_einsum` for a one-row activation. 'chunked' is
# a loop of matrix-vector products over chunks of the weight. 'padded' is
# one product of the row and a row of zeros. 'auto' times both once per pair of
# dtypes and uses the faster. The environment variable
# GEMMA4_JAX_SINGLE_ROW_PRODUCT sets the default.
SINGLE_ROW_PRODUCT = os.environ.get('GEMMA4_JAX_SINGLE_ROW_PRODUCT', 'auto')
_SINGLE_ROW_MODES = ('auto', 'chunked', 'padded')
_timed_single_row_modes: dict[tuple[str, str], str] = {}

_logger = logging.getLogger(__name__)


def rms_norm(x: jax.Array) -> jax.Array:
  """Divide `x` by its root mean square over the last axis (no scale)."""
  mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(mean_square + RMS_NORM_EPS)


def _expand_ellipsis(equation: str, x_ndim: int) -> tuple[str, str, str]:
  """Specs of x, w and the output with '...' (in x and out) made explicit."""
  inputs, out_spec = equation.replace(' ', '').split('->')
  x_spec, w_spec = inputs.split(',')
  if '...' in x_spec:
    free = [c for c in 'abcdefghijklmnopqrstuvwxyz' if c not in equation]
    letters = ''.join(free[: x_ndim - (len(x_spec) - 3)])
    x_spec = x_spec.replace('...', letters)
    out_spec = out_spec.replace('...', letters)
  return x_spec, w_spec, out_spec


def _is_matrix_weight(x_spec: str, w_spec: str, out_spec: str) -> bool:
  """Return whether `w` reshapes for free into a [kept, summed] matrix.

  That holds when its kept axes come all before or all after its summed
  axes, and every summed axis is one of `x`'s.
  """
  kept = ''.join(c for c in w_spec if c in out_spec)
  summed = ''.join(c for c in w_spec if c not in out_spec)
  return (
      all(c in x_spec for c in summed)
      and not any(c in x_spec for c in kept)
      and w_spec in (kept + summed, summed + kept)
  )


def _matrix_einsum(x_spec, w_spec, out_spec, x, w, acc):
  """Compute one einsum with `acc` accumulation, the weight as a matrix.

  When `w`'s kept axes come all before or all after its summed axes (e.g.
  [2, F, D] summed over D), it is reshaped (for free) into a [kept, summed]
  or [summed, kept] matrix: an einsum over the original axes would make XLA
  copy the weight into another layout before multiplying.
  """
  plain = f'{x_spec},{w_spec}->{out_spec}'
  kept = ''.join(c for c in w_spec if c in out_spec)
  summed = ''.join(c for c in w_spec if c not in out_spec)
  if not _is_matrix_weight(x_spec, w_spec, out_spec):
    return jnp.einsum(plain, x, w, preferred_element_type=acc)
  x_kept = ''.join(c for c in x_spec if c in out_spec)
  x_matrix = jnp.einsum(f'{x_spec}->{x_kept}{summed}', x)
  x_matrix = x_matrix.reshape(-1, math.prod(x_matrix.shape[len(x_kept) :]))
  num_summed = math.prod(w.shape[w_spec.index(c)] for c in summed)
  if w_spec.startswith(kept):
    out = jnp.einsum(
        'MK,RK->MR', x_matrix, w.reshape(-1, num_summed),
        preferred_element_type=acc,
    )
  else:
    out = jnp.einsum(
        'MK,KR->MR', x_matrix, w.reshape(num_summed, -1),
        preferred_element_type=acc,
    )
  sizes = dict(zip(x_spec, x.shape)) | dict(zip(w_spec, w.shape))
  out = out.reshape([sizes[c] for c in x_kept + kept])
  return jnp.einsum(f'{x_kept}{kept}->{out_spec}', out)


def streamed_einsum(
    equation: str,
    x: jax.Array,
    w: jax.Array,
    *,
    chunk_bytes: int | None = None,
    mode: str | None = None,
) -> jax.Array:
  """`jnp.einsum(equation, x, w)` for inference, accumulated in float32.

  The result is that of converting both operands to float32, multiplying and
  rounding back to `x.dtype` (what XLA does for a bfloat16 einsum on CPU), up
  to the order of the float32 additions. It is faster on XLA's CPU backend:

  - When `x` has a single row (one token of one sequence: a decode step),
    a plain product first converts the whole weight to a float32 temporary,
    tripling the memory traffic, and multiplies it with a general matrix
    kernel. Here a loop takes one chunk of the weight at a time (about
    `chunk_bytes`) and multiplies it with the row as a matrix-vector
    product, which XLA fuses with the conversion: the weight is read once,
    in its own dtype ('chunked'). On CPUs with fast bfloat16 matrix units
    (AMX), one product of the row and a row of zeros reads the weight
    faster still ('padded'). `single_row_mode` picks one per machine.
  - With more rows (prefill, batched decode), one product with
    `preferred_element_type=float32` lets XLA multiply the bfloat16 operands
    directly, without converting the weight first.

  Args:
    equation: A two-operand einsum equation without repeated letters in an
      operand; `w`'s spec has no '...'.
    x: Activations.
    w: Weight, chunked along its leading axes.
    chunk_bytes: Bytes of weight per loop step (default STREAM_CHUNK_BYTES).
    mode: 'chunked' or 'padded' for a one-row `x`. None uses
      `single_row_mode`.

  Returns:
    The product, in `x.dtype`.
  """
  chunk_bytes = STREAM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  x_spec, w_spec, out_spec = _expand_ellipsis(equation, x.ndim)
  dtype = x.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  contracted = [c for c in w_spec if c in x_spec and c not in out_spec]
  sizes = dict(zip(x_spec, x.shape))
  rows = x.size // max(1, math.prod(sizes[c] for c in contracted))
  # The chunked loop handles a weight whose every axis is either kept (in the
  # output, not in `x`) or summed with an axis of `x`.
  irregular = [
      c for c in w_spec if (c in x_spec) == (c in out_spec)
  ]
  if rows != 1 or irregular or w.size * w.dtype.itemsize <= chunk_bytes:
    return _matrix_einsum(x_spec, w_spec, out_spec, x, w, acc).astype(dtype)
  if mode is None:
    mode = single_row_mode(x.dtype, w.dtype)
  # A weight that is not a matrix as stored would be copied into one on
  # every call, so it always takes the chunked loop.
  if mode == 'padded' and _is_matrix_weight(x_spec, w_spec, out_spec):
    p = next(c for c in 'PQRSUVWXYZ' if c not in x_spec + w_spec + out_spec)
    padded = jnp.stack([x, jnp.zeros_like(x)])
    out = _matrix_einsum(p + x_spec, w_spec, p + out_spec, padded, w, acc)
    return out[0].astype(dtype)
  if mode not in ('chunked', 'padded'):
    raise ValueError(
        f"invalid mode={mode!r}. Use 'chunked', 'padded' or None"
    )

  # Merge the leading axes of `w`, all kept or all summed, until one index
  # of the merged axis is no more than a chunk. Chunks along that axis are
  # contiguous in memory.
  lead_kept = w_spec[0] in out_spec
  merged = 1
  while (
      merged < w.ndim - 1
      and math.prod(w.shape[merged:]) * w.dtype.itemsize > chunk_bytes
      and (w_spec[merged] in out_spec) == lead_kept
  ):
    merged += 1
  lead, rest = w_spec[:merged], w_spec[merged:]
  block = math.prod(w.shape[merged:]) * w.dtype.itemsize
  last = w.shape[merged - 1]
  size = max(
      d for d in range(1, last + 1)
      if last % d == 0 and (d * block <= chunk_bytes or d == 1)
  )
  if (
      lead_kept
      and rest[0] not in out_spec
      and any(c in out_spec for c in rest)
  ):
    # One index at a time keeps the summed axes first in each chunk (see
    # `matvec`), e.g. [D, H] chunks of a [N, D, H] query projection.
    size = 1
  num_chunks = math.prod(w.shape[:merged]) // size
  # A chunk is `size` indices of the merged axis (letter `z`), or a single
  # one without that axis.
  z = next(c for c in 'ZYXWVUTSRQ' if c not in x_spec + w_spec + out_spec)
  z = z if size > 1 else ''
  w_chunks = w.reshape(num_chunks, *([size] if z else []), *w.shape[merged:])
  chunk_spec = z + rest
  kept = ''.join(
      c for c in chunk_spec if (c == z and lead_kept) or c in out_spec
  )
  summed = ''.join(c for c in chunk_spec if c not in kept)
  x_free = ''.join(c for c in x_spec if c in out_spec)  # all of size 1

  def matvec(vector, w_chunk):
    """`vector` [summed] times the chunk, as [kept]."""
    if chunk_spec.startswith(summed):
      # Summed axes first (e.g. [F, D] contracted over F): a plain product.
      matrix = w_chunk.reshape(-1, math.prod(w_chunk.shape[len(summed) :]))
      return vector @ matrix.astype(acc)
    # Otherwise as a [kept, summed] matrix, multiplied as `vector @ M.T`:
    # the form that XLA's CPU backend fuses with the chunk's conversion.
    matrix = jnp.einsum(f'{chunk_spec}->{kept}{summed}', w_chunk)
    matrix = matrix.reshape(-1, math.prod(matrix.shape[len(kept) :]))
    return vector @ matrix.astype(acc).T

  if lead_kept:
    vector = jnp.einsum(f'{x_spec}->{summed}', x).reshape(-1).astype(acc)
    _, out = jax.lax.scan(
        lambda _, w_chunk: (None, matvec(vector, w_chunk)), None, w_chunks
    )
    kept_letters = lead + kept[len(z) :]
  else:
    x_rest = ''.join(c for c in x_spec if c not in lead)
    x_lead = jnp.einsum(f'{x_spec}->{lead}{x_rest}', x).astype(acc)
    x_chunks = x_lead.reshape(
        num_chunks, *([size] if z else []), *x_lead.shape[merged:]
    )

    def add(total, pair):
      x_chunk, w_chunk = pair
      vector = jnp.einsum(f'{z}{x_rest}->{summed}', x_chunk).reshape(-1)
      return total + matvec(vector, w_chunk), None

    num_kept = math.prod(w.shape[w_spec.index(c)] for c in kept)
    out, _ = jax.lax.scan(
        add, jnp.zeros((num_kept,), acc), (x_chunks, w_chunks)
    )
    kept_letters = kept
  kept_shape = [w.shape[w_spec.index(c)] for c in kept_letters]
  out = out.reshape(kept_shape)
  w_out = ''.join(c for c in out_spec if c not in x_free)
  out = jnp.einsum(f'{kept_letters}->{w_out}', out)
  out_shape = [
      sizes[c] if c in x_free else w.shape[w_spec.index(c)] for c in out_spec
  ]
  return out.reshape(out_shape).astype(dtype)


def _time_single_row_modes(x_dtype, w_dtype) -> str:
  """Time both one-row strategies on a 64 MiB weight; return the faster."""
  rows, cols = (64 << 20) // (2048 * jnp.dtype(w_dtype).itemsize), 2048
  seconds = {}
  w = jnp.ones((rows, cols), w_dtype)
  x = jnp.ones((1, 1, cols), x_dtype)
  for mode in ('chunked', 'padded'):
    product = jax.jit(
        lambda x, w, mode=mode: streamed_einsum('BTD,VD->BTV', x, w, mode=mode)
    )
    product(x, w).block_until_ready()
    runs = []
    for _ in range(5):
      start = time.perf_counter()
      product(x, w).block_until_ready()
      runs.append(time.perf_counter() - start)
    seconds[mode] = sorted(runs)[len(runs) // 2]
  best = min(seconds, key=seconds.get)
  _logger.info(
      'one-row %s x %s product of a 64 MiB weight: chunked %.1f ms, padded'
      ' %.1f ms; using %s',
      jnp.dtype(x_dtype).name, jnp.dtype(w_dtype).name,
      seconds['chunked'] * 1e3, seconds['padded'] * 1e3, best,
  )
  return best


def single_row_mode(x_dtype, w_dtype) -> str:
  """Return the strategy `streamed_einsum` uses for one row of these dtypes."""
  if SINGLE_ROW_PRODUCT not in _SINGLE_ROW_MODES:
    raise ValueError(
        f'invalid SINGLE_ROW_PRODUCT={SINGLE_ROW_PRODUCT!r} (also set by the'
        ' environment variable GEMMA4_JAX_SINGLE_ROW_PRODUCT). Use one of'
        f' {_SINGLE_ROW_MODES}'
    )
  if SINGLE_ROW_PRODUCT != 'auto':
    return SINGLE_ROW_PRODUCT
  key = (jnp.dtype(x_dtype).name, jnp.dtype(w_dtype).name)
  if key not in _timed_single_row_modes:
    # Usually called while a model is traced. JAX's trace state is per
    # thread, so a new thread runs the timing eagerly, outside the trace.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      _timed_single_row_modes[key] = pool.submit(
          _time_single_row_modes, x_dtype, w_dtype
      ).result()
  return _timed_single_row_modes[key]


def normal_init(stddev: float):
  return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis, times a learned `scale` when `with_scale`.

  Gemma 4 multiplies by `scale` itself (initialised to ones), not by
  `1 + scale` as Gemma 1 to 3 did.
  """

  with_scale: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    normed = rms_norm(x)
    if not self.with_scale:
      return normed
    scale = self.param(
        'scale', nn.initializers.ones, (x.shape[-1],), self.dtype
    )
    return normed * scale


class Einsum(nn.Module):
  """A weight `w` of a fixed shape, applied with an einsum equation.

  `w_scale` multiplies the weight before use (the per-layer model projection
  is stored unscaled and used times `embed_dim**-0.5`).
  """

  shape: Sequence[int]
  init_stddev: float = 0.02
  w_scale: float | None = None
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.w = self.param(
        'w', normal_init(self.init_stddev), tuple(self.shape), self.dtype
    )

  def weight(self) -> jax.Array:
    """Return `w`, multiplied by `w_scale` when one is set."""
    if self.w_scale is None:
      return self.w
    return self.w * jnp.asarray(self.w_scale, self.w.dtype)

  def __call__(
      self, equation: str, x: jax.Array, streamed: bool = False
  ) -> jax.Array:
    """Apply the weight; `streamed` uses `streamed_einsum` (inference only)."""
    if streamed:
      return streamed_einsum(equation, x, self.weight())
    return jnp.einsum(equation, x, self.weight())


def _rope_frequencies(head_dim: int, base_frequency: float, rotated_pairs: int):
  """Angular frequency of each rotated pair, `base ** (-2 i / H)`: [R]."""
  exponents = (2.0 / head_dim) * jnp.arange(rotated_pairs, dtype=jnp.float32)
  timescale = jnp.asarray(base_frequency, jnp.float32) ** exponents
  return 1.0 / timescale, timescale


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotate the first R pairs of `x` [..., H] by angles with `sin`, `cos`.

  `sin` and `cos` [..., R] broadcast against `x`'s pairs. Only the first R
  pairs rotate. The others keep their values: the rotated features are
  written over a copy of `x`, which XLA does in place, rather than
  concatenated with the unrotated ones (a concatenation is several times
  slower on XLA's CPU backend).
  """
  half = x.shape[-1] // 2
  rotated_pairs = sin.shape[-1]
  first, second = x[..., :rotated_pairs], x[..., half : half + rotated_pairs]
  new_first = (first * cos - second * sin).astype(x.dtype)
  new_second = (second * cos + first * sin).astype(x.dtype)
  if rotated_pairs == half:
    return jnp.concatenate([new_first, new_second], axis=-1)
  x = x.at[..., :rotated_pairs].set(new_first)
  return x.at[..., half : half + rotated_pairs].set(new_second)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    base_frequency: float,
    rope_proportion: float = 1.0,
) -> jax.Array:
  """Rotate `x` [B, T, N, H] by RoPE at `positions` [B, T].

  The rotation is split-half: the first H/2 features pair with the last H/2.
  With `rope_proportion` p < 1 only the first `int(p * H // 2)` pairs rotate
  and the others keep their values. Frequencies use the full head width as
  the denominator, `base ** (-2 i / H)`, whatever p is.
  """
  head_dim = x.shape[-1]
  rotated_pairs = int(rope_proportion * head_dim // 2)
  _, timescale = _rope_frequencies(head_dim, base_frequency, rotated_pairs)
  angles = positions[..., None].astype(jnp.float32) / timescale  # [B, T, R]
  angles = angles[:, :, None, :]  # [B, T, 1, R]
  # The barrier keeps XLA from fusing the sines and cosines into the
  # products in `_rotate`, which would recompute them for every head.
  sin, cos = jax.lax.optimization_barrier((jnp.sin(angles), jnp.cos(angles)))
  return _rotate(x, sin, cos)


def apply_rope_by_slot(
    x: jax.Array,
    *,
    base_frequency: float,
    rope_proportion: float = 1.0,
    block: int = 64,
) -> jax.Array:
  """`apply_rope` of `x` [B, S, N, H] at positions 0, 1, ..., S - 1.

  The position is the same for every row, so one [S, R] table of sines and
  cosines serves the whole batch. XLA's CPU sine and cosine are slow for
  large angles (about 20 ns each), so the table is built from two small ones
  by the angle-addition formulas, with p = block * a + b: it then takes
  (S / block + block) * R evaluations instead of S * R. The angles differ
  from `apply_rope`'s by float32 rounding only (relative 1e-6), far below
  the bfloat16 rounding of keys.
  """
  slots, head_dim = x.shape[1], x.shape[-1]
  rotated_pairs = int(rope_proportion * head_dim // 2)
  frequencies, _ = _rope_frequencies(head_dim, base_frequency, rotated_pairs)
  coarse = jnp.arange(-(-slots // block), dtype=jnp.float32)[:, None] * block
  fine = jnp.arange(block, dtype=jnp.float32)[:, None]
  coarse_angles = coarse * frequencies  # [S / block, R]
  fine_angles = fine * frequencies  # [block, R]
  # Barriers here and below keep XLA from fusing the small tables (and then
  # the large ones) into their consumers, which would evaluate the sines and
  # cosines once per element of the consumer.
  sin_a, cos_a, sin_b, cos_b = jax.lax.optimization_barrier((
      jnp.sin(coarse_angles)[:, None],
      jnp.cos(coarse_angles)[:, None],
      jnp.sin(fine_angles)[None],
      jnp.cos(fine_angles)[None],
  ))
  sin = (sin_a * cos_b + cos_a * sin_b).reshape(-1, rotated_pairs)[:slots]
  cos = (cos_a * cos_b - sin_a * sin_b).reshape(-1, rotated_pairs)[:slots]
  sin, cos = jax.lax.optimization_barrier((sin, cos))
  return _rotate(x, sin[None, :, None, :], cos[None, :, None, :])


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class FeedForward(nn.Module):
  """Gated GELU MLP: `linear(gelu(x W_gate0) * (x W_gate1))`.

  Parameters sit directly on this module, as in the release:
  `gating_einsum` [2, F, D] and `linear` [F, D].
  """

  embed_dim: int
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, streamed: bool = False) -> jax.Array:
    """Apply the MLP; `streamed` uses `streamed_einsum` (inference only)."""
    einsum = streamed_einsum if streamed else jnp.einsum
    gating = self.param(
        'gating_einsum',
        normal_init(self.embed_dim**-0.5),
        (2, self.hidden_dim, self.embed_dim),
        self.dtype,
    )
    linear = self.param(
        'linear',
        normal_init(self.hidden_dim**-0.5),
        (self.hidden_dim, self.embed_dim),
        self.dtype,
    )
    gates = einsum('...D,CFD->...CF', x, gating)  # [..., 2, F]
    hidden = gelu_tanh(gates[..., 0, :]) * gates[..., 1, :]
    if hidden.ndim == 3:
      hidden = constrain(hidden, ('batch', 'length', 'mlp'))
    return einsum('...F,FD->...D', hidden, linear)
