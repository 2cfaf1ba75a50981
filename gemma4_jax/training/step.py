"""The optimizer and the compiled train step of full fine-tuning.

    config = OptimizerConfig(learning_rate=1e-5, total_steps=1000, warmup_steps=50)
    state = init_train_state(params, config, jax.random.key(0))
    train_step = make_train_step(Transformer(config=..., dtype=jnp.bfloat16), config)
    state, metrics = train_step(state, batch)  # `state` is donated

Precision: `TrainState.params` are float32 master parameters and the AdamW
moments are float32. Each step casts the master parameters to the model's
`dtype` (bfloat16 in training) for the forward and backward pass. The float32
gradients then update the float32 master parameters, so updates far smaller
than a bfloat16 ulp of a weight are not rounded away.

Gradient accumulation is an explicit scan over micro-batches inside the step:
a batch [B, L] is split into `num_microbatches` slices [B / M, L] run one
after another, and their gradients of the summed token losses are added up.
The step then divides by the batch's total loss weight, so its update equals
that of the whole batch at once, whatever the number of weighted tokens in
each slice, and it makes one optimizer update per call.

LoRA fine-tuning uses the same step with `make_train_step(..., lora=...)`:

    adapters = lora.init_adapters(params, lora_config, key,
                                  model_config=model_config)
    state = init_train_state(adapters, config, jax.random.key(0))
    train_step = make_train_step(model, config, lora=lora_config)
    state, metrics = train_step(state, batch, base_params)

The state then contains only the float32 adapters and their AdamW moments.
The frozen base parameters are a separate argument, already in the model's
`dtype` and not donated, so they are neither copied to float32 nor updated.

Multimodal models: the vision and audio towers (and their embedder
projections) are frozen by default. `split_towers` takes them out of the
trainable tree, and they are passed to the full fine-tuning step as its
third argument, so they have no AdamW moments:

    trainable, towers = split_towers(params)
    state = init_train_state(trainable, config, jax.random.key(0))
    state, metrics = train_step(state, batch, towers)

For LoRA they stay in `base_params`. Tower parameters always compute in
float32. A batch with media carries them per row (see `model_loss`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from gemma4_jax.checkpoint import layouts
from gemma4_jax.training import lora as lora_lib
from gemma4_jax.training import loss as loss_lib
from gemma4_jax.transformer import Transformer

# Parameters never decayed: norm scales, the block's skip scale, MoE scales,
# and biases (Gemma 4 has none, but a bias should not be decayed either).
_NO_DECAY_NAMES = frozenset(
    {'scale', 'skip_scale', 'per_expert_scale', 'router_scale', 'bias'}
)
_EMBEDDING_NAMES = frozenset({'input_embedding', 'per_layer_embeddings'})

_BATCH_KEYS = ('tokens', 'targets', 'loss_weights', 'positions', 'segment_ids')
_MEDIA_KEYS = loss_lib.MEDIA_KEYS
# Metrics of `loss_lib.model_loss` that the step adds up over micro-batches.
_SUMMED_METRICS = ('loss_sum', 'weight_sum', 'num_tokens')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with warm-up and cosine decay, clipping and gradient accumulation.

  Attributes:
    learning_rate: Peak learning rate, reached at the end of the warm-up.
    total_steps: Optimizer steps of the run; the cosine decay reaches
      `learning_rate * end_learning_rate_fraction` at this step.
    warmup_steps: Steps of linear warm-up from 0 to `learning_rate`.
    end_learning_rate_fraction: Final learning rate as a fraction of the peak.
    b1: AdamW decay rate of the first moment.
    b2: AdamW decay rate of the second moment.
    eps: AdamW epsilon, added to the root of the second moment.
    weight_decay: Decoupled weight decay rate, multiplied by the learning
      rate. Applied to weight matrices only (see `weight_decay_mask`).
    decay_embeddings: Also decay the embedding tables.
    max_grad_norm: Clip gradients to this global norm; None for no clipping.
    num_microbatches: Slices of each batch run one after another, with their
      gradients accumulated; must divide the batch size.
  """

  learning_rate: float
  total_steps: int
  warmup_steps: int = 0
  end_learning_rate_fraction: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_embeddings: bool = False
  max_grad_norm: float | None = 1.0
  num_microbatches: int = 1

  def __post_init__(self):
    if self.total_steps < 1:
      raise ValueError(f'total_steps must be positive, got {self.total_steps}')
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(
          f'warmup_steps={self.warmup_steps} must be in [0, total_steps='
          f'{self.total_steps}]'
      )
    if self.num_microbatches < 1:
      raise ValueError(
          f'num_microbatches must be positive, got {self.num_microbatches}'
      )
    if self.max_grad_norm is not None and self.max_grad_norm <= 0:
      raise ValueError(
          f'max_grad_norm must be positive or None, got {self.max_grad_norm}'
      )


@flax.struct.dataclass
class TrainState:
  """Everything a train step reads and updates.

  Attributes:
    params: Float32 master parameters (the decoder's parameter tree), or the
      float32 LoRA adapters in a LoRA step.
    opt_state: Optax state of `make_optimizer`, float32.
    step: Int32 scalar, the number of optimizer updates made.
    rng: PRNG key. Each step splits it and passes one half to the model as
      its 'dropout' stream, which the Gemma 4 decoder does not read yet.
  """

  params: Any
  opt_state: optax.OptState
  step: jax.Array
  rng: jax.Array


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then cosine decay to the end value.

  At step s < w (w = warmup_steps) the rate is `peak * s / w`; from w to
  `total_steps` T it is `end + (peak - end) * (1 + cos(pi * (s - w) /
  (T - w))) / 2`, and it stays at `end` after T.
  """
  peak = config.learning_rate
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=config.warmup_steps,
      decay_steps=config.total_steps,
      end_value=peak * config.end_learning_rate_fraction,
  )


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """Mark with True the leaves of `params` that weight decay applies to.

  Norm scales, skip and MoE scales, biases and every parameter with fewer
  than two dimensions are not decayed. The embedding tables are decayed only
  when `decay_embeddings` is set. Both LoRA factors `lora_a` and `lora_b`
  are decayed: shrinking them pulls the adapted model towards the base.
  """

  def decays(path, value) -> bool:
    name = path[-1].key
    if name in (lora_lib.LORA_A, lora_lib.LORA_B):
      return True
    if name in _NO_DECAY_NAMES or jnp.ndim(value) < 2:
      return False
    if name in _EMBEDDING_NAMES:
      return decay_embeddings
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on `learning_rate_schedule(config)`."""
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(config),
      b1=config.b1,
      b2=config.b2,
      eps=config.eps,
      weight_decay=config.weight_decay,
      mask=functools.partial(
          weight_decay_mask, decay_embeddings=config.decay_embeddings
      ),
  )
  if config.max_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)


def _cast_floating(tree: Any, dtype: Any) -> Any:
  """Cast the floating leaves of `tree` to `dtype`, except tower parameters.

  The vision and audio towers and their projections stay float32.
  """

  def cast(path, x):
    names = tuple(getattr(key, 'key', str(key)) for key in path)
    if layouts.is_multimodal_path(names):
      return x
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.asarray(x, dtype)
    return x

  return jax.tree_util.tree_map_with_path(cast, tree)


def split_towers(params: Any) -> tuple[Any, Any]:
  """Split a parameter tree into (decoder, vision and audio towers).

  The towers part contains `vision_encoder`, `audio_encoder` and the embedder's
  `mm_*` and `audio_*` projections; it is `{}` for a text-only tree. Train
  the first part and pass the second to the step as frozen parameters.
  """
  return layouts.split_multimodal(params)


def init_train_state(
    params: Any, config: OptimizerConfig, rng: jax.Array
) -> TrainState:
  """Build the state before the first step: float32 `params`, fresh AdamW.

  `params` are the decoder's parameters for full fine-tuning, or the adapters
  of `lora.init_adapters` for a LoRA step.
  """
  master = _cast_floating(params, jnp.float32)
  return TrainState(
      params=master,
      opt_state=make_optimizer(config).init(master),
      step=jnp.zeros((), jnp.int32),
      rng=rng,
  )


def _split_microbatches(
    batch: dict[str, jax.Array], num_microbatches: int
) -> dict[str, jax.Array]:
  """Reshape arrays [B, L] to [M, B / M, L], so row i goes to slice i // (B / M)."""
  out = {}
  for key in _BATCH_KEYS:
    if key not in batch:
      raise ValueError(
          f'batch is missing {key!r}; a batch needs {", ".join(_BATCH_KEYS)}'
      )
  # Media arrays are per row too ([B, images or clips, ...]).
  for key in (*_BATCH_KEYS, *(k for k in batch if k in _MEDIA_KEYS)):
    value = jnp.asarray(batch[key])
    rows = value.shape[0]
    if rows % num_microbatches:
      raise ValueError(
          f'batch size {rows} is not divisible by num_microbatches='
          f'{num_microbatches}; change one of them'
      )
    out[key] = value.reshape(
        num_microbatches, rows // num_microbatches, *value.shape[1:]
    )
  return out


def _check_base_dtypes(base_params: Any, dtype: Any) -> None:
  """Raise unless every floating leaf of `base_params` is in `dtype`."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(base_params):
    names = tuple(getattr(key, 'key', str(key)) for key in path)
    if layouts.is_multimodal_path(names):
      continue  # Towers stay float32.
    leaf_dtype = jnp.result_type(leaf)
    if jnp.issubdtype(leaf_dtype, jnp.floating) and leaf_dtype != dtype:
      raise ValueError(
          f'base parameter {jax.tree_util.keystr(path)} has dtype'
          f' {leaf_dtype}, but the model computes in {jnp.dtype(dtype)}; cast'
          ' the base parameters to the model dtype once before training, so'
          ' that the step does not cast (and hold) a second copy every call'
      )


def _accumulating_step(
    loss_and_metrics: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
    config: OptimizerConfig,
    averaged_metrics: tuple[str, ...] = (),
    compute_dtype: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Build the un-jitted step `(state, batch, frozen) -> (new_state, metrics)`.

  `loss_and_metrics(trainable, micro_batch, rng, frozen)` returns the
  summed objective of one micro-batch (the value differentiated with
  respect to `trainable`) and its metrics. `frozen` is passed through
  without gradients: None for full fine-tuning, the base parameters for
  LoRA. Metrics named in `averaged_metrics` are per-micro-batch means, and
  the step reports their mean over the micro-batches.

  With `compute_dtype` the float32 `state.params` are cast to it once per
  step, `loss_and_metrics` receives and is differentiated with respect to
  the cast tree, and each micro-batch's gradients are cast back to float32
  before they are added up. That is the gradient with respect to the
  float32 parameters, bit for bit, without one cast per micro-batch.
  """
  optimizer = make_optimizer(config)
  schedule = learning_rate_schedule(config)
  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, Any], frozen: Any):
    rng, step_rng = jax.random.split(state.rng)
    micro_batches = _split_microbatches(batch, config.num_microbatches)
    micro_rngs = jax.random.split(step_rng, config.num_microbatches)

    accumulated = (*_SUMMED_METRICS, *averaged_metrics)
    trainable = state.params
    if compute_dtype is not None:
      trainable = _cast_floating(state.params, compute_dtype)

    def micro_step(micro_batch, micro_rng):
      grads, metrics = grad_fn(trainable, micro_batch, micro_rng, frozen)
      if compute_dtype is not None:
        grads = _cast_floating(grads, jnp.float32)
      return grads, {name: metrics[name] for name in accumulated}

    if config.num_microbatches == 1:
      # A single slice needs no loop and no zero-filled gradient tree to add
      # into, which would cost two extra passes over a full set of
      # float32 gradients.
      grad_sum, sums = micro_step(
          jax.tree.map(lambda x: x[0], micro_batches), micro_rngs[0]
      )
    else:
      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      zero_metrics = {name: jnp.zeros((), jnp.float32) for name in accumulated}

      def body(carry, inputs):
        grad_sum, metric_sums = carry
        grads, metrics = micro_step(*inputs)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        metric_sums = jax.tree.map(jnp.add, metric_sums, metrics)
        return (grad_sum, metric_sums), None

      (grad_sum, sums), _ = jax.lax.scan(
          body, (zero_grads, zero_metrics), (micro_batches, micro_rngs)
      )

    # Gradients of the summed losses, divided once by the batch's total
    # weight: the gradient of the batch's mean loss.
    weight_sum = sums['weight_sum']
    scale = jnp.where(weight_sum > 0, 1.0 / jnp.maximum(weight_sum, 1e-30), 0.0)
    grads = jax.tree.map(lambda g: g * scale, grad_sum)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = {
        'loss': sums['loss_sum'] * scale,
        'loss_sum': sums['loss_sum'],
        'weight_sum': weight_sum,
        'num_tokens': sums['num_tokens'],
        'grad_norm': optax.global_norm(grads),
        'learning_rate': jnp.asarray(schedule(state.step), jnp.float32),
    }
    for name in averaged_metrics:
      metrics[name] = sums[name] / config.num_microbatches
    new_state = TrainState(
        params=params, opt_state=opt_state, step=state.step + 1, rng=rng
    )
    return new_state, metrics

  return train_step


def make_train_step(
    model: Transformer,
    config: OptimizerConfig,
    *,
    lora: lora_lib.LoraConfig | None = None,
    loss_chunk_size: int = 512,
    load_balancing_weight: float = 0.0,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Build the jitted step of full fine-tuning or of LoRA.

  Without `lora` the step is `(state, batch, towers=None) -> (new_state,
  metrics)` and `state.params` are the float32 master parameters. `towers`
  are frozen parameters (the vision and audio towers of `split_towers`),
  merged into the tree the model runs on but neither differentiated nor
  updated. With `lora` it is
  `(state, batch, base_params) -> (new_state, metrics)`: `state.params` are
  the float32 adapters, and `base_params` are the frozen decoder parameters
  in `model.dtype` (a ValueError otherwise). Each micro-batch then runs the
  model on `lora.apply_adapters(base_params, adapters, ...)`.

  NOTE: The merged weights `W + scale * A B` are materialised, so a LoRA step
  keeps a second `model.dtype` copy of every adapted weight (and forms each
  one's full gradient) while it runs. That doubles the weight memory of the
  adapted layers.

  The step donates `state` (never `base_params`), so the caller must not read
  the state it passed in after the call. Metrics are float32 scalars: `loss`
  (mean over weighted tokens), `loss_sum`, `weight_sum`, `num_tokens`,
  `grad_norm` (global norm before clipping) and `learning_rate` (the rate
  this update used). With a load-balancing loss they also contain
  `load_balancing_loss`, the mean over micro-batches, and the gradient is
  that of `loss + load_balancing_weight * load_balancing_loss`.

  Args:
    model: The decoder; its `dtype` is the compute dtype of the step.
    config: Optimizer settings.
    lora: The adapters' config, for a LoRA step.
    loss_chunk_size: Sequence positions per chunk of the cross-entropy.
    load_balancing_weight: Weight of the MoE router load-balancing loss of
      `loss_lib.model_loss`; 0 leaves it out. Ignored for dense models.
    mesh: Run the step sharded on this mesh: parameters, optimizer state and
      base parameters placed by the logical-axis `rules` (default
      `parallel.rules.DEFAULT_RULES`), batch rows split over the `batch`
      rule's axes, metrics replicated. The step is compiled with these
      input and output shardings on its first call and moves its inputs
      there if they are elsewhere.
  """
  if not load_balancing_weight >= 0:
    raise ValueError(
        'load_balancing_weight must be 0 or positive, got'
        f' {load_balancing_weight}'
    )
  with_balance = load_balancing_weight > 0 and model.config.is_moe
  loss_options = {}
  averaged_metrics = ()
  if with_balance:
    loss_options['load_balancing_weight'] = load_balancing_weight
    averaged_metrics = ('load_balancing_loss',)

  def run_loss(params, micro_batch, rng):
    _, metrics = loss_lib.model_loss(
        model,
        params,
        micro_batch,
        chunk_size=loss_chunk_size,
        rngs={'dropout': rng},
        **loss_options,
    )
    objective = metrics['objective_sum'] if with_balance else metrics['loss_sum']
    return objective, metrics

  if lora is None:

    def full_loss(params, micro_batch, rng, frozen):
      if frozen:
        params = layouts.merge_trees(params, frozen)
      return run_loss(params, micro_batch, rng)

    step = _accumulating_step(
        full_loss, config, averaged_metrics, compute_dtype=model.dtype
    )

    def full_step(
        state: TrainState, batch: dict[str, Any], towers: Any = None
    ):
      return step(state, batch, towers)

    if mesh is not None:
      return _sharded(full_step, mesh, rules)
    return jax.jit(full_step, donate_argnums=0)

  def lora_loss(adapters, micro_batch, rng, base_params):
    params = lora_lib.apply_adapters(base_params, adapters, lora, model.dtype)
    return run_loss(params, micro_batch, rng)

  step = _accumulating_step(lora_loss, config, averaged_metrics)

  def lora_step(state: TrainState, batch: dict[str, Any], base_params: Any):
    _check_base_dtypes(base_params, model.dtype)
    return step(state, batch, base_params)

  if mesh is not None:
    return _sharded(lora_step, mesh, rules)
  return jax.jit(lora_step, donate_argnums=0)


def _sharded(step_fn: Callable[..., Any], mesh, rules) -> Callable[..., Any]:
  """Jit `step_fn(state, batch[, base_params])` with explicit shardings.

  The shardings depend on the shapes of the arguments, so the step is
  compiled on the first call (and again for a new batch shape).
  """
  # Imported here: the parallel package imports nothing from training, and
  # single-device training does not need it.
  from gemma4_jax.parallel import placement  # pylint: disable=g-import-not-at-top
  from gemma4_jax.parallel import rules as rules_lib  # pylint: disable=g-import-not-at-top

  rules = rules_lib.DEFAULT_RULES if rules is None else rules
  compiled = {}

  def call(state, batch, *base):
    key = jax.tree.structure((state, batch, base)), tuple(
        getattr(x, 'shape', None) for x in jax.tree.leaves(batch)
    )
    if key not in compiled:
      state_shardings = placement.tree_shardings(state, mesh, rules)
      in_shardings = (
          state_shardings,
          placement.batch_shardings(batch, mesh, rules),
      ) + tuple(placement.tree_shardings(b, mesh, rules) for b in base)
      compiled[key] = (
          jax.jit(
              step_fn,
              in_shardings=in_shardings,
              out_shardings=(state_shardings, placement.replicated(mesh)),
              donate_argnums=0,
          ),
          in_shardings,
      )
    fn, in_shardings = compiled[key]
    args = jax.device_put((state, batch) + base, in_shardings)
    # The mesh is also set while the step traces, for code that needs it by
    # name (the expert-parallel MoE's `shard_map`), and the model's
    # activations follow the rules.
    with jax.set_mesh(mesh), rules_lib.activation_rules(mesh, rules):
      return fn(*args)

  return call
