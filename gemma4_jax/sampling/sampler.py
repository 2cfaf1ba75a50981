"""Compiled prefill and decode steps, token sampling and the generation loop.

`make_steps(model)` returns the jit-compiled step functions, for anyone who
writes their own loop. `Sampler` runs batches of prompts of different
lengths through them, streams tokens as a Python generator, stops on end
tokens or stop strings, and keeps the cache between chat turns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax.audio import features as audio_features
from gemma4_jax.audio import merge as audio_merge
from gemma4_jax.sampling.cache import KVCache, init_cache
from gemma4_jax.transformer import Transformer
from gemma4_jax.vision import merge as merge_lib
from gemma4_jax.vision import preprocess as preprocess_lib

logger = logging.getLogger(__name__)


# Prompt chunks are padded to a multiple of this many tokens, and default
# cache lengths rounded up to a multiple of CACHE_BUCKET, so that calls with
# similar lengths reuse compiled steps.
PROMPT_BUCKET = 64
CACHE_BUCKET = 256


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Settings that choose the next token from the logits.

  Attributes:
    temperature: 0 picks the most likely token (greedy); otherwise logits
      are divided by it before sampling.
    top_k: Sample among the k most likely tokens only (None: all).
    top_p: Sample among the most likely tokens whose probabilities sum to at
      least p (nucleus sampling; None: all).
  """

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature={self.temperature} must be >= 0')
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f'top_k={self.top_k} must be >= 1 or None')
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p={self.top_p} must be in (0, 1] or None')

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingParams()


def sample_tokens(
    logits: jax.Array, rng: jax.Array, sampling: SamplingParams
) -> jax.Array:
  """Choose one token per row of `logits` [B, V]; returns [B] int32."""
  logits = logits.astype(jnp.float32)
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  logits = logits / sampling.temperature
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass before it is below p (the first always).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class StepFunctions:
  """The compiled steps of one model (see `make_steps`)."""

  prefill: Callable[..., Any] = flax.struct.field(pytree_node=False)
  extend: Callable[..., Any] = flax.struct.field(pytree_node=False)
  decode: Callable[..., Any] = flax.struct.field(pytree_node=False)
  decode_loop: Callable[..., Any] = flax.struct.field(pytree_node=False)


def make_steps(
    model: Transformer,
    sampling: SamplingParams = GREEDY,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
):
  """Compile the prefill, extend and decode steps of `model`.

  - `prefill(params, tokens [B, T], input_mask [B, T], cache, images=None,
    audio=None)`
    fills an empty cache with right-padded prompts and returns (logits
    [B, V] of each row's last token, cache). `images` is (patches,
    positions_xy) of the images whose placeholders are in `tokens` (see
    `Transformer.cached`). `audio` is (waveforms, lengths, soft-token
    counts) of the clips whose placeholders are in `tokens`.
  - `extend(params, tokens, input_mask, cache)` does the same for a chunk that
    continues a filled cache (the next turn of a chat).
  - `decode(params, tokens [B], active [B], cache, rng)` feeds one token per
    active row and returns (next tokens [B], logits [B, V], cache).

  The cache argument is donated: its buffers are reused for the result.

  With `mesh`, each step is jitted with explicit input and output shardings
  from the logical-axis `rules`: parameters by `parallel.rules`, rows of
  tokens, masks, logits and generated tokens over the `batch` axes, the
  cache by `parallel.placement.cache_shardings` (rows over the `batch` axes,
  KV heads over `kv_heads`) in and out, so it keeps its layout from step to
  step; media and RNG keys replicated. Arguments are moved to those
  shardings when they are elsewhere, and the model's activations follow the
  rules (`parallel.rules.constrain`).
  """
  def run(params, tokens, input_mask, cache, mode, images=None, audio=None):
    return model.apply(
        {'params': params},
        tokens,
        cache,
        input_mask=input_mask,
        mode=mode,
        last_only=True,
        images=images,
        audio=audio,
        method=Transformer.cached,
    )

  def prefill_fn(params, tokens, input_mask, cache, images=None, audio=None):
    return run(params, tokens, input_mask, cache, 'fresh', images, audio)

  def extend_fn(params, tokens, input_mask, cache, images=None, audio=None):
    return run(params, tokens, input_mask, cache, 'extend', images, audio)

  def decode_fn(params, tokens, active, cache, rng):
    logits, cache = run(
        params, tokens[:, None], active[:, None], cache, mode='extend'
    )
    return sample_tokens(logits, rng, sampling), logits, cache

  def decode_loop_fn(
      params, first_tokens, cache, rng, max_new_tokens, stop_ids
  ):
    """Generate `max_new_tokens` tokens in one compiled loop.

    `first_tokens` [B] are the tokens sampled from the prefill logits. Rows
    stop after a token in `stop_ids` (kept); later slots hold -1. Returns
    (tokens [B, max_new_tokens], cache). The last token of each row is not
    fed to the model, as in the step-by-step loop.
    """
    batch = first_tokens.shape[0]
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
    out = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    out = out.at[:, 0].set(first_tokens)
    active = ~jnp.isin(first_tokens, stops)

    def cond(carry):
      step, _, _, active, _, _ = carry
      return (step < max_new_tokens) & jnp.any(active)

    def body(carry):
      step, tokens, out, active, cache, rng = carry
      rng, step_rng = jax.random.split(rng)
      new_tokens, _, cache = decode_fn(params, tokens, active, cache, step_rng)
      new_tokens = jnp.where(active, new_tokens, -1)
      out = out.at[:, step].set(new_tokens)
      active = active & ~jnp.isin(new_tokens, stops)
      return step + 1, new_tokens, out, active, cache, rng

    carry = (jnp.asarray(1), first_tokens, out, active, cache, rng)
    _, _, out, _, cache, _ = jax.lax.while_loop(cond, body, carry)
    return out, cache

  if mesh is None:
    chunk_steps = [
        jax.jit(fn, donate_argnames=('cache',))
        for fn in (prefill_fn, extend_fn, decode_fn)
    ]
    decode_loop = jax.jit(
        decode_loop_fn,
        static_argnames=('max_new_tokens', 'stop_ids'),
        donate_argnames=('cache',),
    )
    return StepFunctions(*chunk_steps, decode_loop=decode_loop)

  # Imported here: single-device sampling does not need the parallel code.
  from gemma4_jax.parallel import placement  # pylint: disable=g-import-not-at-top
  from gemma4_jax.parallel import rules as rules_lib  # pylint: disable=g-import-not-at-top

  rules = rules_lib.DEFAULT_RULES if rules is None else rules

  def shardings(kind, tree):
    if kind == 'params':
      return placement.tree_shardings(tree, mesh, rules)
    if kind == 'rows':
      return placement.batch_shardings(tree, mesh, rules)
    if kind == 'cache':
      return placement.cache_shardings(tree, mesh, rules)
    return jax.tree.map(lambda _: placement.replicated(mesh), tree)

  def row_array(batch, *rest):
    # Only the shape matters: it picks the sharding of a row-split output.
    return jax.ShapeDtypeStruct((batch, *rest), jnp.float32)

  def sharded(fn, in_kinds, out_shapes, static_argnames=()):
    """Jit `fn` with the shardings of the rules for its argument kinds.

    `in_kinds` names each positional argument 'params', 'rows' (leading
    batch axis), 'cache' or 'replicated' (media, RNG keys). `out_shapes(args,
    static)` gives (kind, shape tree) per output. The shardings depend on
    the argument shapes, so each new shape compiles once. Arguments are
    moved to their shardings (a no-op for arrays already placed), and the
    mesh and activation rules are set while the step traces and runs.
    Positional arguments after those of `in_kinds` fill `static_argnames`.
    """
    compiled = {}

    def call(*args, **static):
      static.update(zip(static_argnames, args[len(in_kinds):]))
      args = args[: len(in_kinds)]
      key = (
          jax.tree.structure(args),
          tuple(getattr(x, 'shape', None) for x in jax.tree.leaves(args)),
          tuple(sorted(static.items())),
      )
      if key not in compiled:
        in_shardings = tuple(
            shardings(kind, arg) for kind, arg in zip(in_kinds, args)
        )
        out_shardings = tuple(
            shardings(kind, shape) for kind, shape in out_shapes(args, static)
        )
        compiled[key] = (
            jax.jit(
                functools.partial(fn, **static),
                in_shardings=in_shardings,
                out_shardings=out_shardings,
                donate_argnums=in_kinds.index('cache'),
            ),
            in_shardings,
        )
      jitted, in_shardings = compiled[key]
      args = jax.device_put(args, in_shardings)
      with jax.set_mesh(mesh), rules_lib.activation_rules(mesh, rules):
        return jitted(*args)

    return call

  vocab = model.config.vocab_size
  chunk_kinds = ('params', 'rows', 'rows', 'cache', 'replicated', 'replicated')

  def chunk_out(args, _):
    return (('rows', row_array(args[1].shape[0], vocab)), ('cache', args[3]))

  def decode_out(args, _):
    batch = args[1].shape[0]
    return (
        ('rows', row_array(batch)),
        ('rows', row_array(batch, vocab)),
        ('cache', args[3]),
    )

  def decode_loop_out(args, static):
    batch = args[1].shape[0]
    return (
        ('rows', row_array(batch, static['max_new_tokens'])),
        ('cache', args[2]),
    )

  return StepFunctions(
      prefill=sharded(prefill_fn, chunk_kinds, chunk_out),
      extend=sharded(extend_fn, chunk_kinds, chunk_out),
      decode=sharded(
          decode_fn, ('params', 'rows', 'rows', 'cache', 'replicated'),
          decode_out,
      ),
      decode_loop=sharded(
          decode_loop_fn, ('params', 'rows', 'cache', 'replicated'),
          decode_loop_out, static_argnames=('max_new_tokens', 'stop_ids'),
      ),
  )


@dataclasses.dataclass
class GenerationState:
  """Cache and pending tokens that let a later turn continue a conversation.

  Attributes:
    cache: The KV cache after the last generated token was stored.
    pending: [B] the last generated token of each row, not yet in the cache.
  """

  cache: KVCache
  pending: np.ndarray


@dataclasses.dataclass
class Generation:
  """Result of `Sampler.generate`.

  Attributes:
    tokens: Per prompt, the generated token ids (the stop token included).
    texts: Per prompt, the decoded text (None without a tokenizer).
    state: The state to pass to the next turn.
  """

  tokens: list[list[int]]
  texts: list[str] | None
  state: GenerationState


class Sampler:
  """Generate text with a Gemma 4 decoder and its KV cache.

  Args:
    model: The decoder module.
    params: Its parameters.
    tokenizer: A `gemma4_jax.text.Tokenizer`; needed for text prompts, stop
      strings, decoded texts and the default stop tokens.
    cache_dtype: Dtype of the cache; defaults to the model's dtype.
    mesh: Run sharded on this mesh (`parallel.mesh.make_mesh`): the
      parameters are placed once by the logical-axis `rules` (default
      `parallel.rules.DEFAULT_RULES`), prompt rows and the KV cache are
      split over the `batch` axes, and KV heads over `kv_heads` where they
      divide.
    rules: Logical-axis rules for `mesh`.
  """

  def __init__(
      self,
      model: Transformer,
      params: Any,
      tokenizer: Any = None,
      cache_dtype: Any = None,
      *,
      mesh: jax.sharding.Mesh | None = None,
      rules: Any = None,
  ):
    self.model = model
    self.tokenizer = tokenizer
    self.cache_dtype = cache_dtype or model.dtype
    self.mesh = mesh
    self.rules = rules
    self._steps: dict[SamplingParams, StepFunctions] = {}
    if mesh is not None:
      from gemma4_jax.parallel import placement  # pylint: disable=g-import-not-at-top
      from gemma4_jax.parallel import rules as rules_lib  # pylint: disable=g-import-not-at-top

      self.rules = rules_lib.DEFAULT_RULES if rules is None else rules
      params = jax.device_put(
          params, placement.tree_shardings(params, mesh, self.rules)
      )
    self.params = params

  def _place_rows(self, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Put arrays with leading batch axis on the device(s)."""
    if self.mesh is None:
      return tuple(jnp.asarray(a) for a in arrays)
    from gemma4_jax.parallel import placement  # pylint: disable=g-import-not-at-top

    shardings = placement.batch_shardings(
        {str(i): a for i, a in enumerate(arrays)}, self.mesh, self.rules
    )
    return tuple(
        jax.device_put(a, shardings[str(i)]) for i, a in enumerate(arrays)
    )

  def _place_cache(self, cache: KVCache) -> KVCache:
    if self.mesh is None:
      return cache
    from gemma4_jax.parallel import placement  # pylint: disable=g-import-not-at-top

    return jax.device_put(
        cache, placement.cache_shardings(cache, self.mesh, self.rules)
    )

  @property
  def last_state(self) -> GenerationState | None:
    """State after the last `generate` or fully consumed `stream` call."""
    return getattr(self, '_last_state', None)

  def steps(self, sampling: SamplingParams) -> StepFunctions:
    if sampling not in self._steps:
      self._steps[sampling] = make_steps(
          self.model, sampling, mesh=self.mesh, rules=self.rules
      )
    return self._steps[sampling]

  def default_stop_ids(self) -> tuple[int, ...]:
    """End of text, end of turn, and the start of a tool response."""
    if self.tokenizer is None:
      return ()
    special = self.tokenizer.special
    ids = (special.eos, special.end_of_turn, special.start_of_tool_response)
    return tuple(i for i in ids if i is not None)

  def _encode(self, prompts, add_bos: bool) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
      if isinstance(prompt, str):
        if self.tokenizer is None:
          raise ValueError(
              'a text prompt needs a tokenizer; pass tokenizer= to Sampler or'
              ' give token ids'
          )
        encoded.append(list(self.tokenizer.encode(prompt, add_bos=add_bos)))
      else:
        encoded.append([int(t) for t in prompt])
      if not encoded[-1]:
        raise ValueError('empty prompt: give at least one token')
    return encoded

  def stream(
      self,
      prompts: Sequence[str | Sequence[int]],
      *,
      max_new_tokens: int,
      sampling: SamplingParams = GREEDY,
      seed: int = 0,
      stop_ids: Sequence[int] | None = None,
      stop_strings: Sequence[str] = (),
      cache_length: int | None = None,
      state: GenerationState | None = None,
      add_bos: bool | None = None,
      images: Sequence[Sequence[preprocess_lib.ImageLike]] | None = None,
      image_budget: int = preprocess_lib.DEFAULT_SOFT_TOKEN_BUDGET,
      audio: Sequence[Sequence[audio_features.AudioLike]] | None = None,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens [B], active [B]) after each step; see `generate`."""
    return self._run(
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        cache_length=cache_length,
        state=state,
        add_bos=add_bos,
        images=images,
        image_budget=image_budget,
        audio=audio,
    )

  def generate(
      self,
      prompts: Sequence[str | Sequence[int]],
      *,
      max_new_tokens: int,
      sampling: SamplingParams = GREEDY,
      seed: int = 0,
      stop_ids: Sequence[int] | None = None,
      stop_strings: Sequence[str] = (),
      cache_length: int | None = None,
      state: GenerationState | None = None,
      add_bos: bool | None = None,
      images: Sequence[Sequence[preprocess_lib.ImageLike]] | None = None,
      image_budget: int = preprocess_lib.DEFAULT_SOFT_TOKEN_BUDGET,
      audio: Sequence[Sequence[audio_features.AudioLike]] | None = None,
  ) -> Generation:
    """Generate up to `max_new_tokens` tokens for each prompt.

    Args:
      prompts: Texts (need a tokenizer) or lists of token ids, of any
        lengths; they run as one right-padded batch.
      max_new_tokens: Tokens to generate at most per prompt.
      sampling: Greedy by default; temperature, top-k and top-p otherwise.
      seed: Seed of the sampling randomness.
      stop_ids: Tokens that end a row (kept in its output); defaults to
        `<eos>`, `<turn|>` and `<|tool_response>` of the tokenizer.
      stop_strings: Texts that end a row once they appear in its output.
      cache_length: Tokens the cache stores per row; defaults to the longest
        prompt plus `max_new_tokens`, rounded up to a multiple of
        CACHE_BUCKET. With `state`, the previous turn's cache length is kept.
      state: The state of the previous turn, to continue its conversation.
      add_bos: Prepend `<bos>` to text prompts; defaults to True for a new
        conversation and False when continuing one.
      images: Per prompt, its images (paths, PIL images or arrays) in the
        order of its `<|image|>` marks, one image per mark. Each mark becomes
        the image's soft tokens framed by `<|image>` and `<image|>`. Needs a
        model with a vision encoder and a tokenizer.
      image_budget: Soft tokens per image at most (70, 140, 280, 560 or
        1120); images keep their aspect ratio within it.
      audio: Per prompt, its audio clips (paths, 16 kHz arrays or
        (samples, sample_rate) pairs) in the order of its `<|audio|>` marks,
        one clip per mark. Each mark becomes the clip's soft tokens (one per
        40 ms) framed by `<|audio>` and `<audio|>`. Needs a model with an
        audio encoder (E2B, E4B) and a tokenizer.

    Returns:
      The generated tokens, texts and the state for a next turn.
    """
    if not stop_strings:
      return self._generate_fused(
          prompts,
          max_new_tokens=max_new_tokens,
          sampling=sampling,
          seed=seed,
          stop_ids=stop_ids,
          cache_length=cache_length,
          state=state,
          add_bos=add_bos,
        images=images,
        image_budget=image_budget,
        audio=audio,
      )
    rows: list[list[int]] | None = None
    state_out = None
    steps = self._run(
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        cache_length=cache_length,
        state=state,
        add_bos=add_bos,
        images=images,
        image_budget=image_budget,
        audio=audio,
    )
    for tokens, active in steps:
      if rows is None:
        rows = [[] for _ in range(len(tokens))]
      for row, (token, is_active) in enumerate(zip(tokens, active)):
        if is_active:
          rows[row].append(int(token))
    state_out = self._last_state
    texts = None
    if self.tokenizer is not None:
      texts = [self.tokenizer.decode(r) for r in rows]
    return Generation(tokens=rows, texts=texts, state=state_out)

  def _generate_fused(
      self, prompts, *, max_new_tokens, sampling, seed, stop_ids,
      cache_length, state, add_bos, images, image_budget, audio,
  ) -> Generation:
    """`generate` without stop strings: the whole decode is one compiled loop."""
    logits, cache, stop_ids, steps = self._start(
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        stop_strings=(),
        cache_length=cache_length,
        state=state,
        add_bos=add_bos,
        images=images,
        image_budget=image_budget,
        audio=audio,
    )
    rng, step_rng = jax.random.split(jax.random.key(seed))
    first = sample_tokens(logits, step_rng, sampling)
    out, cache = steps.decode_loop(
        self.params, first, cache, rng, max_new_tokens, stop_ids
    )
    out = np.asarray(out)

    rows = [[int(t) for t in row if t >= 0] for row in out]
    pending = np.array([r[-1] for r in rows], np.int32)
    state_out = GenerationState(cache=cache, pending=pending)
    self._last_state = state_out
    texts = None
    if self.tokenizer is not None:
      texts = [self.tokenizer.decode(r) for r in rows]
    return Generation(tokens=rows, texts=texts, state=state_out)

  def _start(
      self,
      prompts,
      *,
      max_new_tokens: int,
      sampling: SamplingParams,
      stop_ids,
      stop_strings,
      cache_length,
      state,
      add_bos,
      images,
      image_budget,
      audio,
  ) -> tuple[Any, KVCache, tuple[int, ...], StepFunctions]:
    """Encode, check lengths, prefill; return (logits, cache, stop ids, steps)."""
    if isinstance(prompts, str):
      raise TypeError('prompts must be a list; wrap one prompt as [prompt]')
    if max_new_tokens < 1:
      raise ValueError(f'max_new_tokens={max_new_tokens} must be at least 1')
    if stop_strings and self.tokenizer is None:
      raise ValueError('stop_strings need a tokenizer; pass tokenizer=')
    if add_bos is None:
      add_bos = state is None
    encoded = self._encode(prompts, add_bos)
    batch = len(encoded)
    image_arrays = None
    if images is not None:
      encoded, image_batch = self._expand_images(encoded, images, image_budget)
      if image_batch is not None:
        image_arrays = (
            jnp.asarray(image_batch.patches),
            jnp.asarray(image_batch.positions_xy),
        )
    audio_arrays = None
    if audio is not None:
      encoded, audio_batch = self._expand_audio(encoded, audio)
      if audio_batch is not None:
        audio_arrays = tuple(jnp.asarray(a) for a in audio_batch.arrays())
    if state is not None:
      if state.cache.batch_size != batch:
        raise ValueError(
            f'the previous turn had {state.cache.batch_size} rows but'
            f' {batch} prompts were given; continue with one prompt per row'
        )
      # The last generated token of the previous turn was never stored.
      encoded = [
          [int(p)] + e if p >= 0 else e
          for p, e in zip(state.pending, encoded)
      ]

    prompt_length = max(len(e) for e in encoded)
    used = 0 if state is None else int(np.max(np.asarray(state.cache.lengths)))
    needed = used + prompt_length + max_new_tokens
    if state is not None:
      cache_length = state.cache.max_length
    elif cache_length is None:
      cache_length = _round_up(prompt_length + max_new_tokens, CACHE_BUCKET)
    if needed > cache_length:
      raise ValueError(
          f'prompt of {used + prompt_length} tokens plus max_new_tokens='
          f'{max_new_tokens} needs {needed} cache positions, but the cache'
          f' holds {cache_length}; raise cache_length or shorten the prompt'
      )

    # Padding the chunk to a bucket lets prompts of similar lengths share one
    # compiled prefill; padding is neither stored nor attended to.
    padded_length = _round_up(prompt_length, PROMPT_BUCKET)
    tokens = np.zeros((batch, padded_length), np.int32)
    input_mask = np.zeros((batch, padded_length), bool)
    for row, ids in enumerate(encoded):
      tokens[row, : len(ids)] = ids
      input_mask[row, : len(ids)] = True

    steps = self.steps(sampling)
    tokens, input_mask = self._place_rows(tokens, input_mask)
    logits, cache = self._prefill(
        steps, tokens, input_mask, batch, cache_length, state,
        image_arrays, audio_arrays,
    )
    stop_ids = tuple(self.default_stop_ids() if stop_ids is None else stop_ids)
    return logits, cache, stop_ids, steps

  def _prefill(
      self, steps, tokens, input_mask, batch, cache_length, state,
      image_arrays, audio_arrays,
  ):
    if state is None:
      cache = self._place_cache(
          init_cache(self.model.config, batch, cache_length, self.cache_dtype)
      )
      logits, cache = steps.prefill(
          self.params,
          tokens,
          input_mask,
          cache,
          image_arrays,
          audio_arrays,
      )
    else:
      logits, cache = steps.extend(
          self.params,
          tokens,
          input_mask,
          state.cache,
          image_arrays,
          audio_arrays,
      )
    return logits, cache

  def _expand_images(
      self,
      encoded: list[list[int]],
      images: Sequence[Sequence[preprocess_lib.ImageLike]],
      budget: int,
  ) -> tuple[list[list[int]], preprocess_lib.ImageBatch | None]:
    """Preprocess the images and expand each row's image marks.

    Returns:
      The expanded token rows, and the images of all rows in order (None
      when no row has one).
    """
    if self.model.config.vision is None:
      raise ValueError(
          f'images were given but model config {self.model.config.name!r} has'
          ' no vision encoder; build it with config.with_vision(config)'
      )
    if self.tokenizer is None:
      raise ValueError(
          'images need a tokenizer to find the image marks; pass tokenizer='
          ' to Sampler'
      )
    if isinstance(images, (str, bytes)) or len(images) != len(encoded):
      raise ValueError(
          f'images must hold one list of images per prompt ({len(encoded)}'
          ' prompts); pass [] for a prompt without images'
      )
    ids = merge_lib.image_token_ids(self.tokenizer)
    flat_images = []
    for row, (tokens, row_images) in enumerate(zip(encoded, images)):
      marks = tokens.count(ids['image_token'])
      if marks != len(row_images):
        raise ValueError(
            f'prompt {row} has {marks} `<|image|>` marks but'
            f' {len(row_images)} images; put one mark where each image goes'
        )
      flat_images.extend(row_images)
    if not flat_images:
      return encoded, None

    batch = preprocess_lib.preprocess_images(flat_images, budget)
    counts = []
    start = 0
    for row_images in images:
      counts.append(batch.soft_token_counts[start : start + len(row_images)])
      start += len(row_images)
    lengths = [len(tokens) for tokens in encoded]
    padded = np.zeros((len(encoded), max(lengths)), np.int32)
    for row, tokens in enumerate(encoded):
      padded[row, : len(tokens)] = tokens
    # Each mark adds its soft tokens plus 4 framing tokens, minus itself.
    expanded = merge_lib.expand_image_placeholders(padded, counts, **ids)
    rows = [
        expanded[row, : lengths[row] + sum(c + 3 for c in counts[row])]
        for row in range(len(encoded))
    ]
    return [row.tolist() for row in rows], batch

  def _expand_audio(
      self,
      encoded: list[list[int]],
      audio: Sequence[Sequence[audio_features.AudioLike]],
  ) -> tuple[list[list[int]], audio_features.AudioBatch | None]:
    """Load the clips and expand each row's audio marks.

    Returns:
      The expanded token rows, and the clips of all rows in order (None
      when no row has one).
    """
    if self.model.config.audio is None:
      raise ValueError(
          f'audio was given but model config {self.model.config.name!r} has'
          ' no audio encoder (only E2B and E4B have one); build it with'
          ' config.with_audio(config)'
      )
    if self.tokenizer is None:
      raise ValueError(
          'audio needs a tokenizer to find the audio marks; pass tokenizer='
          ' to Sampler'
      )
    if isinstance(audio, (str, bytes)) or len(audio) != len(encoded):
      raise ValueError(
          f'audio must hold one list of clips per prompt ({len(encoded)}'
          ' prompts); pass [] for a prompt without audio'
      )
    ids = audio_merge.audio_token_ids(self.tokenizer)
    flat_clips = []
    for row, (tokens, row_clips) in enumerate(zip(encoded, audio)):
      marks = tokens.count(ids['audio_token'])
      if marks != len(row_clips):
        raise ValueError(
            f'prompt {row} has {marks} `<|audio|>` marks but'
            f' {len(row_clips)} audio clips; put one mark where each clip goes'
        )
      flat_clips.extend(row_clips)
    if not flat_clips:
      return encoded, None

    batch = audio_features.prepare_audio(flat_clips)
    rows = []
    start = 0
    for tokens, row_clips in zip(encoded, audio):
      counts = batch.soft_token_counts[start : start + len(row_clips)]
      start += len(row_clips)
      expanded = audio_merge.expand_audio_placeholders(
          np.array([tokens], np.int32), [counts], **ids
      )
      rows.append(expanded[0].tolist())
    return rows, batch

  def _run(
      self,
      prompts,
      *,
      max_new_tokens: int,
      sampling: SamplingParams,
      seed: int,
      stop_ids,
      stop_strings,
      cache_length,
      state,
      add_bos,
      images,
      image_budget,
      audio,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    logits, cache, stop_ids, steps = self._start(
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        cache_length=cache_length,
        state=state,
        add_bos=add_bos,
        images=images,
        image_budget=image_budget,
        audio=audio,
    )
    batch = logits.shape[0]
    rng = jax.random.key(seed)
    rng, step_rng = jax.random.split(rng)
    next_tokens = np.asarray(sample_tokens(logits, step_rng, sampling))
    active = np.ones((batch,), bool)
    generated = [[] for _ in range(batch)]

    for step in range(max_new_tokens):
      yield next_tokens.copy(), active.copy()

      for row in np.flatnonzero(active):
        token = int(next_tokens[row])
        generated[row].append(token)
        if token in stop_ids:
          active[row] = False
        elif stop_strings:
          text = self.tokenizer.decode(generated[row])
          if any(s in text for s in stop_strings):
            active[row] = False
      feed = active.copy()
      if not active.any() or step == max_new_tokens - 1:
        break
      rng, step_rng = jax.random.split(rng)
      new_tokens, _, cache = steps.decode(
          self.params,
          jnp.asarray(next_tokens),
          jnp.asarray(feed),
          cache,
          step_rng,
      )
      next_tokens = np.where(active, np.asarray(new_tokens), 0)

    # Each row's last token (a stop token or the last of max_new_tokens) was
    # never fed to the model: the next turn starts with it.
    pending = np.array([r[-1] if r else -1 for r in generated], np.int32)
    self._last_state = GenerationState(cache=cache, pending=pending)
