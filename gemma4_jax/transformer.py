"""The Gemma 4 text decoder: embedder with per-layer embeddings, blocks, logits.

`Transformer(config=..., dtype=...)` is a Flax linen module whose parameter
tree is the released (NESTED) tree, so released checkpoints load without any
renaming. It is a pure function of (params, tokens), or of (params, tokens,
images) when the config has a vision encoder.

With images, the tokens already contain one run of placeholder ids
(`vision.merge.SOFT_TOKEN_PLACEHOLDER`) per image, as
`vision.merge.expand_image_placeholders` writes them. The vision encoder
turns the images into soft tokens, which replace the placeholder embeddings
in order: the first image of the batch fills the first run of row 0, and so
on row by row. Positions stay consecutive over the whole sequence.

Audio (E2B and E4B) works the same way: one run of audio placeholder ids
(`audio.merge.AUDIO_SOFT_TOKEN_PLACEHOLDER`) per clip, as
`audio.merge.expand_audio_placeholders` writes them, filled with the audio
encoder's soft tokens in order. Audio soft tokens attend causally, like text.
"""

from __future__ import annotations

from typing import Any, Union

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp

from gemma4_jax import attention as attention_lib
from gemma4_jax.audio import encoder as audio_lib
from gemma4_jax.audio import features as audio_features
from gemma4_jax.audio import merge as audio_merge
from gemma4_jax import layers
from gemma4_jax import moe as moe_lib
from gemma4_jax.config import LOCAL, Gemma4Config
from gemma4_jax.parallel.rules import constrain
from gemma4_jax.sampling.cache import KVCache, LayerCache
from gemma4_jax.vision import encoder as vision_lib
from gemma4_jax.vision import merge as merge_lib
from gemma4_jax.vision import preprocess as preprocess_lib

# Preprocessed images: an `ImageBatch`, or its (patches [N, L, 768],
# positions_xy [N, L, 2]) arrays, which can cross a `jax.jit` boundary.
Images = Union[preprocess_lib.ImageBatch, tuple[jax.Array, jax.Array]]

# Prepared audio clips: an `AudioBatch`, or its (waveforms [N, S], lengths
# [N], soft-token counts [N]) arrays, which can cross a `jax.jit` boundary.
Audio = Union[
    audio_features.AudioBatch, tuple[jax.Array, jax.Array, jax.Array]
]


@flax.struct.dataclass
class Output:
  """Decoder outputs.

  Attributes:
    logits: [B, T, V] soft-capped logits, or None when not requested.
    hidden_states: [B, T, D] final-normed hidden states, or None.
  """

  logits: jax.Array | None
  hidden_states: jax.Array | None


class Embedder(nn.Module):
  """Token embedding (tied to the output projection) and per-layer inputs."""

  config: Gemma4Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.input_embedding = self.param(
        'input_embedding',
        layers.normal_init(cfg.embed_dim**-0.5),
        (cfg.vocab_size, cfg.embed_dim),
        self.dtype,
    )
    if cfg.per_layer_input_dim:
      self.per_layer_embeddings = self.param(
          'per_layer_embeddings',
          layers.normal_init(cfg.per_layer_input_dim**-0.5),
          (cfg.vocab_size, cfg.num_layers, cfg.per_layer_input_dim),
          self.dtype,
      )
      self.per_layer_model_projection = layers.Einsum(
          (cfg.embed_dim, cfg.num_layers, cfg.per_layer_input_dim),
          init_stddev=1.0,
          w_scale=cfg.embed_dim**-0.5,
          dtype=self.dtype,
      )
      self.per_layer_projection_norm = layers.RMSNorm(dtype=self.dtype)
    if cfg.vision is not None:
      # Float32 whatever `dtype` is, as in the release. The parameter-free
      # `mm_pre_projection_norm` is part of this module's computation.
      self.mm_input_projection = vision_lib.SoftTokenProjection(
          cfg.vision.embed_dim, cfg.embed_dim
      )
    if cfg.audio is not None:
      # Float32 as well. `audio_soft_embedding_norm` has no parameters.
      self.audio_input_projection = audio_lib.AudioSoftTokenProjection(
          cfg.audio.soft_token_dim, cfg.embed_dim
      )

  def encode(self, tokens: jax.Array) -> jax.Array:
    """Embeddings [B, T, D] of `tokens` [B, T], times `sqrt(D)`."""
    x = self.input_embedding[tokens]
    return x * jnp.sqrt(self.config.embed_dim).astype(x.dtype)

  def decode(self, x: jax.Array, streamed: bool = False) -> jax.Array:
    """Logits [B, T, V] of hidden states `x` [B, T, D] (tied weights).

    `streamed` uses `layers.streamed_einsum` (inference only).
    """
    if streamed:
      return layers.streamed_einsum('BTD,VD->BTV', x, self.input_embedding)
    return jnp.einsum('BTD,VD->BTV', x, self.input_embedding)

  def per_layer_inputs(
      self, x: jax.Array, tokens: jax.Array, streamed: bool = False
  ) -> jax.Array:
    """Per-layer inputs [B, T, L, P] from embeddings `x` and `tokens`.

    The average of a projection of the token embedding and a per-token
    look-up; ids outside the text vocabulary read row 0 of the table.
    """
    cfg = self.config
    projected = self.per_layer_model_projection('BTD,DLP->BTLP', x, streamed)
    projected = self.per_layer_projection_norm(projected)

    in_vocab = (tokens >= 0) & (tokens < cfg.vocab_size)
    table_ids = jnp.where(in_vocab, tokens, 0)
    looked_up = self.per_layer_embeddings[table_ids]  # [B, T, L, P]
    looked_up = looked_up * jnp.sqrt(cfg.per_layer_input_dim).astype(
        looked_up.dtype
    )
    return (projected + looked_up) * jax.lax.rsqrt(2.0).astype(x.dtype)


class Block(nn.Module):
  """One decoder layer: attention, dense or MoE feed-forward, PLE, skip scale."""

  config: Gemma4Config
  layer: int
  dtype: jnp.dtype = jnp.float32
  moe_implementation: str = 'auto'
  moe_capacity_factor: float | None = None

  def setup(self):
    cfg = self.config
    d = cfg.embed_dim
    norm = lambda: layers.RMSNorm(dtype=self.dtype)

    self.pre_attention_norm = norm()
    self.attn = attention_lib.Attention(cfg, self.layer, dtype=self.dtype)
    self.post_attention_norm = norm()

    self.pre_ffw_norm = norm()
    self.post_ffw_norm = norm()
    if cfg.is_moe:
      self.mlp = moe_lib.MoE(
          embed_dim=d,
          hidden_dim=cfg.expert_hidden_dim,
          num_experts=cfg.num_experts,
          experts_per_token=cfg.experts_per_token,
          dtype=self.dtype,
          implementation=self.moe_implementation,
          capacity_factor=self.moe_capacity_factor,
      )
      self.post_ffw1_norm = norm()
      # The always-on dense branch (the "shared expert").
      self.pre_ffw2_norm = norm()
      self.mlp2 = layers.FeedForward(d, cfg.hidden_dim, dtype=self.dtype)
      self.post_ffw2_norm = norm()
    else:
      self.mlp = layers.FeedForward(
          d, cfg.layer_hidden_dim(self.layer), dtype=self.dtype
      )

    if cfg.per_layer_input_dim:
      p = cfg.per_layer_input_dim
      self.per_layer_input_gate = layers.Einsum(
          (d, p), init_stddev=d**-0.5, dtype=self.dtype
      )
      self.per_layer_projection = layers.Einsum(
          (p, d), init_stddev=p**-0.5, dtype=self.dtype
      )
      self.post_per_layer_input_norm = norm()

    self.skip_scale = self.param(
        'skip_scale', nn.initializers.ones, (1,), self.dtype
    )

  def feed_forward(self, x: jax.Array, streamed: bool = False) -> jax.Array:
    if not self.config.is_moe:
      return self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x), streamed))
    dense = self.post_ffw2_norm(self.mlp2(self.pre_ffw2_norm(x), streamed))
    routed = self.post_ffw1_norm(self.mlp(self.pre_ffw_norm(x)))
    return self.post_ffw_norm(dense + routed)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      mask: jax.Array,
      per_layer_input: jax.Array | None = None,
      shared_kv: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Apply the layer to `x` [B, T, D].

    Args:
      x: Residual stream [B, T, D].
      positions: [B, T].
      mask: [B, T, S] visibility (causal, padding, segments); local layers
        add the sliding window themselves.
      per_layer_input: This layer's slice [B, T, P] of the per-layer inputs.
      shared_kv: Keys and values of this layer's KV-sharing source.

    Returns:
      The new residual stream [B, T, D] and the (keys, values) attended to.
    """
    attn_out, kv = self.attn(
        self.pre_attention_norm(x), positions, mask, shared_kv
    )
    return self.after_attention(x, attn_out, per_layer_input), kv

  def after_attention(
      self,
      x: jax.Array,
      attn_out: jax.Array,
      per_layer_input: jax.Array | None,
      streamed: bool = False,
  ) -> jax.Array:
    """Residual adds, feed-forward, per-layer input and skip scale.

    `streamed` multiplies the dense weights with `layers.streamed_einsum`
    (the sampling path).
    """
    x = x + self.post_attention_norm(attn_out)

    x = x + self.feed_forward(x, streamed)

    if per_layer_input is not None:
      gate = layers.gelu_tanh(
          self.per_layer_input_gate('BTD,DP->BTP', x, streamed)
      )
      ple = self.per_layer_projection(
          'BTP,PD->BTD', gate * per_layer_input, streamed
      )
      x = x + self.post_per_layer_input_norm(ple)

    return x * self.skip_scale

  def cached(
      self,
      x: jax.Array,
      positions: jax.Array,
      valid: jax.Array,
      cache: LayerCache | None,
      mode: str,
      per_layer_input: jax.Array | None = None,
      shared_view: tuple[attention_lib.KVView, ...] | None = None,
      image_blocks: jax.Array | None = None,
  ) -> tuple[jax.Array, LayerCache | None, tuple[attention_lib.KVView, ...]]:
    """Apply the layer to a chunk, reading and updating its KV cache.

    `image_blocks` [B, T] (see `Attention.cached`) makes the soft tokens of
    each image attend to each other in a sliding-window layer.
    """
    attn_out, new_cache, view = self.attn.cached(
        self.pre_attention_norm(x),
        positions,
        valid,
        cache,
        mode,
        shared_view,
        image_blocks,
    )
    out = self.after_attention(x, attn_out, per_layer_input, streamed=True)
    return out, new_cache, view


# Logical axes of the residual stream [B, T, D]: rows split over the batch
# axes, features whole on each device (the weights' `embed` axis is split
# over fsdp, but activations take that axis for their rows).
RESIDUAL_AXES = ('batch', 'length', None)


def _constrain_inputs(x, per_layer_inputs):
  """Pin the embedded tokens [B, T, D] and per-layer inputs [B, T, L, P]."""
  x = constrain(x, RESIDUAL_AXES)
  if per_layer_inputs is not None:
    per_layer_inputs = constrain(
        per_layer_inputs, ('batch', 'length', None, None)
    )
  return x, per_layer_inputs


# Rematerialisation choices of `Transformer.remat`: the `jax.checkpoint`
# policy of each block, which names the intermediates the backward pass keeps.
REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'full': jax.checkpoint_policies.nothing_saveable,
}


class Transformer(nn.Module):
  """Gemma 4 text decoder.

  Attributes:
    config: Shapes and constants of the model.
    dtype: Dtype of the parameters and of the computation.
    pad_id: Token id treated as padding when no `input_mask` is given.
    moe_implementation: How MoE blocks run their experts: 'ragged'
      (`jax.lax.ragged_dot`, for GPU and TPU), 'tiled' (a loop over expert
      tiles, for CPU), 'auto' (by the default backend) or 'all_to_all'
      (expert parallelism with all-to-all over the expert axis of the mesh
      set by `jax.set_mesh`; see `gemma4_jax.parallel.expert`).
    moe_capacity_factor: Used by 'all_to_all' only. None exchanges token
      buffers that never overflow. A number c sizes them at c times their
      mean load and drops, counts and logs the assignments that do not fit.
    remat: What the backward pass of `__call__` keeps of each block's
      forward pass (see `REMAT_POLICIES`): 'none' keeps everything, 'dots'
      keeps only the outputs of weight matmuls and recomputes the rest,
      'full' keeps only the block's input and recomputes the whole block.
      Sampling (`cached`) is not affected.
  """

  config: Gemma4Config
  dtype: Any = jnp.bfloat16
  pad_id: int = 0
  moe_implementation: str = 'auto'
  moe_capacity_factor: float | None = None
  remat: str = 'none'

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg, dtype=self.dtype)
    if self.remat not in REMAT_POLICIES:
      raise ValueError(
          f'remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}'
      )
    block_class = Block
    if self.remat != 'none':
      block_class = nn.remat(Block, policy=REMAT_POLICIES[self.remat])
    self.blocks = [
        block_class(
            cfg,
            i,
            dtype=self.dtype,
            moe_implementation=self.moe_implementation,
            moe_capacity_factor=self.moe_capacity_factor,
            name=f'layer_{i}',
        )
        for i in range(cfg.num_layers)
    ]
    self.final_norm = layers.RMSNorm(dtype=self.dtype)
    if cfg.vision is not None:
      self.vision_encoder = vision_lib.VisionEncoder(cfg.vision)
    if cfg.audio is not None:
      self.audio_encoder = audio_lib.AudioEncoder(cfg.audio)

  def _image_arrays(
      self, images: Images, tokens: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Check `images` against the config and tokens; return their arrays."""
    if self.config.vision is None:
      raise ValueError(
          f'images were given but config {self.config.name!r} has no vision'
          ' encoder; build the model with config.with_vision(config)'
      )
    if isinstance(images, preprocess_lib.ImageBatch):
      counts = images.soft_token_counts
      if not isinstance(tokens, jax.core.Tracer):
        placeholders = int(
            jnp.sum(jnp.asarray(tokens) == merge_lib.SOFT_TOKEN_PLACEHOLDER)
        )
        if placeholders != sum(counts):
          raise ValueError(
              f'the tokens contain {placeholders} image placeholders but the'
              f' images give {sum(counts)} soft tokens {tuple(counts)};'
              ' expand each image mark with'
              ' vision.merge.expand_image_placeholders and these counts'
          )
      return jnp.asarray(images.patches), jnp.asarray(images.positions_xy)
    patches, positions_xy = images
    return jnp.asarray(patches), jnp.asarray(positions_xy)

  def _audio_arrays(
      self, audio: Audio, tokens: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Check `audio` against the config and tokens; return its arrays."""
    if self.config.audio is None:
      raise ValueError(
          f'audio was given but config {self.config.name!r} has no audio'
          ' encoder (only E2B and E4B have one); build the model with'
          ' config.with_audio(config)'
      )
    if isinstance(audio, audio_features.AudioBatch):
      counts = audio.soft_token_counts
      if not isinstance(tokens, jax.core.Tracer):
        placeholders = int(
            jnp.sum(
                jnp.asarray(tokens) == audio_merge.AUDIO_SOFT_TOKEN_PLACEHOLDER
            )
        )
        if placeholders != sum(counts):
          raise ValueError(
              f'the tokens contain {placeholders} audio placeholders but the'
              f' clips give {sum(counts)} soft tokens {tuple(counts)};'
              ' expand each audio mark with'
              ' audio.merge.expand_audio_placeholders and these counts'
          )
      audio = audio.arrays()
    waveforms, lengths, counts = audio
    return jnp.asarray(waveforms), jnp.asarray(lengths), jnp.asarray(counts)

  def _init_audio(self) -> None:
    """Create the audio parameters when `init` is called without audio."""
    waveforms = jnp.zeros((1, audio_features.MIN_SAMPLES), jnp.float32)
    lengths = jnp.full((1,), audio_features.MIN_SAMPLES, jnp.int32)
    soft_tokens, _ = self.audio_encoder(waveforms, lengths)
    self.embedder.audio_input_projection(soft_tokens)

  def _init_vision(self) -> None:
    """Create the vision parameters when `init` is called without images."""
    vision = self.config.vision
    kernel = vision.pooling_kernel_size
    columns, rows = jnp.meshgrid(jnp.arange(kernel), jnp.arange(kernel))
    positions_xy = jnp.stack([columns, rows], axis=-1).reshape(1, -1, 2)
    patches = jnp.zeros((1, kernel * kernel, vision.patch_dim), jnp.float32)
    soft_tokens, _ = self.vision_encoder(patches, positions_xy)
    self.embedder.mm_input_projection(soft_tokens)

  def embed(
      self,
      tokens: jax.Array,
      images: Images | None = None,
      streamed: bool = False,
      audio: Audio | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """Embed `tokens` [B, T] and write the media's soft tokens over them.

    Returns:
      The embeddings [B, T, D] and the per-layer inputs [B, T, L, P] (None
      without PLE). Text embeddings are multiplied by sqrt(D), soft tokens
      are not. Placeholder ids read row 0 of the per-layer embedding table,
      but the projection part of the per-layer inputs uses the soft tokens.
    """
    cfg = self.config
    image_arrays = None
    if images is not None:
      image_arrays = self._image_arrays(images, tokens)

    x = self.embedder.encode(tokens)
    if image_arrays is not None:
      soft_tokens = self.encode_images(*image_arrays)
      # Merging over the flattened batch hands each row the images that
      # follow those of the rows before it.
      batch, length, dim = x.shape
      x = merge_lib.merge_soft_embeddings(
          x.reshape(1, batch * length, dim),
          tokens.reshape(1, batch * length),
          soft_tokens,
      ).reshape(batch, length, dim)
    elif cfg.vision is not None and self.is_initializing():
      self._init_vision()

    if audio is not None:
      audio_arrays = self._audio_arrays(audio, tokens)
      soft_tokens = self.encode_audio(*audio_arrays)
      batch, length, dim = x.shape
      x = audio_merge.merge_audio_embeddings(
          x.reshape(1, batch * length, dim),
          tokens.reshape(1, batch * length),
          soft_tokens,
      ).reshape(batch, length, dim)
    elif cfg.audio is not None and self.is_initializing():
      self._init_audio()

    per_layer_inputs = None
    if cfg.per_layer_input_dim:
      per_layer_inputs = self.embedder.per_layer_inputs(x, tokens, streamed)
    return x, per_layer_inputs

  def encode_images(
      self, patches: jax.Array, positions_xy: jax.Array
  ) -> jax.Array:
    """Encode images into soft tokens in the text embedding space.

    Args:
      patches: [N, L, 768] patches of N images (all rows of the batch, in
        order), as `vision.preprocess.preprocess_images` gives them.
      positions_xy: [N, L, 2] their patch positions, -1 for padding.

    Returns:
      [1, N * L / 9, D] float32: the real soft tokens of all images one after
      another, then padding. `merge_soft_embeddings` hands them out to the
      placeholders of the flattened batch in order.
    """
    soft_tokens, is_token = self.vision_encoder(patches, positions_xy)
    projected = self.embedder.mm_input_projection(soft_tokens)
    projected = projected.reshape(-1, projected.shape[-1])
    is_token = is_token.reshape(-1)
    (real,) = jnp.nonzero(is_token, size=is_token.shape[0], fill_value=0)
    return projected[real][None]

  def encode_audio(
      self, waveforms: jax.Array, lengths: jax.Array, counts: jax.Array
  ) -> jax.Array:
    """Encode audio clips into soft tokens in the text embedding space.

    Args:
      waveforms: [N, S] 16 kHz clips of all rows of the batch, in order,
        right-padded with zeros.
      lengths: [N] samples of each clip.
      counts: [N] soft tokens of each clip in the text
        (`audio.features.num_soft_tokens` of its length).

    Returns:
      [1, N * T, D] float32: the first `counts[i]` soft tokens of each clip
      one after another, then padding. `merge_audio_embeddings` hands them
      out to the placeholders of the flattened batch in order.
    """
    soft_tokens, _ = self.audio_encoder(waveforms, lengths)
    projected = self.embedder.audio_input_projection(soft_tokens)  # [N, T, D]
    num_clips, num_tokens, dim = projected.shape
    is_token = jnp.arange(num_tokens)[None, :] < jnp.asarray(counts)[:, None]
    is_token = is_token.reshape(-1)
    (real,) = jnp.nonzero(is_token, size=is_token.shape[0], fill_value=0)
    return projected.reshape(num_clips * num_tokens, dim)[real][None]

  def __call__(
      self,
      tokens: jax.Array,
      *,
      positions: jax.Array | None = None,
      input_mask: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      attention_mask: jax.Array | None = None,
      images: Images | None = None,
      audio: Audio | None = None,
      return_logits: bool = True,
      return_hidden_states: bool = False,
  ) -> Output:
    """Run the decoder on `tokens` [B, T].

    Args:
      tokens: Token ids [B, T]. Batches are right-padded with `pad_id`.
        With `images`, each image is a run of placeholder ids (see the
        module docstring).
      positions: [B, T] positions; defaults to counting the valid tokens.
      input_mask: [B, T], True for real tokens; defaults to
        `tokens != pad_id`.
      segment_ids: [B, T] ids of packed examples; attention never crosses
        segments. Positions should then restart at each segment.
      attention_mask: [B, T, T], True where query t may see key s. Replaces
        the default causal, padding and segment mask; local layers still add
        the sliding window.
      images: The images of all rows, in order, for a model with a vision
        encoder. In `vision_bidirectional` models the soft tokens of one
        image also see each other in the sliding-window layers.
      audio: The audio clips of all rows, in order, for a model with an
        audio encoder (E2B, E4B): an `audio.features.AudioBatch` or its
        `arrays()`.
      return_logits: Compute the [B, T, V] logits (skip for a chunked loss).
      return_hidden_states: Also return the final-normed hidden states.

    Returns:
      An `Output` with logits [B, T, V] and optional hidden states [B, T, D].
    """
    cfg = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(
          f'tokens must have shape [batch, length], got {tokens.shape};'
          ' add a batch axis with tokens[None] for one sequence'
      )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f'tokens must be integer ids, got dtype {tokens.dtype}; convert'
          ' with tokens.astype(jnp.int32)'
      )
    batch, length = tokens.shape
    for name, value, shape in (
        ('positions', positions, (batch, length)),
        ('input_mask', input_mask, (batch, length)),
        ('segment_ids', segment_ids, (batch, length)),
        ('attention_mask', attention_mask, (batch, length, length)),
    ):
      if value is not None and tuple(value.shape) != shape:
        raise ValueError(
            f'{name} must have shape {shape} to match tokens {tokens.shape},'
            f' got {tuple(value.shape)}'
        )

    if input_mask is None:
      input_mask = tokens != self.pad_id
    if positions is None:
      positions = attention_lib.positions_from_mask(input_mask)
    if attention_mask is None:
      attention_mask = attention_lib.causal_mask(input_mask, segment_ids)
    local_mask = attention_mask
    if images is not None and cfg.vision_bidirectional:
      local_mask = attention_lib.bidirectional_image_mask(
          attention_mask, merge_lib.image_block_ids(tokens)
      )

    x, per_layer_inputs = self.embed(tokens, images, audio=audio)
    x, per_layer_inputs = _constrain_inputs(x, per_layer_inputs)

    layer_kv = []
    for i, block in enumerate(self.blocks):
      source = cfg.kv_source_layers[i]
      shared_kv = layer_kv[source] if source != i else None
      is_local = cfg.layer_kinds[i] == LOCAL
      x, kv = block(
          x,
          positions,
          local_mask if is_local else attention_mask,
          None if per_layer_inputs is None else per_layer_inputs[:, :, i],
          shared_kv,
      )
      x = constrain(x, RESIDUAL_AXES)
      layer_kv.append(kv)

    x = self.final_norm(x)

    logits = self.output_logits(x) if return_logits else None
    return Output(
        logits=logits, hidden_states=x if return_hidden_states else None
    )

  def output_logits(self, x: jax.Array, streamed: bool = False) -> jax.Array:
    """Soft-capped logits [B, T, V] of final hidden states `x` [B, T, D]."""
    logits = constrain(
        self.embedder.decode(x, streamed), ('batch', 'length', 'vocab')
    )
    cap = self.config.final_logit_softcap
    if cap is not None:
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def cached(
      self,
      tokens: jax.Array,
      cache: KVCache,
      *,
      input_mask: jax.Array | None = None,
      mode: str = 'extend',
      last_only: bool = True,
      images: Images | None = None,
      audio: Audio | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """Run a prompt chunk or one decode step against `cache`.

    Row b's tokens take positions `cache.lengths[b], cache.lengths[b] + 1,
    ...`; padding (where `input_mask` is False) is neither stored nor seen.

    Args:
      tokens: [B, T] token ids, right-padded.
      cache: The KV cache; `mode='fresh'` requires it to be empty.
      input_mask: [B, T], True for real tokens; defaults to `tokens != pad_id`.
      mode: 'fresh' for the first chunk of an empty cache (it attends only to
        itself, with no read of the cache), 'extend' otherwise.
      last_only: Return logits [B, V] of each row's last valid token rather
        than [B, T, V].
      images: The images whose placeholder runs are in this chunk, as in
        `__call__`. Each image must lie wholly inside the chunk.
      audio: The audio clips whose placeholder runs are in this chunk, as in
        `__call__`. Each clip must lie wholly inside the chunk.

    Returns:
      The logits and the updated cache.
    """
    cfg = self.config
    if mode not in ('fresh', 'extend'):
      raise ValueError(f"mode={mode!r} must be 'fresh' or 'extend'")
    if input_mask is None:
      input_mask = tokens != self.pad_id
    input_mask = input_mask.astype(jnp.bool_)
    offsets = jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1
    positions = cache.lengths[:, None] + jnp.maximum(offsets, 0)

    x, per_layer_inputs = self.embed(tokens, images, streamed=True, audio=audio)
    x, per_layer_inputs = _constrain_inputs(x, per_layer_inputs)
    image_blocks = None
    if images is not None and cfg.vision_bidirectional:
      image_blocks = merge_lib.image_block_ids(tokens)

    new_layers = []
    views = []
    for i, block in enumerate(self.blocks):
      source = cfg.kv_source_layers[i]
      x, layer_cache, view = block.cached(
          x,
          positions,
          input_mask,
          cache.layers[i],
          mode,
          None if per_layer_inputs is None else per_layer_inputs[:, :, i],
          views[source] if source != i else None,
          image_blocks,
      )
      x = constrain(x, RESIDUAL_AXES)
      new_layers.append(layer_cache)
      views.append(view)

    x = self.final_norm(x)
    counts = jnp.sum(input_mask, axis=1).astype(jnp.int32)
    if last_only:
      last = jnp.maximum(counts - 1, 0)
      x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [B, 1, D]
    logits = self.output_logits(x, streamed=True)
    if last_only:
      logits = logits[:, 0]
    new_cache = KVCache(layers=tuple(new_layers), lengths=cache.lengths + counts)
    return logits, new_cache
