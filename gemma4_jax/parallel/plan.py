"""Per-device memory of a sharded train step and of an inference KV cache.

    plan = plan_memory('31b', 'tensor=8,fsdp=4', batch=8, length=8192,
                       lora_rank=16, remat='full', chip='v5p')
    print(format_plan(plan))

The planner builds nothing on a device. Parameter and cache shapes come from
`jax.eval_shape` of the real initialisers, and each leaf's per-device shard
comes from `placement.tree_shardings` / `placement.cache_shardings`, the
functions the sharded train step places its inputs with. Those two parts are
exact. Weight copies, gradients and activations are an estimate from the
shapes of what the code keeps (see `_activation_bytes`). It is calibrated on
XLA's memory analysis of the compiled step on the CPU backend, and XLA on TPU
or GPU fuses and reuses buffers differently.

What the train step keeps, per device (`training/step.py`):
- full fine-tuning: float32 master parameters and float32 AdamW moments
  (donated, so the updated state reuses their buffers), a copy of the
  parameters in the compute dtype, and the gradients;
- LoRA: the frozen base parameters in the compute dtype, float32 adapters
  and moments, and the merged weights `W + scale * A B` of every adapted
  weight, with their full-size gradients;
- activations: what the backward pass keeps per layer under the remat
  policy, including the float32 attention probabilities [B, N, L, L] of
  every layer, because training attention is not blocked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from gemma4_jax import config as config_lib
from gemma4_jax.config import Gemma4Config
from gemma4_jax.parallel import mesh as mesh_lib
from gemma4_jax.parallel import placement
from gemma4_jax.parallel import rules as rules_lib

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator and the memory of one chip (one device in JAX).

  Attributes:
    name: Display name.
    memory_bytes: High-bandwidth memory of one chip.
    source: Where the figure comes from.
  """

  name: str
  memory_bytes: int
  source: str


# Memory per chip as the vendors list it (Cloud TPU system architecture
# pages for v5e, v5p and v6e; NVIDIA's H100 SXM and H200 SXM data sheets),
# counted here as GiB.
# NOTE: Usable memory is lower: the runtime reserves some, and JAX on GPU
# preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION is set.
CHIPS: dict[str, Chip] = {
    'v5e': Chip('TPU v5e', 16 * GIB, 'Cloud TPU docs: 16 GB HBM2 per chip'),
    'v5p': Chip('TPU v5p', 95 * GIB, 'Cloud TPU docs: 95 GB HBM2e per chip'),
    'v6e': Chip('TPU v6e', 32 * GIB, 'Cloud TPU docs: 32 GB HBM per chip'),
    'h100': Chip('NVIDIA H100 SXM', 80 * GIB, 'NVIDIA: 80 GB HBM3'),
    'h200': Chip('NVIDIA H200 SXM', 141 * GIB, 'NVIDIA: 141 GB HBM3e'),
}

REMAT_CHOICES = ('none', 'dots', 'full')
DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one train step, and of inference at the same shape.

  `argument_bytes`, `output_bytes` and `temp_bytes` split the train step the
  way XLA's `compiled.memory_analysis()` does. The outputs (the new train
  state) reuse the buffers of the donated state, so the step's peak is
  arguments plus temporaries.

  Attributes:
    model: Config name.
    mesh: Size of every mesh axis.
    batch: Global rows of one step.
    length: Tokens per row.
    lora_rank: LoRA rank, or None for full fine-tuning.
    remat: Remat policy of the decoder blocks.
    dtype: Compute dtype.
    num_microbatches: Micro-batches per step.
    rows_per_device: Rows of one micro-batch on each device.
    chip: The chip the plan is checked against, or None.
    parameters: Float32 master parameters (full fine-tuning), or frozen base
      parameters in `dtype` plus float32 adapters (LoRA).
    optimizer: AdamW moments and counts.
    batch_bytes: The batch arrays of the step.
    state_bytes: The donated train state (trainable parameters, moments,
      step, key), which the step also returns.
    weight_copies: Weights the step builds and keeps through both passes:
      the compute-dtype copy of the master parameters (full fine-tuning) or
      the merged LoRA weights, and the gradient sum of micro-batches.
    gradients: Gradients at the end of the backward pass.
    activations: Activations at the start of the backward pass: what every
      layer keeps, plus the working set of the loss or of one recomputed
      layer.
    attention_scores: The part of `activations` that is attention scores
      and probabilities.
    inference_parameters: Parameters in `dtype`, as sampling keeps them.
    kv_cache: The KV cache of `batch` rows of `length` tokens.
    model_is_moe: The model has mixture-of-experts blocks.
  """

  model: str
  mesh: dict[str, int]
  batch: int
  length: int
  lora_rank: int | None
  remat: str
  dtype: str
  num_microbatches: int
  rows_per_device: int
  chip: Chip | None
  parameters: int
  optimizer: int
  batch_bytes: int
  state_bytes: int
  weight_copies: int
  gradients: int
  activations: int
  attention_scores: int
  inference_parameters: int
  kv_cache: int
  model_is_moe: bool = False

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def argument_bytes(self) -> int:
    return self.parameters + self.optimizer + self.batch_bytes

  @property
  def output_bytes(self) -> int:
    return self.state_bytes

  @property
  def temp_bytes(self) -> int:
    """Weight copies, plus activations or gradients, whichever is larger.

    Activations are freed layer by layer as the backward pass forms the
    gradients, so the two peaks do not add up.
    """
    return self.weight_copies + max(self.gradients, self.activations)

  @property
  def train_peak_bytes(self) -> int:
    return self.argument_bytes + self.temp_bytes

  @property
  def inference_peak_bytes(self) -> int:
    return self.inference_parameters + self.kv_cache


def resolve_config(model: str | Gemma4Config) -> Gemma4Config:
  """Return the config of a preset name, or `model` itself, without vision."""
  if isinstance(model, Gemma4Config):
    config = model
  else:
    config = config_lib.get_preset(model)
  # Training and the KV cache here are text-only.
  return dataclasses.replace(config, vision=None)


def abstract_mesh(shape: str | Mapping[str, int]) -> AbstractMesh:
  """Build a device-free mesh with the axes MESH_AXES, of any device count."""
  if isinstance(shape, str):
    shape = mesh_lib.parse_mesh(shape)
  sizes = mesh_lib.full_shape(shape)
  return AbstractMesh(
      tuple(sizes[axis] for axis in mesh_lib.MESH_AXES), mesh_lib.MESH_AXES
  )


def get_chip(name: str) -> Chip:
  chip = CHIPS.get(name.lower())
  if chip is None:
    raise ValueError(
        f'unknown chip {name!r}; choose one of {", ".join(CHIPS)}'
    )
  return chip


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  """Sum the bytes of `tree` (shape structs) on one device under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      # A PRNG key is stored as its key data (uint32[2] for threefry).
      data = jax.eval_shape(jax.random.key_data, leaf)
      itemsize = data.size // max(leaf.size, 1) * data.dtype.itemsize
    else:
      itemsize = jnp.dtype(leaf.dtype).itemsize
    total += math.prod(shard) * itemsize
  return total


def _split(size: int, axis: str, mesh: AbstractMesh, rules) -> int:
  """Return how many ways the rules split a dimension of `size` named `axis`."""
  (entry,) = rules_lib.spec_for((size,), (axis,), mesh, rules)
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[name] for name in names)


@dataclasses.dataclass(frozen=True)
class _Widths:
  """Per-device element counts of one layer's activations (one micro-batch).

  Shapes, with b rows on this device:
    x: residual stream [b, L, D].
    q: queries [b, L, N, H].
    kv: keys, or values, [b, L, K, H].
    scores: attention scores [b, N, L, L].
    hidden: one half of the gated MLP's hidden state [b, L, F].
    ple: the per-layer input [b, L, P].
    routed: the tokens' copies sent to experts [b * L * k, D].
    expert_hidden: their expert hidden state [b * L * k, F_e].
    router: router logits [b * L, E].
  Heads, hidden units and experts count only this device's share.
  """

  x: int
  q: int
  kv: int
  scores: int
  hidden: int
  ple: int
  routed: int
  expert_hidden: int
  router: int
  k_eq_v: bool
  kv_shared: bool


def _layer_widths(cfg: Gemma4Config, layer: int, rows: int, length: int,
                  mesh: AbstractMesh, rules) -> _Widths:
  heads = cfg.num_heads // _split(cfg.num_heads, 'heads', mesh, rules)
  num_kv = cfg.layer_num_kv_heads(layer)
  kv_heads = num_kv // _split(num_kv, 'kv_heads', mesh, rules)
  head_dim = cfg.layer_head_dim(layer)
  tokens = rows * length
  hidden_dim = cfg.layer_hidden_dim(layer)
  hidden = hidden_dim // _split(hidden_dim, 'mlp', mesh, rules)
  routed = expert_hidden = router = 0
  if cfg.is_moe:
    # Each token is copied to its k experts, and the expert axis splits them.
    shares = _split(cfg.num_experts, 'experts', mesh, rules)
    routed_rows = tokens * cfg.experts_per_token // shares
    expert_dim = cfg.expert_hidden_dim // _split(
        cfg.expert_hidden_dim, 'expert_mlp', mesh, rules
    )
    routed = routed_rows * cfg.embed_dim
    expert_hidden = routed_rows * expert_dim
    router = tokens * cfg.num_experts
  return _Widths(
      x=tokens * cfg.embed_dim,
      q=tokens * heads * head_dim,
      kv=tokens * kv_heads * head_dim,
      scores=rows * heads * length * length,
      hidden=tokens * hidden,
      ple=tokens * cfg.per_layer_input_dim,
      routed=routed,
      expert_hidden=expert_hidden,
      router=router,
      k_eq_v=cfg.layer_k_eq_v(layer),
      kv_shared=cfg.is_kv_shared(layer),
  )


# NOTE: XLA on the CPU kept about 1.6 times the compute-dtype activations
# that `_saved_bytes` and the loss count. This was measured per token on
# small configs without experts, with and without tensor parallelism, and
# the attention probabilities matched the count without a factor. TPU and
# GPU backends may keep less.
XLA_ACTIVATION_FACTOR = 1.6


def _saved_bytes(w: _Widths, remat: str, c: int,
                 trains_norms: bool = True) -> tuple[int, int]:
  """Bytes one layer keeps for the backward pass, and of those the scores.

  `c` is the itemsize of the compute dtype. The softmax keeps its float32
  output and the compute-dtype copy that multiplies the values. Gradients of
  the four residual-stream norm scales need their normalised inputs, which a
  LoRA step (`trains_norms=False`) does not keep.
  """
  if remat == 'full':
    # `nothing_saveable`: only the block's inputs (the residual stream).
    return c * w.x, 0
  # Keys and values a layer projects itself: none in KV-shared layers, one
  # tensor when keys equal values.
  own_kv = 2
  if w.kv_shared:
    own_kv = 0
  elif w.k_eq_v:
    own_kv = 1
  moe = 0
  if remat == 'dots':
    # Outputs of weight matmuls (dots without batch dimensions): q, k, v,
    # the attention output projection, both MLP matmuls, the PLE gate and
    # projection. The attention einsums have batch dimensions and are
    # recomputed.
    if w.routed:
      moe = c * (2 * w.expert_hidden + w.routed) + 4 * w.router
    saved = c * (3 * w.x + w.q + own_kv * w.kv + 2 * w.hidden + 2 * w.ple)
    return saved + moe, 0
  if w.routed:
    moe = c * (3 * w.expert_hidden + 2 * w.routed + 2 * w.x) + 4 * w.router
  scores = (4 + c) * w.scores
  residuals = 6 if trains_norms else 2
  saved = c * (
      residuals * w.x + 3 * w.q + 2 * own_kv * w.kv + 3 * w.hidden
      + 3 * w.ple
  )
  return saved + moe + scores, scores


def _scaled(total: int, scores: int) -> int:
  """Apply XLA_ACTIVATION_FACTOR to the part of `total` that is not scores."""
  return scores + int(XLA_ACTIVATION_FACTOR * (total - scores))


def _activation_bytes(cfg: Gemma4Config, rows: int, length: int, remat: str,
                      c: int, vocab_split: int, chunk: int, mesh, rules,
                      trains_norms: bool) -> tuple[int, int]:
  """Activations of one micro-batch on one device at the start of backward.

  What every layer keeps, plus the larger of two working sets that never
  overlap: the chunked loss's, and under remat that of one layer whose
  forward pass runs again. Returns the total and its attention scores.
  """
  saved_total = kept_scores = 0
  working = working_scores = 0
  for layer in range(cfg.num_layers):
    widths = _layer_widths(cfg, layer, rows, length, mesh, rules)
    saved, scores = _saved_bytes(widths, remat, c, trains_norms)
    saved_total += saved
    kept_scores += scores
    # Without remat, the gradient of a layer's scores takes the place of its
    # kept probabilities, so it adds nothing.
    if remat != 'none':
      full, full_scores = _saved_bytes(widths, 'none', c, trains_norms)
      if full > working:
        working, working_scores = full, full_scores

  # One chunk's float32 logits, probabilities and their gradient [b, C, V],
  # and the gradient of the hidden states [b, L, D].
  chunk = min(chunk, length)
  loss = 3 * 4 * rows * chunk * cfg.vocab_size // vocab_split
  loss += c * rows * length * cfg.embed_dim

  saved_total = _scaled(saved_total, kept_scores)
  loss = _scaled(loss, 0)
  working = max(_scaled(working, working_scores), loss)
  scores = kept_scores + (working_scores if working > loss else 0)
  return saved_total + working, scores


def plan_memory(
    model: str | Gemma4Config,
    mesh: str | Mapping[str, int],
    *,
    batch: int,
    length: int,
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] | None = None,
    remat: str = 'none',
    dtype: str = 'bfloat16',
    num_microbatches: int = 1,
    loss_chunk_size: int = 512,
    chip: str | None = None,
    rules: Any = rules_lib.DEFAULT_RULES,
) -> MemoryPlan:
  """Estimate per-device memory of a sharded train step and of its KV cache.

  Args:
    model: A preset name (e2b, e4b, 26b_a4b, 31b) or a config.
    mesh: Mesh axis sizes, such as 'tensor=8,fsdp=4'; any device count.
    batch: Global rows per step.
    length: Tokens per row (also the KV cache length).
    lora_rank: Plan a LoRA step with adapters of this rank; None plans full
      fine-tuning.
    lora_targets: LoRA targets (default: `lora.DEFAULT_TARGETS`).
    remat: Remat policy of the blocks: 'none', 'dots' or 'full'.
    dtype: Compute dtype, 'bfloat16' or 'float32'. Master parameters and
      AdamW moments are float32 in any case, as the train step keeps them.
    num_microbatches: Micro-batches per step (`OptimizerConfig`).
    loss_chunk_size: Positions per chunk of the cross-entropy.
    chip: A key of CHIPS to check the plan against, or None.
    rules: Logical-axis rules, as given to the train step.

  Raises:
    ValueError: An argument is invalid; the message names it and the fix.
  """
  # Imported here so that the mesh and rules modules stay free of training
  # code. Only the planner needs to know what the train step keeps.
  from gemma4_jax.sampling import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax.training import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from gemma4_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  cfg = resolve_config(model)
  devices = abstract_mesh(mesh)
  _check_arguments(batch, length, num_microbatches, lora_rank, remat, dtype)
  chip_spec = get_chip(chip) if chip is not None else None
  compute_dtype = DTYPES[dtype]
  c = jnp.dtype(compute_dtype).itemsize

  # Shapes of everything the step takes, from the real initialisers.
  params = _parameter_shapes(cfg, dtype)
  optimizer_config = step_lib.OptimizerConfig(
      learning_rate=1e-4, total_steps=1, num_microbatches=num_microbatches
  )
  if lora_rank is None:
    trainable = params
    base = None
  else:
    lora_config = lora_lib.LoraConfig(
        rank=lora_rank,
        alpha=float(lora_rank),
        targets=lora_targets or lora_lib.DEFAULT_TARGETS,
    )
    base = params
    trainable = jax.eval_shape(
        lambda: lora_lib.init_adapters(
            base, lora_config, jax.random.key(0), model_config=cfg
        )
    )
  state = jax.eval_shape(
      lambda t: step_lib.init_train_state(
          t, optimizer_config, jax.random.key(0)
      ),
      trainable,
  )
  batch_arrays = {
      name: jax.ShapeDtypeStruct((batch, length), jnp.int32)
      for name in ('tokens', 'targets', 'loss_weights', 'positions',
                   'segment_ids')
  }

  # Exact per-device bytes, from the shardings the step places them with.
  def placed(tree):
    return _per_device_bytes(
        tree, placement.tree_shardings(tree, devices, rules)
    )

  state_bytes = placed(state)
  optimizer_bytes = placed(state.opt_state)
  trainable_bytes = placed(state.params)
  base_bytes = placed(base) if base is not None else 0
  batch_bytes = _per_device_bytes(
      batch_arrays, placement.batch_shardings(batch_arrays, devices, rules)
  )
  compute_params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, compute_dtype), params
  )
  compute_param_bytes = placed(compute_params)

  # Weight copies live through the forward and backward passes. The
  # gradients are complete at the end of the backward pass, when most
  # activations are gone. Peak temporaries are the copies plus the larger of
  # the activations and the gradients (see `MemoryPlan.temp_bytes`).
  if base is None:
    # The step casts the master parameters to the compute dtype once. The
    # gradients come out in the compute dtype and are cast to float32 for
    # the update, and XLA on the CPU keeps both.
    master_bytes = placed(params_as(params, jnp.float32))
    weight_copies = compute_param_bytes if c != 4 else 0
    gradients = master_bytes + (compute_param_bytes if c != 4 else 0)
  else:
    # NOTE: `apply_adapters` materialises `W + scale * A B` of every adapted
    # weight, summed in float32 and cast to the compute dtype, and the
    # backward pass forms its full-size gradient. XLA on the CPU kept about
    # 8 bytes per adapted element in bfloat16, counted here as the float32
    # sum and its cast (copies) plus the gradient.
    adapted = placed(
        params_as(_adapted_subtree(params, trainable), jnp.float32)
    ) // 4
    weight_copies = adapted * ((4 + c) if c != 4 else 4)
    gradients = adapted * c + trainable_bytes
  if num_microbatches > 1:
    # The scan over micro-batches carries a float32 gradient sum.
    weight_copies += trainable_bytes

  # Activations of one micro-batch.
  rows = _rows_per_device(batch // num_microbatches, devices, rules)
  vocab_split = _split(cfg.vocab_size, 'vocab', devices, rules)
  activations, attention_scores = _activation_bytes(
      cfg, rows, length, remat, c, vocab_split, loss_chunk_size, devices,
      rules, trains_norms=base is None,
  )

  cache = jax.eval_shape(
      lambda: cache_lib.init_cache(cfg, batch, length, compute_dtype)
  )
  cache_bytes = _per_device_bytes(
      cache, placement.cache_shardings(cache, devices, rules)
  )

  return MemoryPlan(
      model=cfg.name,
      mesh={k: v for k, v in mesh_lib.full_shape(
          dict(devices.shape)).items()},
      batch=batch,
      length=length,
      lora_rank=lora_rank,
      remat=remat,
      dtype=dtype,
      num_microbatches=num_microbatches,
      rows_per_device=rows,
      chip=chip_spec,
      parameters=trainable_bytes + base_bytes,
      optimizer=optimizer_bytes,
      batch_bytes=batch_bytes,
      state_bytes=state_bytes,
      weight_copies=weight_copies,
      gradients=gradients,
      activations=activations,
      attention_scores=attention_scores,
      inference_parameters=compute_param_bytes,
      kv_cache=cache_bytes,
      model_is_moe=cfg.is_moe,
  )


@functools.lru_cache(maxsize=8)
def _parameter_shapes(cfg: Gemma4Config, dtype: str) -> Any:
  """Shape structs of the decoder's parameters (tracing takes seconds)."""
  # Imported here, like the training modules in `plan_memory`.
  from gemma4_jax.transformer import Transformer  # pylint: disable=g-import-not-at-top

  decoder = Transformer(config=cfg, dtype=DTYPES[dtype])
  return jax.eval_shape(
      decoder.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32)
  )['params']


def params_as(tree: Any, dtype: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)


def _adapted_subtree(params: Any, adapters: Any) -> dict[str, Any]:
  """Select the leaves of `params` that `adapters` adapt, keeping the nesting."""
  out = {}
  for key, value in adapters.items():
    if 'lora_a' in value:
      out[key] = params[key]
    else:
      out[key] = _adapted_subtree(params[key], value)
  return out


def _rows_per_device(rows: int, mesh: AbstractMesh, rules) -> int:
  """Rows of a micro-batch of `rows` rows that one device processes."""
  return rows // _split(rows, 'batch', mesh, rules)


def _check_arguments(batch, length, num_microbatches, lora_rank, remat,
                     dtype) -> None:
  for name, value in (('batch', batch), ('length', length),
                      ('num_microbatches', num_microbatches)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name}={value!r} must be a positive integer')
  if batch % num_microbatches:
    raise ValueError(
        f'batch={batch} is not divisible by num_microbatches='
        f'{num_microbatches}; change one of them'
    )
  if lora_rank is not None and (not isinstance(lora_rank, int)
                                or lora_rank < 1):
    raise ValueError(f'LoRA rank {lora_rank!r} must be a positive integer')
  if remat not in REMAT_CHOICES:
    raise ValueError(
        f'unknown remat policy {remat!r}; choose one of'
        f' {", ".join(REMAT_CHOICES)}'
    )
  if dtype not in DTYPES:
    raise ValueError(
        f'unknown dtype {dtype!r}; choose one of {", ".join(DTYPES)}'
    )


def _fit_line(label: str, need: int, chip: Chip) -> str:
  headroom = chip.memory_bytes - need
  used = 100 * need / chip.memory_bytes
  if headroom >= 0:
    return (
        f'{label}: fits on {chip.name} ({chip.memory_bytes / GIB:.1f} GiB per'
        f' chip): {used:.0f}% used, {headroom / GIB:.2f} GiB headroom'
    )
  return (
      f'{label}: does NOT fit on {chip.name} ({chip.memory_bytes / GIB:.1f}'
      f' GiB per chip): needs {need / GIB:.2f} GiB, {-headroom / GIB:.2f} GiB'
      ' over'
  )


def format_plan(plan: MemoryPlan) -> str:
  """Render `plan` as a table of GiB per device, fit lines and notes."""
  mesh = ','.join(f'{k}={v}' for k, v in plan.mesh.items() if v > 1)
  if plan.lora_rank is None:
    kind = 'full fine-tuning'
    parameters = 'parameters (float32 master)'
    copies = f'weight copy ({plan.dtype})'
  else:
    kind = f'LoRA rank {plan.lora_rank}'
    parameters = f'parameters ({plan.dtype} base, float32 adapters)'
    copies = 'merged weights W + scale * A B'
  if plan.num_microbatches > 1:
    copies += ', gradient sum'

  def row(label: str, size: int, indent: int = 2) -> str:
    return f'{" " * indent}{label:{44 - indent}s}{size / GIB:10.2f}'

  lines = [
      f'{plan.model}: {kind}, remat={plan.remat}, {plan.dtype},'
      f' batch {plan.batch} x {plan.length} tokens,'
      f' {plan.num_microbatches} micro-batch(es)',
      f'mesh {mesh or "of one device"} ({plan.num_devices} devices),'
      f' {plan.rows_per_device} row(s) per device per micro-batch',
      '',
      f'{"train step, per device":44s}{"GiB":>10s}',
      row(parameters, plan.parameters),
      row('optimizer state (AdamW mu, nu)', plan.optimizer),
      row('batch', plan.batch_bytes),
      row(copies, plan.weight_copies),
      row('gradients, end of backward pass', plan.gradients),
      row('activations, start of backward pass', plan.activations),
      row('of which attention scores', plan.attention_scores, indent=4),
      row('peak: arguments, copies, larger of the two', plan.train_peak_bytes),
      '',
      f'{"inference at the same batch and length":44s}{"GiB":>10s}',
      row(f'parameters ({plan.dtype})', plan.inference_parameters),
      row('KV cache', plan.kv_cache),
      row('total', plan.inference_peak_bytes),
  ]
  if plan.chip is not None:
    lines += [
        '',
        _fit_line('train step', plan.train_peak_bytes, plan.chip),
        _fit_line('inference', plan.inference_peak_bytes, plan.chip),
    ]
  lines += ['', *plan_notes(plan)]
  return '\n'.join(lines)


def plan_notes(plan: MemoryPlan) -> list[str]:
  """Caveats of `plan`, one line each."""
  notes = [
      'NOTE: parameters, optimizer state and KV cache follow exactly from'
      ' the shardings of the rules. Weight copies, gradients and'
      ' activations are estimates, calibrated on XLA\'s memory analysis of'
      ' the compiled step on the CPU backend; TPU and GPU backends fuse and'
      ' reuse buffers differently.',
  ]
  if plan.attention_scores > plan.activations / 2:
    notes.append(
        'NOTE: attention scores [B, N, L, L] (float32 and compute-dtype'
        ' probabilities) are most of the activations: training attention is'
        ' not blocked yet, so they grow with the square of the length.'
        ' Shorter rows, more tensor parallelism or remat reduce them.'
    )
  if plan.mesh.get('fsdp', 1) > 1 and plan.remat == 'full':
    notes.append(
        'NOTE: with remat full on a mesh with an fsdp axis, XLA (CPU'
        ' backend, an E2B-like config on data=2,fsdp=4) kept 1.7 times the'
        ' planned temporaries; read this plan\'s activations as a lower'
        ' bound there.'
    )
  if plan.model_is_moe:
    notes.append(
        'NOTE: MoE activations count the routed rows of the ragged'
        ' implementation; no MoE config was checked against XLA.'
    )
  if plan.chip is not None:
    notes.append(
        f'NOTE: {plan.chip.name} has {plan.chip.memory_bytes / GIB:.0f} GiB'
        f' per chip ({plan.chip.source}); the runtime reserves part of it.'
    )
  return notes
