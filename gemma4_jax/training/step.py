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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from gemma4_jax.training import loss as loss_lib
from gemma4_jax.transformer import Transformer

# Parameters never decayed: norm scales, the block's skip scale, MoE scales,
# and biases (Gemma 4 has none, but a bias should not be decayed either).
_NO_DECAY_NAMES = frozenset(
    {'scale', 'skip_scale', 'per_expert_scale', 'router_scale', 'bias'}
)
_EMBEDDING_NAMES = frozenset({'input_embedding', 'per_layer_embeddings'})

_BATCH_KEYS = ('tokens', 'targets', 'loss_weights', 'positions', 'segment_ids')


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
    params: Float32 master parameters (the decoder's parameter tree).
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
  when `decay_embeddings` is set.
  """

  def decays(path, value) -> bool:
    name = path[-1].key
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
  def cast(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.asarray(x, dtype)
    return x

  return jax.tree.map(cast, tree)


def init_train_state(
    params: Any, config: OptimizerConfig, rng: jax.Array
) -> TrainState:
  """Build the state before the first step: float32 `params`, fresh AdamW."""
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


def make_train_step(
    model: Transformer,
    config: OptimizerConfig,
    *,
    loss_chunk_size: int = 512,
) -> Callable[[TrainState, dict[str, Any]], tuple[TrainState, dict[str, jax.Array]]]:
  """Build the jitted step `(state, batch) -> (new_state, metrics)`.

  The step donates `state`, so the caller must not read the state it passed
  in after the call. Metrics are float32 scalars: `loss` (mean over weighted
  tokens), `loss_sum`, `weight_sum`, `num_tokens`, `grad_norm` (global norm
  before clipping) and `learning_rate` (the rate this update used).

  Args:
    model: The decoder; its `dtype` is the compute dtype of the step.
    config: Optimizer settings.
    loss_chunk_size: Sequence positions per chunk of the cross-entropy.
  """
  optimizer = make_optimizer(config)
  schedule = learning_rate_schedule(config)

  def loss_sum_and_metrics(master_params, micro_batch, rng):
    params = _cast_floating(master_params, model.dtype)
    _, metrics = loss_lib.model_loss(
        model,
        params,
        micro_batch,
        chunk_size=loss_chunk_size,
        rngs={'dropout': rng},
    )
    return metrics['loss_sum'], metrics

  grad_fn = jax.grad(loss_sum_and_metrics, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, Any]):
    rng, step_rng = jax.random.split(state.rng)
    micro_batches = _split_microbatches(batch, config.num_microbatches)
    micro_rngs = jax.random.split(step_rng, config.num_microbatches)

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    zero_metrics = {
        name: jnp.zeros((), jnp.float32)
        for name in ('loss_sum', 'weight_sum', 'num_tokens')
    }

    def body(carry, inputs):
      grad_sum, metric_sums = carry
      micro_batch, micro_rng = inputs
      grads, metrics = grad_fn(state.params, micro_batch, micro_rng)
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
    new_state = TrainState(
        params=params, opt_state=opt_state, step=state.step + 1, rng=rng
    )
    return new_state, metrics

  return jax.jit(train_step, donate_argnums=0)
