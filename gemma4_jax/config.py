"""Gemma 4 text decoder configuration and the presets of the four releases.

A `Gemma4Config` fixes every shape of the parameter tree. The presets carry the
values of the released E2B, E4B, 26B-A4B and 31B decoders; small test models
are built with `dataclasses.replace` (or `Gemma4Config(...)` directly).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Sequence

from gemma4_jax.audio.encoder import AudioConfig
from gemma4_jax.vision.encoder import VISION_PRESETS, VisionConfig


class AttentionKind(enum.Enum):
  """Kind of attention a decoder layer uses."""

  LOCAL_SLIDING = 'local'
  GLOBAL = 'global'


LOCAL = AttentionKind.LOCAL_SLIDING
GLOBAL = AttentionKind.GLOBAL


def layer_kinds(
    pattern: Sequence[AttentionKind], num_layers: int
) -> tuple[AttentionKind, ...]:
  """Repeat `pattern` over `num_layers` layers, truncating the last repeat."""
  pattern = tuple(pattern)
  repeats = -(-num_layers // len(pattern))
  return (pattern * repeats)[:num_layers]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemma4Config:
  """Shapes and constants of one Gemma 4 text decoder.

  Attributes:
    name: A short label, used in logs and error messages.
    vocab_size: Rows of the token embedding table (V).
    embed_dim: Model width (D).
    num_layers: Number of decoder blocks (L).
    attention_pattern: The repeating sequence of layer kinds; layer `i` has
      kind `attention_pattern[i % len(attention_pattern)]`.
    num_heads: Query heads (N), the same in local and global layers.
    head_dim: Head width of local layers (H).
    num_kv_heads: KV heads of local layers (K).
    global_head_dim: Head width of global layers.
    num_global_kv_heads: KV heads of global layers.
    k_eq_v_global: Global layers project one tensor that serves as both keys
      and values (`attn/k_einsum` in place of `attn/kv_einsum`).
    sliding_window: Local layers attend to keys with
      `|query_pos - key_pos| < sliding_window`.
    hidden_dim: Hidden width of the gated MLP (F). For MoE models this is the
      width of the always-on dense branch `mlp2`.
    kv_shared_hidden_dim: MLP width in KV-shared layers when it differs from
      `hidden_dim` (E2B doubles it), else None.
    per_layer_input_dim: Width of the per-layer embeddings (P); 0 disables
      them.
    num_kv_shared_layers: The last this-many layers reuse the keys and values
      of the last unshared layer of the same kind.
    num_experts: Experts per MoE block (E); 0 for a dense model.
    expert_hidden_dim: Hidden width of each expert.
    experts_per_token: Experts each token is routed to (top-k).
    local_rope_base: RoPE base frequency of local layers.
    global_rope_base: RoPE base frequency of global layers.
    local_rope_proportion: Fraction of a local head that RoPE rotates.
    global_rope_proportion: Fraction of a global head that RoPE rotates.
    final_logit_softcap: Logits become `tanh(x / c) * c`; None disables it.
    vision_bidirectional: Image soft tokens attend to each other in both
      directions in local layers (26B-A4B, 31B).
    vision: The vision encoder, or None for a text-only model (whose
      parameter tree then has no `vision_encoder` and no `embedder/mm_*`).
      `with_vision` attaches the released tower of a preset.
    audio: The audio encoder (E2B and E4B), or None (no `audio_encoder` and
      no `embedder/audio_input_projection` in the tree). `with_audio`
      attaches the released tower.
  """

  name: str = 'custom'
  vocab_size: int = 262_144
  embed_dim: int
  num_layers: int
  attention_pattern: tuple[AttentionKind, ...] = (LOCAL,) * 5 + (GLOBAL,)
  num_heads: int
  head_dim: int = 256
  num_kv_heads: int
  global_head_dim: int = 512
  num_global_kv_heads: int
  k_eq_v_global: bool = False
  sliding_window: int
  hidden_dim: int
  kv_shared_hidden_dim: int | None = None
  per_layer_input_dim: int = 0
  num_kv_shared_layers: int = 0
  num_experts: int = 0
  expert_hidden_dim: int = 0
  experts_per_token: int = 0
  local_rope_base: float = 10_000.0
  global_rope_base: float = 1_000_000.0
  local_rope_proportion: float = 1.0
  global_rope_proportion: float = 0.25
  final_logit_softcap: float | None = 30.0
  vision_bidirectional: bool = False
  vision: VisionConfig | None = None
  audio: AudioConfig | None = None

  def __post_init__(self):
    problems = []
    for field in (
        'vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'head_dim',
        'num_kv_heads', 'global_head_dim', 'num_global_kv_heads',
        'sliding_window', 'hidden_dim',
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 1:
        problems.append(f'{field}={value!r} must be a positive integer')
    for field in (
        'per_layer_input_dim', 'num_kv_shared_layers', 'num_experts',
        'expert_hidden_dim', 'experts_per_token',
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value < 0:
        problems.append(f'{field}={value!r} must be a non-negative integer')
    if not self.attention_pattern:
      problems.append('attention_pattern is empty; give at least one kind')
    for field in ('local_rope_proportion', 'global_rope_proportion'):
      value = getattr(self, field)
      if not 0.0 <= value <= 1.0:
        problems.append(f'{field}={value!r} must be in [0, 1]')
    if self.final_logit_softcap is not None and self.final_logit_softcap <= 0:
      problems.append(
          f'final_logit_softcap={self.final_logit_softcap!r} must be positive;'
          ' use None to disable the soft-cap'
      )
    if self.num_experts and not self.expert_hidden_dim:
      problems.append('an MoE config (num_experts > 0) needs expert_hidden_dim')
    if not self.num_experts and self.experts_per_token:
      problems.append(
          f'experts_per_token={self.experts_per_token} is set but'
          ' num_experts=0; set both or neither'
      )
    if self.vision is not None and not isinstance(self.vision, VisionConfig):
      problems.append(
          f'vision={self.vision!r} must be a VisionConfig or None'
      )
    if self.audio is not None and not isinstance(self.audio, AudioConfig):
      problems.append(f'audio={self.audio!r} must be an AudioConfig or None')
    if problems:
      # The divisibility checks below would fail on zero or missing values.
      raise ValueError(
          f'invalid Gemma4Config {self.name!r}: ' + '; '.join(problems)
      )

    if self.num_heads % self.num_kv_heads:
      problems.append(
          f'num_heads={self.num_heads} is not a multiple of'
          f' num_kv_heads={self.num_kv_heads}'
      )
    if self.num_heads % self.num_global_kv_heads:
      problems.append(
          f'num_heads={self.num_heads} is not a multiple of'
          f' num_global_kv_heads={self.num_global_kv_heads}'
      )
    if self.head_dim % 2 or self.global_head_dim % 2:
      problems.append('head_dim and global_head_dim must be even for RoPE')
    if not 0 <= self.num_kv_shared_layers < self.num_layers:
      problems.append(
          f'num_kv_shared_layers={self.num_kv_shared_layers} must be in'
          f' [0, num_layers={self.num_layers})'
      )
    if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
      problems.append(
          f'experts_per_token={self.experts_per_token} must be in'
          f' [1, num_experts={self.num_experts}]'
      )
    if self.num_experts and self.num_kv_shared_layers:
      problems.append('KV sharing with MoE blocks is not a released layout')
    if problems:
      raise ValueError(
          f'invalid Gemma4Config {self.name!r}: ' + '; '.join(problems)
      )
    if self.num_kv_shared_layers:
      # Raises a ValueError naming the layer when a source is missing.
      _ = self.kv_source_layers

  @functools.cached_property
  def layer_kinds(self) -> tuple[AttentionKind, ...]:
    """The attention kind of every layer."""
    return layer_kinds(self.attention_pattern, self.num_layers)

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def num_unshared_layers(self) -> int:
    return self.num_layers - self.num_kv_shared_layers

  @functools.cached_property
  def kv_source_layers(self) -> tuple[int, ...]:
    """For each layer, the index of the layer whose keys and values it uses.

    Unshared layers use their own; each of the last `num_kv_shared_layers`
    layers uses the last unshared layer of its own kind.
    """
    kinds = self.layer_kinds
    last_of_kind = {}
    for i in range(self.num_unshared_layers):
      last_of_kind[kinds[i]] = i
    sources = []
    for i, kind in enumerate(kinds):
      if i < self.num_unshared_layers:
        sources.append(i)
      elif kind in last_of_kind:
        sources.append(last_of_kind[kind])
      else:
        raise ValueError(
            f'layer {i} is KV-shared and {kind.value}, but no unshared'
            f' {kind.value} layer precedes it; lower num_kv_shared_layers'
        )
    return tuple(sources)

  def is_kv_shared(self, layer: int) -> bool:
    return layer >= self.num_unshared_layers

  def layer_hidden_dim(self, layer: int) -> int:
    """Hidden width of the dense MLP of `layer`."""
    if self.kv_shared_hidden_dim is not None and self.is_kv_shared(layer):
      return self.kv_shared_hidden_dim
    return self.hidden_dim

  def layer_head_dim(self, layer: int) -> int:
    return self.global_head_dim if self.layer_kinds[layer] == GLOBAL else (
        self.head_dim
    )

  def layer_num_kv_heads(self, layer: int) -> int:
    if self.layer_kinds[layer] == GLOBAL:
      return self.num_global_kv_heads
    return self.num_kv_heads

  def layer_k_eq_v(self, layer: int) -> bool:
    return self.k_eq_v_global and self.layer_kinds[layer] == GLOBAL


def _e2b() -> Gemma4Config:
  return Gemma4Config(
      name='e2b',
      embed_dim=1536,
      num_layers=35,
      attention_pattern=(LOCAL,) * 4 + (GLOBAL,),
      num_heads=8,
      num_kv_heads=1,
      num_global_kv_heads=1,
      sliding_window=512,
      hidden_dim=6144,
      kv_shared_hidden_dim=12288,
      per_layer_input_dim=256,
      num_kv_shared_layers=20,
  )


def _e4b() -> Gemma4Config:
  return Gemma4Config(
      name='e4b',
      embed_dim=2560,
      num_layers=42,
      num_heads=8,
      num_kv_heads=2,
      num_global_kv_heads=2,
      sliding_window=512,
      hidden_dim=10240,
      per_layer_input_dim=256,
      num_kv_shared_layers=18,
  )


def _26b_a4b() -> Gemma4Config:
  return Gemma4Config(
      name='26b_a4b',
      embed_dim=2816,
      num_layers=30,
      num_heads=16,
      num_kv_heads=8,
      num_global_kv_heads=2,
      k_eq_v_global=True,
      sliding_window=1024,
      hidden_dim=2112,
      num_experts=128,
      expert_hidden_dim=704,
      experts_per_token=8,
      vision_bidirectional=True,
  )


def _31b() -> Gemma4Config:
  return Gemma4Config(
      name='31b',
      embed_dim=5376,
      num_layers=60,
      num_heads=32,
      num_kv_heads=16,
      num_global_kv_heads=4,
      k_eq_v_global=True,
      sliding_window=1024,
      hidden_dim=21504,
      vision_bidirectional=True,
  )


PRESETS: dict[str, Gemma4Config] = {
    'e2b': _e2b(),
    'e4b': _e4b(),
    '26b_a4b': _26b_a4b(),
    '31b': _31b(),
}

_ALIASES = {
    'gemma4_e2b': 'e2b',
    'gemma4_e4b': 'e4b',
    '26b': '26b_a4b',
    '26b-a4b': '26b_a4b',
    'gemma4_26b_a4b': '26b_a4b',
    'gemma4_31b': '31b',
}


def get_preset(name: str) -> Gemma4Config:
  """Return the preset called `name` (case-insensitive; `26b-a4b` works too)."""
  key = name.lower().replace('-', '_')
  key = _ALIASES.get(key, _ALIASES.get(name.lower(), key))
  if key not in PRESETS:
    raise ValueError(
        f'unknown Gemma 4 preset {name!r}; choose one of {sorted(PRESETS)}'
    )
  return PRESETS[key]


def with_vision(config: Gemma4Config, vision: VisionConfig | None = None):
  """Return `config` with a vision encoder (by default its preset's tower).

  Raises:
    ValueError: `vision` is None and `config.name` is not a preset name.
  """
  if vision is None:
    if config.name not in VISION_PRESETS:
      raise ValueError(
          f'config {config.name!r} has no released vision tower; pass'
          f' vision=VisionConfig(...) or one of the presets'
          f' {sorted(VISION_PRESETS)}'
      )
    vision = VISION_PRESETS[config.name]
  return dataclasses.replace(config, vision=vision)


# Presets whose release has an audio tower. Both use the default AudioConfig.
AUDIO_PRESETS = ('e2b', 'e4b')


def with_audio(config: Gemma4Config, audio: AudioConfig | None = None):
  """Return `config` with an audio encoder (by default the released one).

  Raises:
    ValueError: `audio` is None and `config.name` is not E2B or E4B.
  """
  if audio is None:
    if config.name not in AUDIO_PRESETS:
      raise ValueError(
          f'config {config.name!r} has no released audio tower (only'
          f' {list(AUDIO_PRESETS)} have one); pass audio=AudioConfig(...)'
      )
    audio = AudioConfig()
  return dataclasses.replace(config, audio=audio)
