"""Next-token cross-entropy over the tied output projection, in sequence chunks.

At Gemma 4's vocabulary of 262144, float32 logits of one 2048-token row take
2 GiB, so the loss never forms the [B, L, V] logits. It runs a scan over
chunks of `chunk_size` positions, and each chunk computes its [B, C, V] logits,
log-softmax and target log-probabilities. The chunk body is rematerialised
(`jax.checkpoint`), so the backward pass recomputes one chunk's logits at a
time instead of storing every chunk's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma4_jax.transformer import Transformer


def chunked_cross_entropy(
    hidden_states: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    loss_weights: jax.Array,
    *,
    final_logit_softcap: float | None,
    chunk_size: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy of `targets` under the tied-embedding logits.

  Each chunk's logits are `softcap(hidden_states @ embedding.T)`, the
  formula of `Transformer.output_logits`, but accumulated and soft-capped in
  float32 whatever the dtype of the inputs.

  Args:
    hidden_states: [B, L, D] final-normed hidden states.
    embedding: [V, D] tied input embedding.
    targets: [B, L] int target ids.
    loss_weights: [B, L] weight of each position; 0 leaves it out.
    final_logit_softcap: Soft-cap of the logits, or None for no cap.
    chunk_size: Positions per chunk. When it does not divide L, the last
      chunk is padded with zero-weight positions.

  Returns:
    The loss (float32 scalar) `loss_sum / weight_sum`, 0 when no position has
    weight, and metrics: `loss_sum` (weighted sum of per-token losses),
    `weight_sum` (sum of `loss_weights`) and `num_tokens` (positions with
    non-zero weight), all float32 scalars.
  """
  batch, length, dim = hidden_states.shape
  if targets.shape != (batch, length) or loss_weights.shape != (batch, length):
    raise ValueError(
        f'targets {targets.shape} and loss_weights {loss_weights.shape} must'
        f' both have shape {(batch, length)} to match hidden_states'
        f' {hidden_states.shape}'
    )
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')

  chunk_size = min(chunk_size, length)
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length
  weights = loss_weights.astype(jnp.float32)
  if pad:
    hidden_states = jnp.pad(hidden_states, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))

  def to_chunks(x: jax.Array) -> jax.Array:
    # [B, L, ...] -> [num_chunks, B, C, ...]; the batch axis stays whole, so a
    # batch-sharded input needs no resharding.
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  @jax.checkpoint
  def chunk_loss_sum(h, t, w):
    """Weighted loss sum of one chunk: h [B, C, D], t and w [B, C]."""
    logits = jnp.einsum(
        'BCD,VD->BCV', h, embedding, preferred_element_type=jnp.float32
    )
    if final_logit_softcap is not None:
      logits = jnp.tanh(logits / final_logit_softcap) * final_logit_softcap
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logits = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return jnp.sum((log_normalizer - target_logits) * w)

  def body(total, chunk):
    return total + chunk_loss_sum(*chunk), None

  loss_sum, _ = jax.lax.scan(
      body,
      jnp.zeros((), jnp.float32),
      (to_chunks(hidden_states), to_chunks(targets), to_chunks(weights)),
  )

  weight_sum = jnp.sum(weights)
  loss = jnp.where(weight_sum > 0, loss_sum / jnp.maximum(weight_sum, 1e-30), 0.0)
  metrics = {
      'loss_sum': loss_sum,
      'weight_sum': weight_sum,
      'num_tokens': jnp.sum(weights != 0).astype(jnp.float32),
  }
  return loss, metrics


def model_loss(
    model: Transformer,
    params: Any,
    batch: dict[str, jax.Array],
    *,
    chunk_size: int,
    rngs: dict[str, jax.Array] | None = None,
    load_balancing_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Run `model` on a training batch and return its chunked cross-entropy.

  Args:
    model: The decoder. Its `dtype` is the compute dtype, and `params` are
      used in the dtype they have.
    params: The decoder's parameter tree (the contents of `{'params': ...}`).
    batch: Arrays [B, L] `tokens`, `targets`, `loss_weights`, `positions`
      and `segment_ids` (0 marks padding), as
      `gemma4_jax.training.data` yields them.
    chunk_size: Positions per loss chunk.
    rngs: PRNG streams passed to `model.apply`.
    load_balancing_weight: Weight of the MoE router load-balancing loss
      (`gemma4_jax.moe.load_balancing_loss`, averaged over the MoE layers);
      0 leaves it out. Ignored for models without experts.

  Returns:
    The mean cross-entropy and the metrics of `chunked_cross_entropy`, plus
    `objective_sum`: the quantity to differentiate, `loss_sum +
    load_balancing_weight * load_balancing_loss * weight_sum`, so that
    dividing it by the total weight of a batch adds the weighted auxiliary
    loss to the mean cross-entropy. With a load-balancing weight the metrics
    also hold `load_balancing_loss`.
  """
  segment_ids = batch['segment_ids']
  with_balance = load_balancing_weight > 0 and model.config.is_moe
  output = model.apply(
      {'params': params},
      batch['tokens'],
      positions=batch['positions'],
      input_mask=segment_ids != 0,
      segment_ids=segment_ids,
      return_logits=False,
      return_hidden_states=True,
      rngs=rngs,
      mutable=['intermediates'] if with_balance else False,
  )
  if with_balance:
    output, state = output
    per_layer = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            state['intermediates']
        )
        if any(
            getattr(key, 'key', None) == 'load_balancing_loss' for key in path
        )
    ]
    balance = jnp.mean(jnp.stack(per_layer))
  loss, metrics = chunked_cross_entropy(
      output.hidden_states,
      params['embedder']['input_embedding'],
      batch['targets'],
      batch['loss_weights'],
      final_logit_softcap=model.config.final_logit_softcap,
      chunk_size=chunk_size,
  )
  metrics['objective_sum'] = metrics['loss_sum']
  if with_balance:
    metrics['load_balancing_loss'] = balance
    metrics['objective_sum'] = metrics['loss_sum'] + (
        load_balancing_weight * balance * metrics['weight_sum']
    )
  return loss, metrics
