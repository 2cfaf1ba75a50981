"""The Gemma 4 audio encoder (E2B, E4B) and its projection into the text model.

16 kHz waveforms [B, S] and their lengths go in, soft tokens [B, T, M] and a
padding mask come out, one token per 40 ms of audio. The steps:

1. log-mel features [B, frames, 128] (`features.mel_features`), frames past
   each clip's length set to zero.
2. subsampling: two 3×3 convolutions of stride 2 over (time, mel), each
   followed by LayerNorm over channels and ReLU, then a projection of
   (32 mel, 32 channels) to the encoder width D. Time shrinks 4×.
3. `num_layers` conformer layers, each: half-step FFN, local self-attention,
   causal depthwise convolution module, half-step FFN, RMSNorm.
   Attention is causal and local: each frame attends to itself and the 12
   frames before it, with Transformer-XL relative position logits,
   soft-capped at 50.
4. a linear projection with bias to M, the width the text embedder takes
   (`output_projection`), padding rows set to zero.

`project_audio_soft_tokens` then maps the soft tokens into the text
embedding space: the embedder's `audio_input_projection`, then RMSNorm
without scale (`audio_soft_embedding_norm`).

Parameter names and shapes are those of the official `gemma` 4.0.1
`AudioTokenizer` (the tree under `audio_encoder`, layers at
`conformer/stacked_layers_{i}`), so official parameters load unchanged.
Parameters and all math are float32. The attention einsums run at full
float32 precision and the other contractions at the backend's default, as in
the official code.

Letters in einsum equations: B batch, T frames, N heads, H head dim,
D encoder width, F FFN hidden width, R relative distance (0..12), M soft
token width, E text embedding width.
"""

from __future__ import annotations

import dataclasses
import math

from flax import linen as nn
import jax
import jax.numpy as jnp

from gemma4_jax.audio import features
from gemma4_jax.layers import rms_norm

F32 = jnp.float32


@dataclasses.dataclass(frozen=True, kw_only=True)
class AudioConfig:
  """Shapes and options of one audio encoder. Defaults are E2B's and E4B's.

  Attributes:
    embed_dim: Encoder width (D).
    num_layers: Number of conformer layers.
    num_heads: Attention heads (N). The head dim is embed_dim / num_heads.
    soft_token_dim: Width of the output soft tokens (M), the input width of
      the text embedder's `audio_input_projection` (1536 for E2B and E4B).
    left_context: Frames each frame attends to, itself included.
    conv_kernel_size: Width of the causal depthwise convolution.
    activation_bound: Activations are clipped to [-bound, bound] at the
      points where the official encoder clips them.
    reduction_factor: Keep every n-th frame after the conformer layers.
    attention_logit_cap: Attention logits become `cap * tanh(logit / cap)`.
  """

  embed_dim: int = 1024
  num_layers: int = 12
  num_heads: int = 8
  soft_token_dim: int = 1536
  left_context: int = 13
  conv_kernel_size: int = 5
  activation_bound: float = 1e10
  reduction_factor: int = 1
  attention_logit_cap: float = 50.0

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f'embed_dim {self.embed_dim} is not a multiple of num_heads'
          f' {self.num_heads}. Choose a width that the heads divide'
      )
    if self.left_context < 1:
      raise ValueError(
          f'left_context {self.left_context} must be at least 1 (the frame'
          ' itself)'
      )

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads


class ClippedDense(nn.Module):
  """`x @ kernel` with input and output clamped to learned bounds.

  The four bounds are scalars, infinite when a checkpoint does not set them.
  """

  shape: tuple[int, ...]
  equation: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.normal(0.02), self.shape, F32)
    bounds = {
        name: self.param(name, nn.initializers.constant(value), (), F32)
        for name, value in (
            ('clip_input_min', -jnp.inf),
            ('clip_input_max', jnp.inf),
            ('clip_output_min', -jnp.inf),
            ('clip_output_max', jnp.inf),
        )
    }
    x = jnp.clip(x, bounds['clip_input_min'], bounds['clip_input_max'])
    y = jnp.einsum(self.equation, x, kernel)
    return jnp.clip(y, bounds['clip_output_min'], bounds['clip_output_max'])


def _rms_norm(name: str) -> nn.RMSNorm:
  return nn.RMSNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class Subsampling(nn.Module):
  """Strided convolutions that turn mel frames [B, T, 128] into [B, T/4, D].

  The mask [B, T] of valid frames is thinned with the same strides.
  """

  embed_dim: int

  @nn.compact
  def __call__(
      self, mel: jax.Array, mask: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    x = mel[..., None]  # [B, T, mel, channel=1]
    for i, channels in enumerate((128, 32)):
      x = nn.Conv(
          features=channels,
          kernel_size=(3, 3),
          strides=(2, 2),
          padding=((1, 1), (1, 1)),
          use_bias=False,
          param_dtype=F32,
          name=f'subsampling_{i}',
      )(x)
      mask = mask[:, ::2][:, : x.shape[1]]
      x = nn.LayerNorm(
          epsilon=1e-6,
          use_bias=False,
          use_fast_variance=False,
          name=f'norm_{i}',
      )(x)
      x = nn.relu(x)

    # [B, T/4, 32 mel, 32 channels] -> [B, T/4, D]
    x = nn.DenseGeneral(
        features=self.embed_dim,
        axis=(-2, -1),
        use_bias=False,
        name='input_proj',
    )(x)
    return x, mask


class FeedForward(nn.Module):
  """Pre-norm swish FFN (D -> 4D -> D) with post-norm, added at half weight."""

  config: AudioConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bound = self.config.activation_bound
    d = self.config.embed_dim

    y = _rms_norm('pre_layer_norm')(jnp.clip(x, -bound, bound))
    y = ClippedDense((d, 4 * d), '...D,DF->...F', name='ffn_layer1')(y)
    y = nn.swish(y)
    y = ClippedDense((4 * d, d), '...F,FD->...D', name='ffn_layer2')(y)
    y = _rms_norm('post_layer_norm')(jnp.clip(y, -bound, bound))
    return x + 0.5 * y


def relative_position_signal(num_distances: int, channels: int) -> jax.Array:
  """Compute sinusoids [R, channels] of the distances 0..R-1, sines first.

  Timescales run geometrically from 1 to 10 000 over channels / 2 pairs.
  """
  num_timescales = channels // 2
  log_increment = jnp.log(10_000.0) / max(num_timescales - 1, 1)
  inverse_timescales = jnp.exp(
      jnp.arange(num_timescales, dtype=F32) * -log_increment
  )
  angles = jnp.arange(num_distances, dtype=F32)[:, None] * inverse_timescales
  signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(signal, ((0, 0), (0, channels % 2)))


class RelativePositionEmbedding(nn.Module):
  """Projection P [R, N, H] of the sinusoids of the distances 0..R-1."""

  num_heads: int
  head_dim: int

  @nn.compact
  def __call__(self, num_distances: int, channels: int) -> jax.Array:
    return nn.DenseGeneral(
        features=(self.num_heads, self.head_dim),
        use_bias=False,
        kernel_init=nn.initializers.glorot_uniform(),
        name='pos_proj',
    )(relative_position_signal(num_distances, channels))


def _past_windows(x: jax.Array, size: int, fill) -> jax.Array:
  """Stack [B, T, R, ...] of x at frames t, t-1, ..., t-R+1, `fill` before 0."""
  t = x.shape[1]
  pad = [(0, 0)] * x.ndim
  pad[1] = (size - 1, 0)
  padded = jnp.pad(x, pad, constant_values=fill)
  # Frame t - r sits at padded index t + size - 1 - r.
  index = jnp.arange(t)[:, None] + (size - 1) - jnp.arange(size)[None, :]
  return padded[:, index]


class LocalSelfAttention(nn.Module):
  """Causal attention over the last `left_context` frames, Transformer-XL style.

  Logits are `q·k + q·P[t - s]`, where P [R, N, H] projects sinusoids of the
  distance t - s. Queries are scaled per channel by a learned softplus factor
  and keys by a fixed one, both normalised so that softplus(0) counts as 1.
  Returns the attended values [B, T, N, H].
  """

  config: AudioConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, d = x.shape
    n, h, r = cfg.num_heads, cfg.head_dim, cfg.left_context

    def project(name):
      y = ClippedDense((d, d), '...D,DF->...F', name=name)(x)
      return y.reshape(b, t, n, h)

    q, k, v = project('query'), project('key'), project('value')

    per_dim_scale = self.param('per_dim_scale', nn.initializers.ones, (h,), F32)
    inverse_softplus_zero = 1.0 / math.log(2.0)
    q = q * (
        jnp.asarray(inverse_softplus_zero / math.sqrt(h), F32)
        * jax.nn.softplus(per_dim_scale)
    )
    k = k * jnp.asarray(inverse_softplus_zero * jax.nn.softplus(1.0), F32)

    # Keys and values of frames t, t-1, ..., t-r+1 for every query frame t.
    k_past = _past_windows(k, r, 0.0)  # [B, T, R, N, H]
    v_past = _past_windows(v, r, 0.0)
    key_valid = _past_windows(mask, r, False)  # [B, T, R]

    positions = RelativePositionEmbedding(
        n, h, name='relative_position_embedding'
    )(r, d)  # [R, N, H]

    content = jnp.einsum('BTNH,BTRNH->BNTR', q, k_past, precision='highest')
    position = jnp.einsum('BTNH,RNH->BNTR', q, positions, precision='highest')
    cap = cfg.attention_logit_cap
    logits = cap * jnp.tanh((content + position) / cap)
    logits = jnp.where(key_valid[:, None], logits, jnp.asarray(-1e9, F32))
    probs = jax.nn.softmax(logits, axis=-1)

    return jnp.einsum('BNTR,BTRNH->BTNH', probs, v_past, precision='highest')


class AttentionModule(nn.Module):
  """Pre-norm local self-attention, output projection, post-norm, residual."""

  config: AudioConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config
    bound = cfg.activation_bound

    y = _rms_norm('pre_norm')(jnp.clip(x, -bound, bound))
    y = LocalSelfAttention(cfg, name='self_atten')(y, mask)
    y = ClippedDense(
        (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
        '...NH,NHD->...D',
        name='post',
    )(y)
    y = _rms_norm('post_norm')(jnp.clip(y, -bound, bound))
    return x + y


class ConvolutionModule(nn.Module):
  """GLU, causal depthwise convolution, RMSNorm, swish, projection, residual."""

  config: AudioConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d = cfg.embed_dim

    y = _rms_norm('ln')(x)
    y = ClippedDense((d, 2 * d), '...D,DF->...F', name='linear_start')(y)
    y = nn.glu(y)  # first half times sigmoid of the second half
    y = nn.Conv(
        features=d,
        kernel_size=(cfg.conv_kernel_size,),
        padding='CAUSAL',
        feature_group_count=d,
        use_bias=False,
        param_dtype=F32,
        name='depthwise_conv1d',
    )(y)
    y = jnp.clip(y, -cfg.activation_bound, cfg.activation_bound)
    y = nn.swish(_rms_norm('conv_norm')(y))
    y = ClippedDense((d, d), '...D,DF->...F', name='linear_end')(y)
    return x + y


class ConformerLayer(nn.Module):
  """FFN/2, attention, convolution, FFN/2, RMSNorm on [B, T, D]."""

  config: AudioConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg = self.config

    x = FeedForward(cfg, name='fflayer_start')(x)
    x = AttentionModule(cfg, name='trans_atten')(x, mask)
    # Zero padding frames so that the convolution's window carries none.
    x = x * mask[..., None].astype(x.dtype)
    x = ConvolutionModule(cfg, name='lconv')(x)
    x = FeedForward(cfg, name='fflayer_end')(x)
    x = jnp.clip(x, -cfg.activation_bound, cfg.activation_bound)
    return _rms_norm('final_ln')(x)


class AudioEncoder(nn.Module):
  """Soft tokens of a batch of 16 kHz clips.

  Place it at the official path `audio_encoder` of the multimodal model.
  """

  config: AudioConfig = AudioConfig()

  @nn.compact
  def __call__(
      self, waveforms: jax.Array, lengths: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Encode clips right-padded with zeros (`features.batch_clips`).

    Args:
      waveforms: [B, S] float samples at 16 kHz.
      lengths: [B] samples of each clip.

    Returns:
      soft_tokens [B, T, M] with T = ceil(frames / 4) and zero rows at
      padding, and padding_mask [B, T], True at padding. A clip of n samples
      has `features.num_soft_tokens(n)` leading tokens. When the clip is
      shorter than the batch, this mask may mark one more or one fewer as
      valid.
    """
    cfg = self.config
    waveforms = jnp.asarray(waveforms, F32)

    mel = features.mel_features(waveforms)  # [B, frames, 128]
    mask = features.valid_frame_mask(lengths, waveforms.shape[1], mel.shape[1])
    mel = jnp.where(mask[..., None], mel, 0.0)

    x, mask = Subsampling(cfg.embed_dim, name='feature')(mel, mask)
    for i in range(cfg.num_layers):
      x = ConformerLayer(cfg, name=f'conformer/stacked_layers_{i}')(x, mask)

    if cfg.reduction_factor > 1:
      x = x[:, :: cfg.reduction_factor]
      mask = mask[:, :: cfg.reduction_factor]

    x = nn.Dense(cfg.soft_token_dim, name='output_projection')(x)
    x = jnp.where(mask[..., None], x, 0.0)
    return x, ~mask


def project_audio_soft_tokens(
    soft_tokens: jax.Array, projection: jax.Array
) -> jax.Array:
  """Map audio soft tokens [..., M] into the text embedding space [..., E].

  The official `audio_input_projection` (`projection` is its [M, E] weight
  `w`) followed by `audio_soft_embedding_norm` (RMSNorm without scale), in
  float32. The order is the reverse of the vision projection's, and the
  result is not multiplied by sqrt(E).
  """
  x = jnp.einsum(
      '...M,ME->...E', soft_tokens.astype(F32), projection.astype(F32)
  )
  return rms_norm(x)


class AudioSoftTokenProjection(nn.Module):
  """`project_audio_soft_tokens` with its weight as parameter `w`.

  Assign it to the text embedder's attribute `audio_input_projection` and its
  weight sits at the official path `embedder/audio_input_projection/w`
  (`audio_soft_embedding_norm` has no parameters).
  """

  soft_token_dim: int
  text_dim: int

  @nn.compact
  def __call__(self, soft_tokens: jax.Array) -> jax.Array:
    w = self.param(
        'w',
        nn.initializers.normal(0.02),
        (self.soft_token_dim, self.text_dim),
        F32,
    )
    return project_audio_soft_tokens(soft_tokens, w)


def concatenate_audio_soft_tokens(
    soft_tokens: jax.Array, soft_token_counts: tuple[int, ...]
) -> jax.Array:
  """Concatenate each clip's leading `count` soft tokens into [sum(counts), D].

  The order is the one in which the text model fills its audio placeholder
  tokens. Use `features.num_soft_tokens` of each clip's length as its count,
  as the official sampler does.
  """
  if len(soft_token_counts) != soft_tokens.shape[0]:
    raise ValueError(
        f'{len(soft_token_counts)} soft-token counts for'
        f' {soft_tokens.shape[0]} clips. Pass one count per clip'
    )
  return jnp.concatenate(
      [soft_tokens[i, :count] for i, count in enumerate(soft_token_counts)],
      axis=0,
  )
