"""Summaries of checkpoints: layout, variant, parameter counts and bytes.

Everything is computed from the Orbax metadata (shapes and dtypes), so a
summary of a 30 B-parameter checkpoint reads a few kilobytes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np

from gemma4_jax.checkpoint import files, layouts, variants
from gemma4_jax.checkpoint.errors import CheckpointError

# Parameter groups in display order, with their labels.
GROUP_LABELS = {
    'embedding': 'token embedding',
    'ple': 'per-layer embedding table',
    'ple_projection': 'per-layer projections',
    'attention': 'attention',
    'mlp': 'MLP (dense)',
    'experts': 'MoE experts',
    'router': 'MoE router',
    'norms': 'norms and scales',
    'vision': 'vision',
    'audio': 'audio',
    'other': 'other',
}
TEXT_GROUPS = tuple(g for g in GROUP_LABELS if g not in ('vision', 'audio'))

_LAYER_RE = re.compile(r'layer_\d+')
_PLE_PROJECTIONS = (
    'per_layer_model_projection',
    'per_layer_input_gate',
    'per_layer_projection',
)


def param_group(path: str) -> str:
  """Return the group of a NESTED parameter path (a key of GROUP_LABELS).

  Norm scales, `skip_scale` and the QK norms count as 'norms'. In an MoE
  layer, `mlp/{gating_einsum,linear}/w` and `per_expert_scale` are 'experts',
  `router_logits` and `router_scale` are 'router', and the dense branch
  `mlp2` is 'mlp'.
  """
  tower = layouts.multimodal_tower(path)
  if tower is not None:
    return tower

  parts = path.split('/')
  if parts[-1] == 'skip_scale' or any(p.endswith('_norm') for p in parts):
    return 'norms'
  if parts[0] == 'embedder':
    if parts[1] == 'input_embedding':
      return 'embedding'
    if parts[1] == 'per_layer_embeddings':
      return 'ple'
  if any(part in _PLE_PROJECTIONS for part in parts):
    return 'ple_projection'

  if not _LAYER_RE.fullmatch(parts[0]) or len(parts) < 3:
    return 'other'
  module, name = parts[1], parts[2]
  if module == 'attn':
    return 'attention'
  if module == 'mlp2':
    return 'mlp'
  if module == 'mlp':
    if name in ('router_logits', 'router_scale'):
      return 'router'
    if name == 'per_expert_scale' or len(parts) == 4:
      # MoE expert weights have a `w` level; dense MLP weights do not.
      return 'experts'
    return 'mlp'
  return 'other'


@dataclasses.dataclass
class GroupStats:
  """Parameter count, bytes at the stored dtype, and dtypes of one group."""

  params: int = 0
  bytes: int = 0
  dtypes: set[str] = dataclasses.field(default_factory=set)

  def add(self, shape: tuple[int, ...], dtype: Any) -> None:
    count = math.prod(shape)
    self.params += count
    self.bytes += count * np.dtype(dtype).itemsize
    self.dtypes.add(np.dtype(dtype).name)

  def to_json(self) -> dict[str, Any]:
    return {
        'params': self.params,
        'bytes': self.bytes,
        'dtypes': sorted(self.dtypes),
    }


@dataclasses.dataclass
class CheckpointSummary:
  """Report of `gemma4-jax inspect` about one checkpoint.

  Attributes:
    layout: 'nested', 'flat' or 'stacked'.
    pattern_len: Attention-pattern length of a STACKED checkpoint, else None.
    variant: A preset name, 'custom' (see `inferred`), or 'unknown' (see
      `variant_note`).
    inferred: Config fields read from the shapes of a custom checkpoint.
    variant_note: Why the variant is unknown, else ''.
    groups: Statistics per parameter group, in GROUP_LABELS order, omitting
      empty groups.
    total: Statistics over all parameters.
    text_total: Statistics over the text-decoder parameters.
    path, orbax_dir, tokenizer, disk_bytes: Where the checkpoint is and its
      size on disk; None for a summary of an in-memory tree.
  """

  layout: str
  pattern_len: int | None
  variant: str
  inferred: dict[str, Any]
  variant_note: str
  groups: dict[str, GroupStats]
  total: GroupStats
  text_total: GroupStats
  path: str | None = None
  orbax_dir: str | None = None
  tokenizer: str | None = None
  disk_bytes: int | None = None

  def to_json(self) -> dict[str, Any]:
    inferred = dict(self.inferred)
    if 'attention_pattern' in inferred:
      inferred['attention_pattern'] = [
          kind.value for kind in inferred['attention_pattern']
      ]
    return {
        'path': self.path,
        'orbax_dir': self.orbax_dir,
        'tokenizer': self.tokenizer,
        'layout': self.layout,
        'pattern_len': self.pattern_len,
        'variant': self.variant,
        'inferred': inferred,
        'variant_note': self.variant_note,
        'groups': {name: stats.to_json() for name, stats in self.groups.items()},
        'text_total': self.text_total.to_json(),
        'total': self.total.to_json(),
        'disk_bytes': self.disk_bytes,
    }


def _identify(
    shapes: variants.ShapeMap,
) -> tuple[str, dict[str, Any], str]:
  """(variant, inferred fields, note) for the text shapes of a checkpoint."""
  try:
    variants.check_is_gemma4(shapes)
    preset = variants.match_preset(shapes)
    if preset is not None:
      return preset.name, {}, ''
    return 'custom', variants.infer_config_fields(shapes), ''
  except CheckpointError as error:
    return 'unknown', {}, str(error).splitlines()[0]


def summarize_tree(tree: Mapping[str, Any]) -> CheckpointSummary:
  """Summarise a parameter tree in any layout whose leaves have shape and dtype.

  Works on `jax.ShapeDtypeStruct` trees, so no array needs to exist.
  """
  layout = layouts.detect_layout(tree)
  pattern_len = (
      layouts.attention_pattern_len(tree)
      if layout == layouts.Layout.STACKED
      else None
  )
  nested = layouts.to_nested(tree)

  groups = {name: GroupStats() for name in GROUP_LABELS}
  total, text_total = GroupStats(), GroupStats()
  for path, leaf in layouts.flatten_paths(nested).items():
    shape, dtype = tuple(leaf.shape), leaf.dtype
    group = param_group(path)
    groups[group].add(shape, dtype)
    total.add(shape, dtype)
    if group in TEXT_GROUPS:
      text_total.add(shape, dtype)

  text, _ = layouts.split_multimodal(nested)
  variant, inferred, note = _identify(variants.shape_map(text))
  return CheckpointSummary(
      layout=layout.value,
      pattern_len=pattern_len,
      variant=variant,
      inferred=inferred,
      variant_note=note,
      groups={name: stats for name, stats in groups.items() if stats.params},
      total=total,
      text_total=text_total,
  )



def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointSummary:
  """Summarise the checkpoint at `path` from its metadata alone."""
  checkpoint = files.resolve_checkpoint(path)
  summary = summarize_tree(files.read_abstract_tree(checkpoint.orbax_dir))
  summary.path = str(checkpoint.path)
  summary.orbax_dir = str(checkpoint.orbax_dir)
  summary.tokenizer = str(checkpoint.tokenizer) if checkpoint.tokenizer else None
  summary.disk_bytes = files.directory_size(checkpoint.orbax_dir)
  return summary


def _human_count(count: int) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if count >= scale:
      return f'{count / scale:.2f} {unit}'
  return str(count)


def _human_bytes(size: int) -> str:
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if size >= scale:
      return f'{size / scale:.2f} {unit}'
  return f'{size} B'


def format_summary(summary: CheckpointSummary) -> str:
  """Render a summary as the text table that `gemma4-jax inspect` prints."""
  lines = []
  if summary.path is not None:
    lines.append(f'checkpoint    {summary.path}')
    if summary.orbax_dir != summary.path:
      lines.append(f'orbax dir     {summary.orbax_dir}')
    lines.append(f'tokenizer     {summary.tokenizer or "none found"}')

  layout = summary.layout
  if summary.pattern_len is not None:
    layout += f' (attention pattern length {summary.pattern_len})'
  lines.append(f'layout        {layout}')

  lines.append(f'variant       {summary.variant}')
  if summary.inferred:
    fields = ', '.join(
        f'{name}={value}'
        for name, value in summary.to_json()['inferred'].items()
    )
    lines.append('              no preset matches; read from the shapes:')
    lines.extend(
        textwrap.wrap(
            fields, width=78, initial_indent=' ' * 16, subsequent_indent=' ' * 16
        )
    )
  if summary.variant_note:
    lines.extend(
        textwrap.wrap(
            summary.variant_note,
            width=78,
            initial_indent=' ' * 14,
            subsequent_indent=' ' * 14,
        )
    )
  lines.append('')

  header = f'{"group":<27} {"parameters":>15} {"":>9} {"bytes":>10}  dtypes'
  lines.append(header)
  rows = [(GROUP_LABELS[name], stats) for name, stats in summary.groups.items()]
  rows.append(('text total', summary.text_total))
  rows.append(('total', summary.total))
  for label, stats in rows:
    if label == 'text total':
      lines.append('-' * len(header))
    lines.append(
        f'{label:<27} {stats.params:>15,} {_human_count(stats.params):>9}'
        f' {_human_bytes(stats.bytes):>10}  {", ".join(sorted(stats.dtypes))}'
    )

  if summary.disk_bytes is not None:
    lines.append('')
    lines.append(f'on disk       {_human_bytes(summary.disk_bytes)}')
  return '\n'.join(lines)
