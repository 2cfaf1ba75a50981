"""LoRA: low-rank adapters for the Gemma 4 decoder's projection weights.

    lora_config = LoraConfig(rank=16, alpha=32.0)
    adapters = init_adapters(params, lora_config, jax.random.key(0),
                             model_config=model_config)
    logging.info('%s', describe_trainable(adapters))
    full = apply_adapters(params, adapters, lora_config, jnp.bfloat16)
    released = merge(params, adapters, lora_config)  # savable with save_params

A weight W is adapted as `W + (alpha / rank) * A B`, with A and B applied on
the weight's (input, output) matrix. The adapters are a separate float32
pytree that mirrors the paths of the weights they adapt. The pair adapting
`params['layer_0']['attn']['q_einsum']['w']` is
`adapters['layer_0']['attn']['q_einsum']['w']` = `{'lora_a': A, 'lora_b': B}`.
The base parameter tree stays the released one.

A keeps the weight's input axes and B its output axes, with the rank R
between them:

    target          weight                             lora_a     lora_b
    q               attn/q_einsum/w [N, D, H]          [D, R]     [R, N, H]
    kv              attn/kv_einsum/w [C, K, D, H]      [D, R]     [R, C, K, H]
    kv              attn/k_einsum/w [K, D, H]          [D, R]     [R, K, H]
    o               attn/attn_vec_einsum/w [N, H, D]   [N, H, R]  [R, D]
    gating          mlp/gating_einsum [C, F, D]        [D, R]     [R, C, F]
    linear          mlp/linear [F, D]                  [F, R]     [R, D]
    experts_gating  mlp/gating_einsum/w [E, C, F, D]   [E, D, R]  [E, R, C, F]
    experts_linear  mlp/linear/w [E, F, D]             [E, F, R]  [E, R, D]
    router          mlp/router_logits/w [D, E]         [D, R]     [R, E]

The MoE models' dense branch `mlp2` has the dense MLP's weights and targets.

C = 2 stacks keys and values (`kv_einsum`) or the gate and up projections
(`gating_einsum`), and one adapter of rank R covers both halves. Each expert has
its own adapter, stacked on the expert axis E.

Global layers with `k_eq_v_global` have one projection `k_einsum` whose
output is both the keys and the values. Target 'kv' adapts it, so keys and
values stay tied as in the base model. KV-shared layers (the last
`num_kv_shared_layers` of E2B and E4B) never use their own key/value
projection, so 'kv' skips them when `init_adapters` gets the model config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from gemma4_jax.checkpoint import inspect as inspect_lib
from gemma4_jax.config import Gemma4Config

logger = logging.getLogger(__name__)

LORA_A = 'lora_a'
LORA_B = 'lora_b'

# Targets in display order, with what each adapts.
TARGET_LABELS = {
    'q': 'query projection (q_einsum)',
    'kv': 'key/value projection (kv_einsum, or k_einsum of k_eq_v layers)',
    'o': 'output projection (attn_vec_einsum)',
    'gating': 'dense MLP gate and up projection (gating_einsum, also mlp2)',
    'linear': 'dense MLP down projection (linear, also mlp2)',
    'experts_gating': 'MoE expert gate and up projections (mlp/gating_einsum/w)',
    'experts_linear': 'MoE expert down projections (mlp/linear/w)',
    'router': 'MoE router (mlp/router_logits/w)',
}
ATTENTION_TARGETS = ('q', 'kv', 'o')
DENSE_MLP_TARGETS = ('gating', 'linear')
EXPERT_TARGETS = ('experts_gating', 'experts_linear')
DEFAULT_TARGETS = ATTENTION_TARGETS + DENSE_MLP_TARGETS

CONFIG_FILE = 'lora_config.json'
ARRAYS_DIR = 'adapters'

_LAYER_RE = re.compile(r'layer_\d+')
_RANK_AXIS = 'R'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The adapted weight groups (targets) and the adapters' rank and scale.

  Attributes:
    rank: Inner dimension R of each pair A [in, R], B [R, out].
    alpha: Scale numerator: the adapted weight is `W + (alpha / rank) A B`.
    targets: Names from `TARGET_LABELS`. The default adapts attention and
      the dense MLPs. Add `EXPERT_TARGETS` for the MoE experts. Add 'router'
      only on purpose, because an adapted router changes which experts run.
  """

  rank: int
  alpha: float
  targets: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral):
      raise ValueError(f'rank must be an integer, got rank={self.rank!r}')
    object.__setattr__(self, 'rank', int(self.rank))
    if self.rank <= 0:
      raise ValueError(f'rank must be positive, got rank={self.rank}')
    if not self.alpha > 0:
      raise ValueError(f'alpha must be positive, got alpha={self.alpha}')
    if isinstance(self.targets, str):
      raise ValueError(
          f'targets must be a tuple of names, got the string {self.targets!r};'
          f' write targets=({self.targets!r},)'
      )
    targets = tuple(self.targets)
    if not targets:
      raise ValueError(
          f'targets is empty; name at least one of {", ".join(TARGET_LABELS)}'
      )
    for target in targets:
      if target not in TARGET_LABELS:
        raise ValueError(
            f'unknown LoRA target {target!r}; valid targets are'
            f' {", ".join(TARGET_LABELS)}'
        )
    duplicates = sorted({t for t in targets if targets.count(t) > 1})
    if duplicates:
      raise ValueError(f'targets lists {", ".join(duplicates)} more than once')
    object.__setattr__(self, 'targets', targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_json(self) -> dict[str, Any]:
    return {'rank': self.rank, 'alpha': self.alpha, 'targets': list(self.targets)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> LoraConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    missing = sorted(fields - set(data) - {'targets'})
    if unknown or missing:
      raise ValueError(
          f'invalid LoRA config {dict(data)!r}: unknown keys {unknown},'
          f' missing keys {missing}; expected {sorted(fields)}'
      )
    values = dict(data)
    if 'targets' in values:
      values['targets'] = tuple(values['targets'])
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class _WeightSpec:
  """The split of a weight's axes into (batch, input, output) for its adapter.

  Fields are strings of axis letters. `layout` names the weight's axes, and
  `inputs` and `outputs` are the axes of its (input, output) matrix. Each
  index of the `batch` axes gets its own adapter.
  """

  target: str
  layout: str
  inputs: str
  outputs: str
  batch: str = ''

  def adapter_shapes(
      self, weight_shape: tuple[int, ...], rank: int
  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    size = dict(zip(self.layout, weight_shape))
    batch = tuple(size[a] for a in self.batch)
    a_shape = (*batch, *(size[a] for a in self.inputs), rank)
    b_shape = (*batch, rank, *(size[a] for a in self.outputs))
    return a_shape, b_shape

  def input_size(self, weight_shape: tuple[int, ...]) -> int:
    size = dict(zip(self.layout, weight_shape))
    return math.prod(size[a] for a in self.inputs)

  def delta_equation(self) -> str:
    """E.g. 'DR,RNH->NDH': A and B to a delta in the weight's layout."""
    r = _RANK_AXIS
    a = f'{self.batch}{self.inputs}{r}'
    b = f'{self.batch}{r}{self.outputs}'
    return f'{a},{b}->{self.layout}'


# Layouts of the released weights, as the decoder's einsums use them
# (attention.py, layers.py, moe.py).
_ATTENTION_SPECS = {
    'q_einsum': _WeightSpec('q', 'NDH', inputs='D', outputs='NH'),
    'kv_einsum': _WeightSpec('kv', 'CKDH', inputs='D', outputs='CKH'),
    'k_einsum': _WeightSpec('kv', 'KDH', inputs='D', outputs='KH'),
    'attn_vec_einsum': _WeightSpec('o', 'NHD', inputs='NH', outputs='D'),
}
_DENSE_MLP_SPECS = {
    'gating_einsum': _WeightSpec('gating', 'CFD', inputs='D', outputs='CF'),
    'linear': _WeightSpec('linear', 'FD', inputs='F', outputs='D'),
}
_MOE_SPECS = {
    'gating_einsum': _WeightSpec(
        'experts_gating', 'ECFD', inputs='D', outputs='CF', batch='E'
    ),
    'linear': _WeightSpec(
        'experts_linear', 'EFD', inputs='F', outputs='D', batch='E'
    ),
    'router_logits': _WeightSpec('router', 'DE', inputs='D', outputs='E'),
}


def _weight_spec(path: tuple[str, ...]) -> _WeightSpec | None:
  """Return the spec of a NESTED parameter path, or None if LoRA never adapts it."""
  if len(path) < 3 or not _LAYER_RE.fullmatch(path[0]):
    return None
  module, name, rest = path[1], path[2], path[3:]
  if module == 'attn' and rest == ('w',):
    return _ATTENTION_SPECS.get(name)
  if module in ('mlp', 'mlp2') and not rest:
    return _DENSE_MLP_SPECS.get(name)
  # MoE weights have a `w` level; the dense MLP's do not.
  if module == 'mlp' and rest == ('w',):
    return _MOE_SPECS.get(name)
  return None


def _path_str(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def _flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(dict(tree))


def _adapted_weights(
    params: Mapping[str, Any],
    config: LoraConfig,
    model_config: Gemma4Config | None,
) -> dict[tuple[str, ...], _WeightSpec]:
  """Find the weights of `params` that `config` adapts, with their specs."""
  num_layers = sum(1 for key in params if _LAYER_RE.fullmatch(key))
  if model_config is not None and num_layers != model_config.num_layers:
    raise ValueError(
        f'params have {num_layers} decoder layers, but model config'
        f' {model_config.name!r} has {model_config.num_layers}; pass the'
        ' config of the model these parameters belong to'
    )

  adapted = {}
  matched_targets = set()
  is_moe = False
  for path, value in _flatten(params).items():
    spec = _weight_spec(path)
    is_moe |= spec is not None and spec.target == 'router'
    if spec is None or spec.target not in config.targets:
      continue
    layer = int(path[0].split('_')[1])
    if (
        spec.target == 'kv'
        and model_config is not None
        and model_config.is_kv_shared(layer)
    ):
      continue
    if len(value.shape) != len(spec.layout):
      raise ValueError(
          f'parameter {_path_str(path)} has shape {tuple(value.shape)}, but'
          f' LoRA target {spec.target!r} expects {len(spec.layout)} axes'
          f' ({spec.layout}); pass the NESTED parameter tree of a Gemma 4'
          ' decoder'
      )
    adapted[path] = spec
    matched_targets.add(spec.target)

  unmatched = [t for t in config.targets if t not in matched_targets]
  if unmatched:
    model = 'these parameters'
    if model_config is not None:
      model = f'model {model_config.name!r}'
    kind = 'an MoE' if is_moe else 'a dense'
    raise ValueError(
        f'LoRA targets {", ".join(map(repr, unmatched))} match no weight of'
        f' {model} ({kind} model); remove them from LoraConfig.targets'
    )
  return adapted


def init_adapters(
    params: Mapping[str, Any],
    config: LoraConfig,
    rng: jax.Array,
    *,
    model_config: Gemma4Config | None = None,
) -> dict[str, Any]:
  """Create float32 adapters for the weights of `params` that `config` targets.

  A is normal with standard deviation `1 / sqrt(fan_in)` (fan_in: the size of
  the weight's input axes) and B is zero, so fresh adapters leave the model
  unchanged.

  Args:
    params: The NESTED parameters, as arrays or `jax.ShapeDtypeStruct`s.
    config: Targets, rank and scale.
    rng: PRNG key.
    model_config: The model's config. When given, its KV-shared layers get
      no 'kv' adapter, because they never use their own key/value
      projection. Without it those adapters exist but never train (their
      gradients are zero), and they count as trainable parameters.

  Returns:
    The adapter tree (see the module docstring).

  Raises:
    ValueError: A target matches no weight of the model, or `params` do not
      have the layers of `model_config`.
  """
  adapted = _adapted_weights(params, config, model_config)
  flat_params = _flatten(params)
  weight_shapes = {path: tuple(flat_params[path].shape) for path in adapted}

  # One compiled program draws every A, rather than one dispatch per weight.
  @jax.jit
  def draw(rng):
    keys = jax.random.split(rng, len(adapted))
    flat = {}
    for key, (path, spec) in zip(keys, sorted(adapted.items())):
      a_shape, b_shape = spec.adapter_shapes(weight_shapes[path], config.rank)
      stddev = spec.input_size(weight_shapes[path]) ** -0.5
      flat[(*path, LORA_A)] = stddev * jax.random.normal(
          key, a_shape, jnp.float32
      )
      flat[(*path, LORA_B)] = jnp.zeros(b_shape, jnp.float32)
    return flax.traverse_util.unflatten_dict(flat)

  adapters = draw(rng)
  logger.info('created LoRA adapters (rank %d):\n%s', config.rank,
              describe_trainable(adapters))
  return adapters


def _adapter_pairs(
    adapters: Mapping[str, Any],
) -> dict[tuple[str, ...], tuple[Any, Any]]:
  """Group the adapter leaves into the (A, B) pair of each weight path."""
  flat = _flatten(adapters)
  pairs = {}
  for path in flat:
    if path[-1] not in (LORA_A, LORA_B):
      raise ValueError(
          f'adapter leaf {_path_str(path)} is neither {LORA_A!r} nor'
          f' {LORA_B!r}; pass the tree that init_adapters or load_adapters'
          ' returned'
      )
    weight = path[:-1]
    if weight not in pairs:
      a, b = flat.get((*weight, LORA_A)), flat.get((*weight, LORA_B))
      if a is None or b is None:
        missing = LORA_A if a is None else LORA_B
        raise ValueError(
            f'adapter of {_path_str(weight)} lacks {missing!r}; pass the tree'
            ' that init_adapters or load_adapters returned'
        )
      pairs[weight] = (a, b)
  return pairs


def _checked_spec(
    path: tuple[str, ...],
    weight: Any,
    a: Any,
    b: Any,
    config: LoraConfig,
) -> _WeightSpec:
  spec = _weight_spec(path)
  if spec is None:
    raise ValueError(
        f'adapters contain {_path_str(path)}, which is not a weight LoRA can'
        ' adapt; pass adapters made by init_adapters'
    )
  if spec.target not in config.targets:
    raise ValueError(
        f'adapters contain {_path_str(path)} (target {spec.target!r}), but'
        f' LoraConfig.targets is {config.targets}; pass the LoraConfig the'
        ' adapters were made with'
    )
  expected = spec.adapter_shapes(tuple(weight.shape), config.rank)
  if (tuple(a.shape), tuple(b.shape)) != expected:
    raise ValueError(
        f'adapter of {_path_str(path)} has {LORA_A} {tuple(a.shape)} and'
        f' {LORA_B} {tuple(b.shape)}, but a weight of shape'
        f' {tuple(weight.shape)} at rank {config.rank} needs {expected[0]}'
        f' and {expected[1]}; the adapters belong to another model or rank'
    )
  return spec


def _delta(spec: _WeightSpec, a: jax.Array, b: jax.Array, scale: float):
  """`scale * A B` in the weight's layout, float32."""
  delta = jnp.einsum(
      spec.delta_equation(),
      a.astype(jnp.float32),
      b.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,
  )
  return delta * scale


def _add_deltas(
    base_params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    config: LoraConfig,
    dtype_of: Any,
) -> dict[str, Any]:
  flat = _flatten(base_params)
  for path, (a, b) in _adapter_pairs(adapters).items():
    if path not in flat:
      raise ValueError(
          f'adapters contain {_path_str(path)}, which the base parameters'
          ' lack; the adapters belong to another model'
      )
    weight = flat[path]
    spec = _checked_spec(path, weight, a, b, config)
    # Add in float32, then round once to the output dtype.
    summed = weight.astype(jnp.float32) + _delta(spec, a, b, config.scale)
    flat[path] = summed.astype(dtype_of(weight))
  return flax.traverse_util.unflatten_dict(flat)


def apply_adapters(
    base_params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    config: LoraConfig,
    dtype: Any,
) -> dict[str, Any]:
  """Return the parameters the model runs with: `W + scale * A B` per adapter.

  Called inside the loss, so gradients reach the adapters. Adapted weights
  are summed in float32 and cast to `dtype`. The other floating leaves are
  cast to `dtype`, which is a no-op when the base is already in `dtype`.

  Raises:
    ValueError: An adapter does not fit the base parameters or `config`.
  """

  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  merged = _add_deltas(base_params, adapters, config, lambda w: dtype)
  return jax.tree.map(cast, merged)


def merge(
    base_params: Mapping[str, Any],
    adapters: Mapping[str, Any],
    config: LoraConfig,
) -> dict[str, Any]:
  """Fold the adapters into the base: a released-layout tree in the base dtype.

  The result has the keys, shapes and dtypes of `base_params`, so
  `gemma4_jax.checkpoint.save_params` writes it as a normal checkpoint.
  """
  return _add_deltas(base_params, adapters, config, lambda w: w.dtype)


# ------------------------------------------------------- trainable counts


def _group_of(path: tuple[str, ...]) -> str:
  if path[-1] in (LORA_A, LORA_B):
    spec = _weight_spec(path[:-1])
    return spec.target if spec is not None else 'other'
  return inspect_lib.param_group(_path_str(path))


def trainable_counts(tree: Mapping[str, Any]) -> dict[str, dict[str, int]]:
  """Count the parameters and bytes of each group of a trainable tree.

  For adapters the groups are the LoRA targets. For full parameters they are
  the groups of `gemma4_jax.checkpoint.param_group` ('attention', 'mlp',
  'experts', ...). Leaves may be arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    `{group: {'params': n, 'bytes': n}}` in display order, with a final
    'total' entry.
  """
  flat = _flatten(tree)
  stats: dict[str, inspect_lib.GroupStats] = {}
  for path, leaf in flat.items():
    stats.setdefault(_group_of(path), inspect_lib.GroupStats()).add(
        tuple(leaf.shape), leaf.dtype
    )

  is_adapters = any(path[-1] in (LORA_A, LORA_B) for path in flat)
  order = [*(TARGET_LABELS if is_adapters else inspect_lib.GROUP_LABELS)]
  order.append('other')
  counts = {
      group: {'params': stats[group].params, 'bytes': stats[group].bytes}
      for group in sorted(stats, key=order.index)
  }
  counts['total'] = {
      'params': sum(c['params'] for c in counts.values()),
      'bytes': sum(c['bytes'] for c in counts.values()),
  }
  return counts


def describe_trainable(tree: Mapping[str, Any]) -> str:
  """Format `trainable_counts(tree)` as a table for logs, one group a line."""
  counts = trainable_counts(tree)
  total = counts.pop('total')
  lines = [
      f'trainable parameters: {total["params"]:,}'
      f' ({total["bytes"] / 2**20:.2f} MiB)'
  ]
  for group, count in counts.items():
    lines.append(
        f'  {group:<16} {count["params"]:>15,}'
        f'  {count["bytes"] / 2**20:10.2f} MiB'
    )
  return '\n'.join(lines)


# ------------------------------------------------------- saving and loading


def _check_fits_config(
    adapters: Mapping[str, Any], config: LoraConfig, fix: str
) -> None:
  """Raise unless every adapter has a target and the rank of `config`."""
  for weight_path, (a, b) in _adapter_pairs(adapters).items():
    spec = _weight_spec(weight_path)
    fits = (
        spec is not None
        and spec.target in config.targets
        and a.shape[-1] == config.rank
        and b.shape[len(spec.batch)] == config.rank
    )
    if not fits:
      raise ValueError(
          f'adapter of {_path_str(weight_path)} ({LORA_A} {tuple(a.shape)},'
          f' {LORA_B} {tuple(b.shape)}) does not fit {config}; {fix}'
      )


def save_adapters(
    adapters: Mapping[str, Any],
    config: LoraConfig,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
  """Write the adapters and their config to directory `path`.

  The directory contains `lora_config.json` and the Orbax checkpoint
  `adapters/`, and it appears only once both are written.

  Returns:
    The absolute directory path.

  Raises:
    FileExistsError: `path` exists and `overwrite` is False.
  """
  _check_fits_config(
      adapters, config, 'pass the LoraConfig the adapters were made with'
  )

  path = Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(
        f'adapter directory {path} already exists; pass overwrite=True to'
        ' replace it, or choose another path'
    )
  path.parent.mkdir(parents=True, exist_ok=True)

  # Written beside `path` and renamed into place, so `path` never contains
  # a partial save.
  staged = path.with_name(f'{path.name}.new-{uuid.uuid4().hex[:8]}')
  staged.mkdir()
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(staged / ARRAYS_DIR, dict(adapters))
    checkpointer.wait_until_finished()
    (staged / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))
  except BaseException:
    shutil.rmtree(staged, ignore_errors=True)
    raise
  finally:
    checkpointer.close()

  if path.exists():
    retired = path.with_name(f'{path.name}.old-{uuid.uuid4().hex[:8]}')
    os.rename(path, retired)
    os.rename(staged, path)
    shutil.rmtree(retired)
  else:
    os.rename(staged, path)

  counts = trainable_counts(adapters)['total']
  logger.info(
      'saved LoRA adapters (%s parameters, %.1f MB) to %s',
      f'{counts["params"]:,}', counts['bytes'] / 1e6, path,
  )
  return path


def _config_differences(stored: LoraConfig, expected: LoraConfig) -> list[str]:
  return [
      f'{field.name}={getattr(stored, field.name)!r} (expected'
      f' {getattr(expected, field.name)!r})'
      for field in dataclasses.fields(LoraConfig)
      if getattr(stored, field.name) != getattr(expected, field.name)
  ]


def load_adapters(
    path: str | os.PathLike[str],
    *,
    config: LoraConfig | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
  """Read adapters that `save_adapters` wrote.

  Args:
    path: The adapter directory.
    config: When given, the stored config must equal it.

  Returns:
    The float32 adapter tree and the stored `LoraConfig`.

  Raises:
    FileNotFoundError: `path`, its config file or its arrays are missing.
    ValueError: The stored config is invalid or differs from `config`, or
      the arrays do not fit the stored config.
  """
  path = Path(path).expanduser().absolute()
  if not path.is_dir():
    raise FileNotFoundError(
        f'LoRA adapter directory {path} does not exist; pass the directory'
        ' that save_adapters wrote'
    )
  config_path = path / CONFIG_FILE
  arrays_path = path / ARRAYS_DIR
  for required in (config_path, arrays_path):
    if not required.exists():
      raise FileNotFoundError(
          f'{path} is not a LoRA adapter directory: {required.name} is'
          ' missing; pass the directory that save_adapters wrote'
      )

  try:
    stored = LoraConfig.from_json(json.loads(config_path.read_text()))
  except (json.JSONDecodeError, TypeError) as error:
    raise ValueError(f'cannot read LoRA config {config_path}: {error}') from error
  if config is not None and stored != config:
    raise ValueError(
        f'adapters in {path} were saved with a different LoRA config:'
        f' {", ".join(_config_differences(stored, config))}; pass'
        ' config=None to use the stored one'
    )

  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(arrays_path)
  finally:
    checkpointer.close()
  adapters = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), restored)

  _check_fits_config(
      adapters, stored, f'{arrays_path} does not match its config file; save'
      ' the adapters again'
  )
  return adapters, stored
