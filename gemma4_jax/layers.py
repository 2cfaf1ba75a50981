"""Building blocks shared by the decoder: RMSNorm, projections, RoPE, gated MLP.

Every module creates its parameters in `dtype` and computes in the dtype of its
inputs, so a bfloat16 model runs in bfloat16 and a float32 model in float32.
Parameter names follow the released Gemma 4 checkpoints.
"""

from __future__ import annotations

from typing import Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp

RMS_NORM_EPS = 1e-6


def rms_norm(x: jax.Array) -> jax.Array:
  """Divide `x` by its root mean square over the last axis (no scale)."""
  mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(mean_square + RMS_NORM_EPS)


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

  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    return jnp.einsum(equation, x, self.weight())


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
  half = head_dim // 2
  rotated_pairs = int(rope_proportion * head_dim // 2)

  exponents = (2.0 / head_dim) * jnp.arange(rotated_pairs, dtype=jnp.float32)
  timescale = jnp.asarray(base_frequency, jnp.float32) ** exponents  # [R]
  angles = positions[..., None].astype(jnp.float32) / timescale  # [B, T, R]
  angles = jnp.pad(angles, ((0, 0), (0, 0), (0, half - rotated_pairs)))
  angles = angles[:, :, None, :]  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)

  first, second = x[..., :half], x[..., half:]
  rotated = jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1
  )
  return rotated.astype(x.dtype)


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
  def __call__(self, x: jax.Array) -> jax.Array:
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
    gates = jnp.einsum('...D,CFD->...CF', x, gating)  # [..., 2, F]
    hidden = gelu_tanh(gates[..., 0, :]) * gates[..., 1, :]
    return jnp.einsum('...F,FD->...D', hidden, linear)
