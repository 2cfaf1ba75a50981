"""Next-token cross-entropy over the tied output projection, in sequence chunks.

At Gemma 4's vocabulary of 262144, float32 logits of one 2048-token row take
2 GiB, so the loss never forms the [B, L, V] logits. It runs a scan over
chunks of `chunk_size` positions, and each chunk computes its [B, C, V] logits,
log-softmax and target log-probabilities.

Under differentiation the same scan also computes the gradients: each chunk
turns its logits into `softmax - one_hot(target)` at once and multiplies that
by the embedding and by the hidden states, so the backward pass only scales
the stored gradients. A backward pass that recomputed each chunk's logits
would multiply the hidden states by the [V, D] embedding one more time, and
one that kept them would hold the [B, L, V] logits. The embedding's gradient
is added up over the chunks in a float32 [V, D] buffer, whatever the
embedding's dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gemma4_jax.transformer import Transformer


def _capped_logits(
    h: jax.Array, embedding: jax.Array, softcap: float | None
) -> jax.Array:
  """Return the float32 logits [B, C, V] of `h` [B, C, D], soft-capped."""
  logits = jnp.einsum(
      'BCD,VD->BCV', h, embedding, preferred_element_type=jnp.float32
  )
  if softcap is not None:
    logits = jnp.tanh(logits / softcap) * softcap
  return logits


def _token_losses(logits: jax.Array, targets: jax.Array):
  """Return the per-position losses [B, C] and log-normalisers [B, C]."""
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  return log_normalizer - target_logits[..., 0], log_normalizer


def _chunked_loss_sum(softcap: float | None):
  """Build the weighted loss sum over chunks, whose scan also forms gradients.

  The returned function maps chunked hidden states [M, B, C, D], the
  embedding [V, D], targets [M, B, C] and weights [M, B, C] to the float32
  scalar sum of weight * loss.
  """

  def primal(h_chunks, embedding, t_chunks, w_chunks):
    def body(total, chunk):
      h, t, w = chunk
      losses, _ = _token_losses(_capped_logits(h, embedding, softcap), t)
      return total + jnp.sum(losses * w), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (h_chunks, t_chunks, w_chunks)
    )
    return total

  loss_sum = jax.custom_vjp(primal)

  def forward(h_chunks, embedding, t_chunks, w_chunks):
    # With symbolic_zeros=True each argument arrives as a CustomVJPPrimal.
    # Its `perturbed` is False for an input that nothing differentiates (the
    # frozen embedding of a LoRA step), so that gradient is never formed.
    want_h = h_chunks.perturbed
    want_embedding = embedding.perturbed
    want_w = w_chunks.perturbed
    h_chunks, embedding = h_chunks.value, embedding.value
    t_chunks, w_chunks = t_chunks.value, w_chunks.value
    vocab_size = embedding.shape[0]

    def body(carry, chunk):
      total, embedding_grad = carry
      h, t, w = chunk
      logits = _capped_logits(h, embedding, softcap)
      losses, log_normalizer = _token_losses(logits, t)
      total = total + jnp.sum(losses * w)
      outputs = {'losses': losses} if want_w else {}
      if want_h or want_embedding:
        # d(w * loss) / d logits = w * (softmax - one_hot(target)), times
        # the soft-cap's derivative 1 - tanh^2.
        probs = jnp.exp(logits - log_normalizer[..., None])
        one_hot = jax.nn.one_hot(t, vocab_size, dtype=jnp.float32)
        logits_grad = (probs - one_hot) * w[..., None]
        if softcap is not None:
          logits_grad *= 1.0 - jnp.square(logits / softcap)
        # The matmuls take their inputs in the compute dtype, as the
        # forward matmul does, and accumulate in float32.
        logits_grad = logits_grad.astype(h.dtype)
        if want_h:
          outputs['h'] = jnp.einsum(
              'BCV,VD->BCD', logits_grad, embedding.astype(h.dtype),
              preferred_element_type=jnp.float32,
          ).astype(h.dtype)
        if want_embedding:
          # Accumulated as [D, V]: XLA's CPU backend then transposes the
          # small [B, C, D] operand, while for [V, D] it copied the [B, C, V]
          # one into a transposed layout, which made this gradient about
          # 1.6 times slower (measured on a 2-core x86 CPU with jax 0.12).
          embedding_grad = embedding_grad + jnp.einsum(
              'BCD,BCV->DV', h, logits_grad,
              preferred_element_type=jnp.float32,
          )
      return (total, embedding_grad), outputs

    embedding_grad = None
    if want_embedding:
      embedding_grad = jnp.zeros(embedding.shape[::-1], jnp.float32)
    (total, embedding_grad), outputs = jax.lax.scan(
        body,
        (jnp.zeros((), jnp.float32), embedding_grad),
        (h_chunks, t_chunks, w_chunks),
    )
    if want_embedding:
      embedding_grad = embedding_grad.T.astype(embedding.dtype)
    return total, (outputs.get('h'), embedding_grad, outputs.get('losses'))

  def backward(residuals, total_grad):
    h_grad, embedding_grad, losses = residuals
    if isinstance(total_grad, jax.custom_derivatives.SymbolicZero):
      return None, None, None, None

    def scaled(x):
      return None if x is None else (x * total_grad).astype(x.dtype)

    return scaled(h_grad), scaled(embedding_grad), None, scaled(losses)

  loss_sum.defvjp(forward, backward, symbolic_zeros=True)
  return loss_sum


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
    weights_padded = jnp.pad(weights, ((0, 0), (0, pad)))
  else:
    weights_padded = weights

  def to_chunks(x: jax.Array) -> jax.Array:
    # [B, L, ...] -> [num_chunks, B, C, ...]; the batch axis stays whole, so a
    # batch-sharded input needs no resharding.
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  loss_sum = _chunked_loss_sum(final_logit_softcap)(
      to_chunks(hidden_states),
      embedding,
      to_chunks(targets),
      to_chunks(weights_padded),
  )

  weight_sum = jnp.sum(weights)
  loss = jnp.where(weight_sum > 0, loss_sum / jnp.maximum(weight_sum, 1e-30), 0.0)
  metrics = {
      'loss_sum': loss_sum,
      'weight_sum': weight_sum,
      'num_tokens': jnp.sum(weights != 0).astype(jnp.float32),
  }
  return loss, metrics


# Per-row media arrays of a training batch, and what the model takes them as.
# Padding images have all patch positions -1 and padding clips a count of 0:
# neither adds soft tokens.
IMAGE_KEYS = ('image_patches', 'image_positions')  # [B, I, L, 768], [B, I, L, 2]
AUDIO_KEYS = ('audio_waveforms', 'audio_lengths', 'audio_counts')  # [B, C, S], [B, C], [B, C]
MEDIA_KEYS = IMAGE_KEYS + AUDIO_KEYS


def _media_inputs(batch: dict[str, jax.Array]) -> dict[str, Any]:
  """Model keyword arguments for the media of `batch`, rows flattened."""

  def rows_flattened(key):
    value = jnp.asarray(batch[key])
    return value.reshape(-1, *value.shape[2:])

  inputs = {}
  if IMAGE_KEYS[0] in batch:
    inputs['images'] = tuple(rows_flattened(key) for key in IMAGE_KEYS)
  if AUDIO_KEYS[0] in batch:
    inputs['audio'] = tuple(rows_flattened(key) for key in AUDIO_KEYS)
  return inputs


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
      `gemma4_jax.training.data` yields them. A batch with media also
      holds each row's images (`IMAGE_KEYS`) or clips (`AUDIO_KEYS`), in
      the order of the row's placeholder runs. Targets that are soft-token
      placeholders (negative ids) never count: their weight is zero.
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
      **_media_inputs(batch),
  )
  # A soft-token placeholder is no token of the vocabulary to predict.
  targets = jnp.asarray(batch['targets'])
  is_placeholder = targets < 0
  targets = jnp.where(is_placeholder, 0, targets)
  loss_weights = jnp.where(is_placeholder, 0.0, batch['loss_weights'])
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
      targets,
      loss_weights,
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
