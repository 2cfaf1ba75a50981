"""The Gemma 4 vision encoder and its projection into the text embedding.

Patches [B, L, 768] of images resized by `vision.preprocess` go in, and soft
tokens [B, L/9, D] come out, ready for `project_soft_tokens`. The steps:

1. entry: patch values scaled to [-1, 1], a linear projection to D, plus a
   factorised learned position embedding (one table row for the patch's
   column, one for its row).
2. a bidirectional transformer of `num_layers` blocks with QK-norm and 2-D
   RoPE (first half of each head rotated by the column, second half by the
   row, base 100).
3. exit: each 3×3 block of patches is averaged into one soft token, using
   the patch positions, and the result is multiplied by sqrt(D).
4. for the 26B-A4B and 31B towers, a learned standardisation
   `(x - bias) * scale`.

Parameter names and shapes are those of the official `gemma` 4.0.1 tree
under `vision_encoder` (the layers stacked along a leading axis under
`transformer/stacked_layers/block`), so official parameters load unchanged.
Parameters are float32 and all vision math runs in float32, whatever dtype
the parameters are given in.

Letters in einsum equations: B batch, T query patches, S key patches,
N heads, H head dim, D encoder width, F hidden width, C keys/values, M vision
width where it meets the text width D.
"""

from __future__ import annotations

import dataclasses
import math

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.layers import rms_norm
from gemma4_jax.vision import preprocess

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionConfig:
  """Shapes and options of one vision encoder.

  Attributes:
    embed_dim: Encoder width (D).
    num_layers: Number of transformer blocks.
    num_heads: Attention heads (N), the same number for queries, keys and
      values.
    hidden_dim: Hidden width of the gated MLP (F).
    patch_size: Side of a square patch in pixels.
    pooling_kernel_size: Side of the square block of patches averaged into
      one soft token.
    position_table_size: Rows of each position-embedding table, so the
      largest column or row index a patch may have plus one.
    rope_base: RoPE base frequency of the 2-D rotary embedding.
    clipped_linears: Every transformer projection clamps its input and output
      to learned bounds (E2B, E4B).
    standardize: Apply the learned `(x - bias) * scale` to the soft tokens
      (26B-A4B, 31B).
    mask_padding: Exclude padding patches from attention. The official
      `gemma` 4.0.1 encoder does not: it adds its boolean mask to the
      logits, giving real (query, key) pairs +1 and leaving padding keys
      visible. An image's soft tokens then depend on its number of padding
      patches (`budget * 9` minus its own patch count). False reproduces
      that. True excludes padding, as the `transformers` Gemma 4 port does.
  """

  embed_dim: int = 768
  num_layers: int = 16
  num_heads: int = 12
  hidden_dim: int = 3072
  patch_size: int = preprocess.PATCH_SIZE
  pooling_kernel_size: int = preprocess.POOLING_KERNEL_SIZE
  position_table_size: int = 10240
  rope_base: float = 100.0
  clipped_linears: bool = False
  standardize: bool = False
  mask_padding: bool = False

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f'vision embed_dim {self.embed_dim} is not divisible by num_heads'
          f' {self.num_heads}'
      )
    if self.head_dim < 4 or self.head_dim % 2:
      raise ValueError(
          f'vision head_dim {self.head_dim} is invalid: 2-D RoPE needs an even'
          ' head_dim of at least 4 (one rotated pair per axis). Change'
          ' embed_dim or num_heads'
      )

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * 3


# The tower of E2B and E4B.
VISION_E2B_E4B = VisionConfig(clipped_linears=True)
# The wider tower of 26B-A4B and 31B.
VISION_26B_31B = VisionConfig(
    embed_dim=1152,
    num_layers=27,
    num_heads=16,
    hidden_dim=4304,
    standardize=True,
)
VISION_PRESETS: dict[str, VisionConfig] = {
    'e2b': VISION_E2B_E4B,
    'e4b': VISION_E2B_E4B,
    '26b_a4b': VISION_26B_31B,
    '31b': VISION_26B_31B,
}


def _constant(value: float):
  return lambda key, shape, dtype=F32: jnp.full(shape, value, dtype)


class Linear(nn.Module):
  """An einsum with weight `w`, optionally clamping its input and output.

  With `clipped`, four learned scalars bound the input before and the output
  after the product (their initial values, ±inf, clamp nothing).
  """

  shape: tuple[int, ...]
  clipped: bool = False

  @nn.compact
  def __call__(self, equation: str, x: jax.Array) -> jax.Array:
    w = self.param('w', nn.initializers.normal(0.02), self.shape, F32)
    if self.clipped:
      input_min = self.param('clip_input_min', _constant(-np.inf), (), F32)
      input_max = self.param('clip_input_max', _constant(np.inf), (), F32)
      output_min = self.param('clip_output_min', _constant(-np.inf), (), F32)
      output_max = self.param('clip_output_max', _constant(np.inf), (), F32)
      x = jnp.clip(x, input_min.astype(F32), input_max.astype(F32))

    y = jnp.einsum(equation, x, w.astype(F32))

    if self.clipped:
      y = jnp.clip(y, output_min.astype(F32), output_max.astype(F32))
    return y


class ScaledRMSNorm(nn.Module):
  """RMSNorm times a learned `scale` (no `1 + scale`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), F32)
    return rms_norm(x) * scale.astype(F32)


def rope_2d(
    x: jax.Array, positions_xy: jax.Array, base: float
) -> jax.Array:
  """Rotate heads [B, L, N, H] by 2-D patch positions [B, L, 2].

  The first `2 * (H // 4)` channels are rotated by the column index, the rest
  by the row index. Each part is rotated split-half (its first half paired
  with its second half), with timescales `base ** (2i / part_width)`.
  """
  head_dim = x.shape[-1]
  column_width = 2 * (head_dim // 4)
  parts = (x[..., :column_width], x[..., column_width:])
  rotated = [
      _rope_1d(part, positions_xy[..., axis], base)
      for axis, part in enumerate(parts)
  ]
  return jnp.concatenate(rotated, axis=-1)


def _rope_1d(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Split-half RoPE of [B, L, N, H] by positions [B, L]."""
  width = x.shape[-1]
  exponents = (2.0 / width) * jnp.arange(width // 2, dtype=F32)
  timescale = base**exponents
  angles = positions[..., None].astype(F32) / timescale  # [B, L, H/2]
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]

  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate(
      [first * cos - second * sin, second * cos + first * sin], axis=-1
  )


class Attention(nn.Module):
  """Bidirectional multi-head attention over the patches of each image."""

  config: VisionConfig

  @nn.compact
  def __call__(
      self, x: jax.Array, is_patch: jax.Array, positions_xy: jax.Array
  ) -> jax.Array:
    """Attend [B, L, D] with patch flags [B, L] and positions [B, L, 2]."""
    cfg = self.config
    n, d, h = cfg.num_heads, cfg.embed_dim, cfg.head_dim
    clipped = cfg.clipped_linears

    q = Linear((n, d, h), clipped, name='q_einsum')('BTD,NDH->BTNH', x)
    k, v = Linear((2, n, d, h), clipped, name='kv_einsum')('BSD,CNDH->CBSNH', x)
    q = ScaledRMSNorm(name='query_norm')(q)
    k = ScaledRMSNorm(name='key_norm')(k)
    v = rms_norm(v)  # `value_norm`, which has no scale
    q = rope_2d(q, positions_xy, cfg.rope_base)
    k = rope_2d(k, positions_xy, cfg.rope_base)

    # Queries are not scaled by 1/sqrt(H) because QK-norm takes its place.
    # NOTE: the [B, N, L, L] logits take 6.5 GB per image for the 26B/31B
    # tower at the 1120 budget (16 heads, 10080 patches, float32).
    logits = jnp.einsum('BTNH,BSNH->BNTS', q, k)
    both_patches = is_patch[:, None, :, None] & is_patch[:, None, None, :]
    if cfg.mask_padding:
      logits = jnp.where(both_patches, logits, jnp.finfo(F32).min)
    else:
      logits = logits + both_patches.astype(F32)
    probs = jax.nn.softmax(logits, axis=-1)

    encoded = jnp.einsum('BNTS,BSNH->BTNH', probs, v)
    return Linear((n, h, d), clipped, name='attn_vec_einsum')(
        'BTNH,NHD->BTD', encoded
    )


class FeedForward(nn.Module):
  """Gated MLP: `linear(gelu_tanh(x W0) * (x W1))`."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    f, d = cfg.hidden_dim, cfg.embed_dim
    gates = Linear((2, f, d), cfg.clipped_linears, name='gating_einsum')(
        'BTD,CFD->BTCF', x
    )
    hidden = jax.nn.gelu(gates[..., 0, :], approximate=True) * gates[..., 1, :]
    return Linear((f, d), cfg.clipped_linears, name='linear')(
        'BTF,FD->BTD', hidden
    )


class EncoderBlock(nn.Module):
  """One pre- and post-normed transformer block."""

  config: VisionConfig

  @nn.compact
  def __call__(
      self, x: jax.Array, is_patch: jax.Array, positions_xy: jax.Array
  ) -> jax.Array:
    attended = ScaledRMSNorm(name='pre_attention_norm')(x)
    attended = Attention(self.config, name='attn')(
        attended, is_patch, positions_xy
    )
    x = x + ScaledRMSNorm(name='post_attention_norm')(attended)

    transformed = ScaledRMSNorm(name='pre_ffw_norm')(x)
    transformed = FeedForward(self.config, name='mlp')(transformed)
    return x + ScaledRMSNorm(name='post_ffw_norm')(transformed)


class _ScanStep(nn.Module):
  """One scan step, which places the block's parameters under `block`."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x, is_patch, positions_xy):
    x = EncoderBlock(self.config, name='block')(x, is_patch, positions_xy)
    return x, None


class VisionTransformer(nn.Module):
  """The stack of encoder blocks, run with `nn.scan` over stacked weights."""

  config: VisionConfig

  @nn.compact
  def __call__(
      self, x: jax.Array, is_patch: jax.Array, positions_xy: jax.Array
  ) -> jax.Array:
    stack = nn.scan(
        _ScanStep,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=self.config.num_layers,
    )
    x, _ = stack(self.config, name='stacked_layers')(x, is_patch, positions_xy)
    return x


def position_embedding(
    table: jax.Array, positions_xy: jax.Array
) -> jax.Array:
  """Look up and add the column and row embeddings [B, L, D] of patches.

  `table` is [S, 2, D]: `table[i, 0]` embeds column i, `table[i, 1]` row i.
  A coordinate of -1 (padding) adds zero. Any other coordinate outside
  [0, S) gives NaN, as in the official encoder, so that an image too large
  for the table produces NaN and not a wrong table row.
  """
  size = table.shape[0]
  embedding = jnp.zeros((*positions_xy.shape[:-1], table.shape[-1]), F32)
  for axis in range(2):
    coordinate = positions_xy[..., axis]
    rows = table[jnp.clip(coordinate, 0, size - 1), axis].astype(F32)
    in_table = (coordinate >= 0) & (coordinate < size)
    is_padding = coordinate == preprocess.PADDING_POSITION
    rows = jnp.where(in_table[..., None], rows, jnp.nan)
    embedding = embedding + jnp.where(is_padding[..., None], 0.0, rows)
  return embedding


class VisionEntry(nn.Module):
  """Patch projection plus the factorised position embedding."""

  config: VisionConfig

  @nn.compact
  def __call__(self, patches: jax.Array, positions_xy: jax.Array) -> jax.Array:
    cfg = self.config
    table = self.param(
        'pos_emb',
        nn.initializers.normal(0.02),
        (cfg.position_table_size, 2, cfg.embed_dim),
        F32,
    )
    pixels = 2.0 * (patches.astype(F32) - 0.5)  # [0, 1] to [-1, 1]
    x = Linear((cfg.patch_dim, cfg.embed_dim), name='input_projection')(
        'BLP,PD->BLD', pixels
    )
    return x + position_embedding(table, positions_xy)


def pool_by_positions(
    x: jax.Array, positions_xy: jax.Array, num_tokens: int, kernel_size: int
) -> tuple[jax.Array, jax.Array]:
  """Average each kernel×kernel block of patches into one soft token.

  Args:
    x: [B, L, D] patch embeddings.
    positions_xy: [B, L, 2] (column, row) of each patch, -1 for padding.
    num_tokens: Output length l.
    kernel_size: Side of the pooled block, in patches.

  Returns:
    tokens: [B, l, D]. Soft token j of an image with a grid `c` blocks wide
      is the block at column `j % c`, row `j // c`, so an image's soft tokens
      come first, in row-major order. Each sum is divided by kernel², as in
      the official encoder, also for a block with missing patches.
    is_token: [B, l] whether slot j received any patch.
  """
  grid_width = jnp.max(positions_xy[..., 0], axis=-1, keepdims=True) + 1
  blocks_per_row = grid_width // kernel_size  # [B, 1]
  block_xy = jnp.floor_divide(positions_xy, kernel_size)
  slot = block_xy[..., 0] + blocks_per_row * block_xy[..., 1]  # [B, L]

  # Padding patches and patches beyond the output length go to an extra
  # slot that is dropped.
  in_output = (slot >= 0) & (slot < num_tokens)
  slot = jnp.where(in_output, slot, num_tokens)

  def pool_one(x_row, slot_row):
    sums = jax.ops.segment_sum(x_row, slot_row, num_segments=num_tokens + 1)
    counts = jax.ops.segment_sum(
        jnp.ones_like(slot_row), slot_row, num_segments=num_tokens + 1
    )
    return sums[:num_tokens], counts[:num_tokens]

  sums, counts = jax.vmap(pool_one)(x, slot)
  return sums / kernel_size**2, counts > 0


class Standardize(nn.Module):
  """Learned feature-wise `(x - bias) * scale`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (dim,), F32)
    bias = self.param('bias', nn.initializers.zeros, (dim,), F32)
    return (x - bias.astype(F32)) * scale.astype(F32)


class VisionEncoder(nn.Module):
  """Encoder from padded image patches to soft tokens.

  Its parameters are the official `vision_encoder` subtree. Call it with an
  `ImageBatch`'s `patches` and `positions_xy`.
  """

  config: VisionConfig

  @nn.compact
  def __call__(
      self, patches: jax.Array, positions_xy: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Encode patches [B, L, P] at positions [B, L, 2].

    L must be `budget * kernel²` (what `preprocess_images` gives for that
    budget).

    Returns:
      soft_tokens: [B, L / kernel², D] float32. Image i's tokens are its
        first `soft_token_counts[i]` rows. The rows after them are padding
        (zeros before the standardisation).
      is_token: [B, L / kernel²] bool, true for those rows.
    """
    cfg = self.config
    _check_inputs(cfg, patches, positions_xy)
    num_tokens = patches.shape[1] // cfg.pooling_kernel_size**2
    is_patch = jnp.any(positions_xy != preprocess.PADDING_POSITION, axis=-1)

    x = VisionEntry(cfg, name='entry')(patches, positions_xy)
    x = VisionTransformer(cfg, name='transformer')(x, is_patch, positions_xy)

    tokens, is_token = pool_by_positions(
        x, positions_xy, num_tokens, cfg.pooling_kernel_size
    )
    tokens = tokens * np.float32(math.sqrt(cfg.embed_dim))

    if cfg.standardize:
      tokens = Standardize(name='standardize')(tokens)
    return tokens, is_token


def _check_inputs(cfg: VisionConfig, patches, positions_xy) -> None:
  kernel_area = cfg.pooling_kernel_size**2
  if patches.ndim != 3 or patches.shape[-1] != cfg.patch_dim:
    raise ValueError(
        f'patches have shape {patches.shape}, expected [B, L, {cfg.patch_dim}].'
        ' Build them with vision.preprocess.preprocess_images'
    )
  if positions_xy.shape != (*patches.shape[:2], 2):
    raise ValueError(
        f'positions_xy has shape {positions_xy.shape}, expected'
        f' {(*patches.shape[:2], 2)} to match the patches'
    )
  if patches.shape[1] % kernel_area:
    raise ValueError(
        f'{patches.shape[1]} patches per image is not a multiple of'
        f' {kernel_area}. Pad each image to budget * {kernel_area} patches'
    )


def project_soft_tokens(
    soft_tokens: jax.Array, projection: jax.Array
) -> jax.Array:
  """Map soft tokens [..., M] into the text embedding space [..., D].

  The official `mm_pre_projection_norm` (RMSNorm without scale) followed by
  `mm_input_projection` (`projection` is its [M, D] weight `w`), in float32.
  The result is not multiplied by sqrt(D), unlike text token embeddings.
  """
  x = rms_norm(soft_tokens.astype(F32))
  return jnp.einsum('...M,MD->...D', x, projection.astype(F32))


class SoftTokenProjection(nn.Module):
  """`project_soft_tokens` with its weight as parameter `w`.

  Assign it to the text embedder's attribute `mm_input_projection` and its
  weight sits at the official path `embedder/mm_input_projection/w`
  (`mm_pre_projection_norm` has no parameters).
  """

  vision_dim: int
  text_dim: int

  @nn.compact
  def __call__(self, soft_tokens: jax.Array) -> jax.Array:
    w = self.param(
        'w', nn.initializers.normal(0.02), (self.vision_dim, self.text_dim), F32
    )
    return project_soft_tokens(soft_tokens, w)


def concatenate_soft_tokens(
    soft_tokens: jax.Array, soft_token_counts: tuple[int, ...]
) -> jax.Array:
  """Concatenate each image's real soft tokens [sum(counts), D].

  The order is the one in which the text model fills its image placeholder
  tokens: image by image, each in row-major block order.
  """
  if len(soft_token_counts) != soft_tokens.shape[0]:
    raise ValueError(
        f'{len(soft_token_counts)} soft-token counts for'
        f' {soft_tokens.shape[0]} images. Pass one count per image'
    )
  return jnp.concatenate(
      [soft_tokens[i, :count] for i, count in enumerate(soft_token_counts)],
      axis=0,
  )
