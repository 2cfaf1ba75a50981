"""The work behind `gemma4-jax generate` and `gemma4-jax chat`.

`cli.py` parses the arguments, and this module resolves the model config,
tokenizer and checkpoint, runs the sampler and formats its output. Problems
the user can fix raise `CommandError`, which the CLI prints as one
`error: ...` line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from gemma4_jax import checkpoint
from gemma4_jax import config as config_lib
from gemma4_jax import text as text_lib
from gemma4_jax.text import chat as chat_lib
from gemma4_jax.sampling import sampler as sampler_lib
from gemma4_jax.transformer import Transformer
from gemma4_jax.audio import encoder as audio_encoder
from gemma4_jax.audio import features as audio_features
from gemma4_jax.vision import encoder as vision_lib
from gemma4_jax.vision import preprocess as preprocess_lib

logger = logging.getLogger(__name__)

# Exit statuses: 2 for arguments that do not fit together, 1 otherwise.
EXIT_FAILURE = 1
EXIT_USAGE = 2

# The 26B-A4B and 31B chat templates close an empty thought in the
# generation prompt when thinking is off; the E2B and E4B templates do not.
_EMPTY_THOUGHT_PRESETS = ('26b_a4b', '31b')

_DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}


class CommandError(Exception):
  """A problem the user can fix, printed as one line without a traceback."""

  def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
    super().__init__(message)
    self.exit_code = exit_code


# ---------------------------------------------------------------------------
# Model, tokenizer and parameters.


def config_from_json(path: Path) -> config_lib.Gemma4Config:
  """Build a `Gemma4Config` from a JSON object of its fields.

  `attention_pattern` is a list of 'local' and 'global'.
  """
  try:
    fields = json.loads(path.read_text())
  except OSError as error:
    raise CommandError(
        f'cannot read the model config {path}: {error.strerror}; check the'
        ' --model path', EXIT_USAGE
    ) from error
  except json.JSONDecodeError as error:
    raise CommandError(
        f'model config {path} is not valid JSON ({error}); write a JSON'
        ' object of Gemma4Config fields', EXIT_USAGE
    ) from error
  if not isinstance(fields, dict):
    raise CommandError(
        f'model config {path} contains a JSON {type(fields).__name__}, but it'
        ' must be a JSON object of Gemma4Config fields', EXIT_USAGE
    )

  known = {field.name for field in dataclasses.fields(config_lib.Gemma4Config)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise CommandError(
        f'model config {path} has unknown fields {unknown}; Gemma4Config'
        f' fields are {sorted(known)}', EXIT_USAGE
    )
  if 'attention_pattern' in fields:
    try:
      fields['attention_pattern'] = tuple(
          config_lib.AttentionKind(kind) for kind in fields['attention_pattern']
      )
    except (TypeError, ValueError) as error:
      raise CommandError(
          f'model config {path}: attention_pattern='
          f'{fields["attention_pattern"]!r} is invalid; give a list of'
          " 'local' and 'global'", EXIT_USAGE
      ) from error
  if isinstance(fields.get('vision'), dict):
    try:
      fields['vision'] = vision_lib.VisionConfig(**fields['vision'])
    except (TypeError, ValueError) as error:
      raise CommandError(
          f'model config {path}: vision={fields["vision"]!r} is invalid'
          f' ({error}); give an object of VisionConfig fields or null',
          EXIT_USAGE,
      ) from error
  if isinstance(fields.get('audio'), dict):
    try:
      fields['audio'] = audio_encoder.AudioConfig(**fields['audio'])
    except (TypeError, ValueError) as error:
      raise CommandError(
          f'model config {path}: audio={fields["audio"]!r} is invalid'
          f' ({error}); give an object of AudioConfig fields or null',
          EXIT_USAGE,
      ) from error
  fields.setdefault('name', path.stem)
  try:
    return config_lib.Gemma4Config(**fields)
  except (TypeError, ValueError) as error:
    raise CommandError(f'model config {path}: {error}', EXIT_USAGE) from error


MODEL_CONFIG_FILE = 'model_config.json'


def config_to_json(cfg: config_lib.Gemma4Config) -> str:
  """Serialise a config as the JSON object that `config_from_json` reads."""
  fields = dataclasses.asdict(cfg)
  fields['attention_pattern'] = [kind.value for kind in cfg.attention_pattern]
  return json.dumps(fields, indent=1)


def resolve_config(model: str | None, ckpt: Path) -> config_lib.Gemma4Config:
  """Return the config named by `--model`, else the checkpoint's own.

  `model` is a preset name or a path to a JSON file of `Gemma4Config` fields.
  Without it, a `model_config.json` next to the checkpoint directory (as
  the fine-tuning export writes) gives the config; otherwise the preset
  that the checkpoint's shapes fit.
  """
  if model is None and (ckpt.parent / MODEL_CONFIG_FILE).is_file():
    model = str(ckpt.parent / MODEL_CONFIG_FILE)
  if model is not None:
    if model.endswith('.json'):
      return config_from_json(Path(model))
    try:
      return config_lib.get_preset(model)
    except ValueError as error:
      raise CommandError(
          f'{error}, or pass a .json file of Gemma4Config fields', EXIT_USAGE
      ) from error

  try:
    return checkpoint.config_from_checkpoint(ckpt)
  except checkpoint.UnknownVariantError as error:
    # The full report of differing shapes is long, so it goes to the log.
    logger.info('variant detection of %s failed: %s', ckpt, error)
    raise CommandError(
        f'checkpoint {ckpt} fits none of the presets'
        f' {sorted(config_lib.PRESETS)}, so its model cannot be detected;'
        ' pass --model PRESET, or --model CONFIG.json with the Gemma4Config'
        ' fields of a custom model (run with -v for the shape differences)'
    ) from error


def resolve_tokenizer(
    tokenizer_path: str | None, files: checkpoint.CheckpointFiles
) -> text_lib.Tokenizer:
  """Load `--tokenizer`, else the `tokenizer.model` beside the checkpoint."""
  if tokenizer_path is not None:
    path = Path(tokenizer_path).expanduser()
    if not path.is_file():
      raise CommandError(
          f'tokenizer {path} not found; check --tokenizer, or run'
          ' `gemma4-jax fetch-tokenizer` and pass the path it prints'
      )
  elif files.tokenizer is not None:
    path = files.tokenizer
  else:
    raise CommandError(
        f'no tokenizer.model found in or beside checkpoint {files.orbax_dir};'
        ' pass --tokenizer PATH, or run `gemma4-jax fetch-tokenizer` and pass'
        ' the path it prints'
    )
  logger.info('using tokenizer %s', path)
  try:
    return text_lib.Tokenizer(path)
  except (text_lib.TokenizerError, RuntimeError, OSError) as error:
    # SentencePiece raises RuntimeError (OSError in some versions) for a
    # file that is not a model.
    raise CommandError(
        f'cannot load tokenizer {path}: {error}; pass the Gemma 4'
        ' tokenizer.model with --tokenizer'
    ) from error


@dataclasses.dataclass
class LoadedModel:
  """Everything a generation run needs."""

  config: config_lib.Gemma4Config
  tokenizer: text_lib.Tokenizer
  sampler: sampler_lib.Sampler


@dataclasses.dataclass
class ModelSource:
  """The checkpoint, config and tokenizer, resolved before any array loads."""

  files: checkpoint.CheckpointFiles
  config: config_lib.Gemma4Config
  tokenizer: text_lib.Tokenizer


def with_vision_tower(config: config_lib.Gemma4Config) -> config_lib.Gemma4Config:
  """Return `config` with a vision encoder, for a run with `--image`."""
  if config.vision is not None:
    return config
  try:
    return config_lib.with_vision(config)
  except ValueError as error:
    raise CommandError(
        f'--image needs a vision encoder, but model {config.name!r} has none'
        ' and is not a preset; add a "vision" object of VisionConfig fields'
        ' to its JSON config', EXIT_USAGE
    ) from error


def with_audio_tower(config: config_lib.Gemma4Config) -> config_lib.Gemma4Config:
  """Return `config` with an audio encoder, for a run with `--audio`."""
  if config.audio is not None:
    return config
  try:
    return config_lib.with_audio(config)
  except ValueError as error:
    raise CommandError(
        f'--audio needs an audio encoder, but model {config.name!r} has none;'
        ' only E2B and E4B hear audio', EXIT_USAGE
    ) from error


def _load_media(paths: Sequence[str], load, flag: str) -> list[np.ndarray]:
  """Read media files with `load`; a failure is a usage error naming `flag`."""
  media = []
  for path in paths:
    try:
      media.append(load(path))
    except (OSError, ValueError) as error:
      raise CommandError(f'{flag}: {error}', EXIT_USAGE) from error
  return media


def _add_marks(
    prompt: str, count: int, mark: str, flag: str, unit: str, placement: str
) -> str:
  """Put `count` marks before `prompt`, unless it has marks (one per file).

  Raises:
    CommandError: the prompt has marks, but not `count` of them.
  """
  marks = prompt.count(mark)
  if marks == 0:
    return mark * count + prompt
  if marks != count:
    raise CommandError(
        f'the prompt has {marks} {mark} marks but {count} {flag} files were'
        f' given; put one mark per {unit}, or none to {placement} before the'
        ' text', EXIT_USAGE
    )
  return prompt


def load_audio_clips(paths: Sequence[str]) -> list[np.ndarray]:
  """Read the `--audio` files as 16 kHz mono float32 waveforms."""
  return _load_media(paths, audio_features.load_audio, '--audio')


def add_audio_marks(prompt: str, num_clips: int) -> str:
  """Put one `<|audio|>` mark per clip before `prompt`, unless it has marks.

  Raises:
    CommandError: the prompt has marks, but not one per clip.
  """
  return _add_marks(
      prompt, num_clips, chat_lib.AUDIO_MARK, '--audio', 'clip',
      'play the clips',
  )


def audio_prompt_tokens(clips: Sequence[np.ndarray]) -> int:
  """Tokens the clips add to a prompt: soft tokens plus 2 framing tokens
  per clip, minus the clip's mark."""
  return sum(audio_features.num_soft_tokens(len(clip)) + 1 for clip in clips)


def load_images(paths: Sequence[str]) -> list[np.ndarray]:
  """Read the `--image` files as [H, W, 3] uint8 arrays."""
  return _load_media(paths, preprocess_lib.load_image, '--image')


def add_image_marks(prompt: str, num_images: int) -> str:
  """Put one `<|image|>` mark per image before `prompt`, unless it has marks.

  Raises:
    CommandError: the prompt has marks, but not one per image.
  """
  return _add_marks(
      prompt, num_images, chat_lib.IMAGE_MARK, '--image', 'image',
      'show the images',
  )


def image_prompt_tokens(images: Sequence[np.ndarray], budget: int) -> int:
  """Tokens the images add to a prompt: soft tokens plus 4 framing tokens
  per image, minus the image's mark."""
  return sum(
      preprocess_lib.soft_token_count(*image.shape[:2], budget) + 3
      for image in images
  )


def resolve_source(args: argparse.Namespace) -> ModelSource:
  """Find the checkpoint, its config and tokenizer. Reads only metadata."""
  files = checkpoint.resolve_checkpoint(args.ckpt)
  config = resolve_config(args.model, files.path)
  if getattr(args, 'image', None):
    config = with_vision_tower(config)
  if getattr(args, 'audio', None):
    config = with_audio_tower(config)
  tokenizer = resolve_tokenizer(args.tokenizer, files)
  if tokenizer.vocab_size > config.vocab_size:
    raise CommandError(
        f'tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but'
        f' model {config.name!r} has vocab_size={config.vocab_size}; pass the'
        ' tokenizer of this model with --tokenizer'
    )
  return ModelSource(files=files, config=config, tokenizer=tokenizer)


def load_model(source: ModelSource, dtype_name: str) -> LoadedModel:
  """Restore the parameters and build the sampler."""
  dtype = _DTYPES[dtype_name]
  start = time.perf_counter()
  has_vision = source.config.vision is not None
  has_audio = source.config.audio is not None
  try:
    params = checkpoint.load_params(
        source.files.path,
        config=source.config,
        dtype=dtype,
        text_only=not (has_vision or has_audio),
    )
  except checkpoint.CheckpointMismatchError as error:
    if not (has_vision or has_audio):
      raise
    flags = ' and '.join(
        flag for flag, used in (('--image', has_vision), ('--audio', has_audio))
        if used
    )
    raise CommandError(
        f'{error}\nThe media need their towers; drop {flags} for a'
        ' checkpoint without them'
    ) from error
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  logger.info(
      'loaded model %r: %.3f B parameters (%s) in %.1f s',
      source.config.name,
      num_params / 1e9,
      dtype_name,
      time.perf_counter() - start,
  )
  model = Transformer(config=source.config, dtype=dtype)
  sampler = sampler_lib.Sampler(model, params, source.tokenizer)
  return LoadedModel(
      config=source.config, tokenizer=source.tokenizer, sampler=sampler
  )


def sampling_params(args: argparse.Namespace) -> sampler_lib.SamplingParams:
  """Check the sampling flags and return them as `SamplingParams`."""
  if args.temperature < 0:
    raise CommandError(
        f'--temperature {args.temperature} is negative; pass 0 for greedy'
        ' decoding or a positive value to sample', EXIT_USAGE
    )
  if args.top_k is not None and args.top_k < 1:
    raise CommandError(
        f'--top-k {args.top_k} must be at least 1; omit it to sample from'
        ' all tokens', EXIT_USAGE
    )
  if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
    raise CommandError(
        f'--top-p {args.top_p} must be in (0, 1]; omit it to sample from all'
        ' tokens', EXIT_USAGE
    )
  if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
    logger.warning('--top-k and --top-p have no effect with --temperature 0')
  return sampler_lib.SamplingParams(
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
  )


def uses_empty_thought(config: config_lib.Gemma4Config, thinking: bool) -> bool:
  return config.name in _EMPTY_THOUGHT_PRESETS and not thinking


# ---------------------------------------------------------------------------
# Output formatting.


def format_tool_call(call: text_lib.ToolCall) -> str:
  """Show a call as `name(key=value, ...)` with JSON values."""
  arguments = ', '.join(
      f'{key}={json.dumps(value, ensure_ascii=False)}'
      for key, value in call.arguments.items()
  )
  return f'{call.name}({arguments})'


def format_answer(parsed: text_lib.ParsedOutput, *, show_thinking: bool) -> str:
  """Format a parsed model turn for printing."""
  lines = []
  if show_thinking and parsed.thinking is not None:
    lines += ['<thinking>', parsed.thinking.strip(), '</thinking>']
  answer = parsed.answer.strip()
  if answer:
    lines.append(answer)
  for call in parsed.tool_calls:
    lines.append(f'tool call: {format_tool_call(call)}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------
# generate


def read_prompts_file(path: Path) -> list[str]:
  """Read one prompt per line, or JSONL records with a "prompt" field.

  The file is JSONL when its first non-empty line is a JSON object.
  """
  try:
    lines = path.read_text(encoding='utf-8').splitlines()
  except OSError as error:
    raise CommandError(
        f'cannot read --prompts-file {path}: {error.strerror}; check the path'
    ) from error
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  if not numbered:
    raise CommandError(
        f'--prompts-file {path} is empty; write one prompt per line', EXIT_USAGE
    )

  try:
    is_jsonl = isinstance(json.loads(numbered[0][1]), dict)
  except json.JSONDecodeError:
    is_jsonl = False
  if not is_jsonl:
    return [line for _, line in numbered]

  prompts = []
  for number, line in numbered:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise CommandError(
          f'line {number} of --prompts-file {path} is not JSON ({error}) but'
          ' line 1 is; write every line as {"prompt": ...} or none',
          EXIT_USAGE,
      ) from error
    if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
      raise CommandError(
          f'line {number} of --prompts-file {path} has no string "prompt"'
          ' field; write it as {"prompt": "..."}', EXIT_USAGE
      )
    prompts.append(record['prompt'])
  return prompts


def encode_prompt(
    tokenizer: text_lib.Tokenizer,
    prompt: str,
    *,
    raw: bool,
    system: str | None,
    thinking: bool,
    empty_thought: bool,
) -> list[int]:
  """Token ids of one prompt: raw text after `<bos>`, or a chat user turn."""
  if raw:
    return tokenizer.encode(prompt, add_bos=True)
  messages = []
  if system:
    messages.append({'role': 'system', 'content': system})
  messages.append({'role': 'user', 'content': prompt})
  return text_lib.encode_chat(
      tokenizer,
      messages,
      thinking=thinking,
      empty_thought_when_not_thinking=empty_thought,
  )


def _check_prompt_lengths(
    lengths: Sequence[int], max_new_tokens: int, cache_length: int | None
) -> int:
  """Return the cache length, and raise if a prompt does not fit in it."""
  needed = max(lengths) + max_new_tokens
  if cache_length is None:
    return needed
  for index, length in enumerate(lengths):
    if length + max_new_tokens > cache_length:
      raise CommandError(
          f'prompt {index + 1} is {length} tokens, which with'
          f' --max-new-tokens {max_new_tokens} needs'
          f' {length + max_new_tokens} cache positions, but --cache-length is'
          f' {cache_length}; raise --cache-length, lower --max-new-tokens or'
          ' shorten the prompt'
      )
  return cache_length


def _generation_records(
    prompts: Sequence[str],
    prompt_lengths: Sequence[int],
    rows: Sequence[Sequence[int]],
    tokenizer: text_lib.Tokenizer,
    stop_ids: Sequence[int],
) -> list[tuple[dict[str, Any], text_lib.ParsedOutput]]:
  """Return the JSONL record and the parsed output of each prompt."""
  records = []
  for prompt, prompt_length, tokens in zip(prompts, prompt_lengths, rows):
    text = tokenizer.decode(tokens)
    parsed = text_lib.parse_model_output(text)
    stopped = bool(tokens) and tokens[-1] in stop_ids
    record = {
        'prompt': prompt,
        'text': text,
        'answer': parsed.answer.strip(),
        'thinking': parsed.thinking,
        'tool_calls': [
            {'name': c.name, 'arguments': c.arguments} for c in parsed.tool_calls
        ],
        'num_tokens': len(tokens),
        'prompt_tokens': prompt_length,
        'finish_reason': 'stop' if stopped else 'length',
        'tokens': list(tokens),
    }
    records.append((record, parsed))
  return records


def run_generate(args: argparse.Namespace, stdout: TextIO = sys.stdout) -> int:
  """Generate answers for all prompts in one batch; print or write JSONL."""
  if args.prompts_file is not None:
    prompts = read_prompts_file(Path(args.prompts_file))
  else:
    prompts = list(args.prompt)
  if any(not p.strip() for p in prompts):
    raise CommandError('a prompt is empty; give some text', EXIT_USAGE)
  sampling = sampling_params(args)

  images = load_images(args.image or ())
  clips = load_audio_clips(args.audio or ())
  if clips:
    prompts = [add_audio_marks(prompt, len(clips)) for prompt in prompts]
  if images:
    prompts = [add_image_marks(prompt, len(images)) for prompt in prompts]

  source = resolve_source(args)
  empty_thought = uses_empty_thought(source.config, args.thinking)
  prompt_ids = [
      encode_prompt(
          source.tokenizer,
          prompt,
          raw=args.raw,
          system=args.system,
          thinking=args.thinking,
          empty_thought=empty_thought,
      )
      for prompt in prompts
  ]
  media_tokens = image_prompt_tokens(images, args.image_budget)
  media_tokens += audio_prompt_tokens(clips)
  lengths = [len(ids) + media_tokens for ids in prompt_ids]
  cache_length = _check_prompt_lengths(
      lengths, args.max_new_tokens, args.cache_length
  )
  logger.info(
      '%d prompts of %s tokens (%s); cache of %d positions',
      len(prompts),
      ', '.join(map(str, lengths)),
      'raw' if args.raw else 'chat format',
      cache_length,
  )

  loaded = load_model(source, args.dtype)
  rows = [[] for _ in prompts]
  start = time.perf_counter()
  first_step = None
  for tokens, active in loaded.sampler.stream(
      prompt_ids,
      max_new_tokens=args.max_new_tokens,
      sampling=sampling,
      seed=args.seed,
      cache_length=cache_length,
      images=[images] * len(prompts) if images else None,
      image_budget=args.image_budget,
      audio=[clips] * len(prompts) if clips else None,
  ):
    if first_step is None:
      first_step = time.perf_counter()
    for row in np.flatnonzero(active):
      rows[row].append(int(tokens[row]))
  _log_speed(start, first_step, sum(lengths), sum(len(r) for r in rows))

  records = _generation_records(
      prompts,
      lengths,
      rows,
      loaded.tokenizer,
      loaded.sampler.default_stop_ids(),
  )
  if args.output is not None:
    _write_jsonl(Path(args.output), [record for record, _ in records])
    print(f'wrote {len(records)} records to {args.output}', file=sys.stderr)
    return 0

  for index, (_, parsed) in enumerate(records):
    if len(records) > 1:
      print(f'--- prompt {index + 1} of {len(records)} ---', file=stdout)
    print(format_answer(parsed, show_thinking=args.show_thinking), file=stdout)
  return 0


def _log_speed(
    start: float, first_step: float | None, prompt_tokens: int, new_tokens: int
) -> None:
  end = time.perf_counter()
  first_step = end if first_step is None else first_step
  decode_seconds = end - first_step
  logger.info(
      'prefilled %d prompt tokens in %.2f s (compilation included); generated'
      ' %d tokens in %.2f s (%.1f tokens/s)',
      prompt_tokens,
      first_step - start,
      new_tokens,
      decode_seconds,
      new_tokens / decode_seconds if decode_seconds > 0 else float('nan'),
  )


def _write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
  try:
    with path.open('w', encoding='utf-8') as file:
      for record in records:
        file.write(json.dumps(record, ensure_ascii=False) + '\n')
  except OSError as error:
    raise CommandError(
        f'cannot write --output {path}: {error.strerror}; check the directory'
    ) from error


# ---------------------------------------------------------------------------
# chat


class CacheFullError(CommandError):
  """A chat turn does not fit in the remaining cache positions."""


@dataclasses.dataclass
class TurnStats:
  """Counts of one chat turn.

  Attributes:
    prefill_tokens: Tokens fed before the first new token: the new turn's
      text, plus the previous answer's last token, which the sampler had not
      stored yet.
    new_tokens: Tokens generated.
    cache_used: Cache positions in use after the turn.
  """

  prefill_tokens: int
  new_tokens: int
  cache_used: int


class ChatSession:
  """A conversation kept in the KV cache between turns.

  Each turn feeds only its own text; the earlier turns are already in the
  cache. `reset` starts a new conversation.

  NOTE: the official chat template drops earlier thoughts from the history,
  but with thinking on, they stay in this cache.
  """

  def __init__(
      self,
      sampler: sampler_lib.Sampler,
      *,
      cache_length: int,
      max_new_tokens: int,
      sampling: sampler_lib.SamplingParams = sampler_lib.GREEDY,
      seed: int = 0,
      system: str | None = None,
      thinking: bool = False,
      empty_thought: bool = False,
      images: Sequence[np.ndarray] = (),
      image_budget: int = preprocess_lib.DEFAULT_SOFT_TOKEN_BUDGET,
      audio: Sequence[np.ndarray] = (),
  ):
    if sampler.tokenizer is None:
      raise ValueError('ChatSession needs a Sampler with a tokenizer')
    self.sampler = sampler
    self.tokenizer = sampler.tokenizer
    self.cache_length = cache_length
    self.max_new_tokens = max_new_tokens
    self.sampling = sampling
    self.seed = seed
    self.system = system
    self.thinking = thinking
    self.empty_thought = empty_thought
    self.images = list(images)
    self.image_budget = image_budget
    self.audio = list(audio)
    self.turns = 0
    self.last_stats: TurnStats | None = None
    self._state: sampler_lib.GenerationState | None = None
    self._last_answer_token: int | None = None

  def reset(self) -> None:
    """Forget the conversation, so that the next turn starts a new cache."""
    self._state = None
    self._last_answer_token = None

  @property
  def cache_used(self) -> int:
    if self._state is None:
      return 0
    return int(np.max(np.asarray(self._state.cache.lengths)))

  def turn_ids(self, user_text: str) -> list[int]:
    """Return the token ids of the next turn, without the pending model token.

    The first turn of a conversation carries the session's images and
    audio clips, one `<|image|>` or `<|audio|>` mark each (expanded by the
    sampler).
    """
    if self._state is None:
      if self.audio:
        user_text = add_audio_marks(user_text, len(self.audio))
      if self.images:
        user_text = add_image_marks(user_text, len(self.images))
      messages = []
      if self.system:
        messages.append({'role': 'system', 'content': self.system})
      messages.append({'role': 'user', 'content': user_text})
      return text_lib.encode_chat(
          self.tokenizer,
          messages,
          thinking=self.thinking,
          empty_thought_when_not_thinking=self.empty_thought,
      )

    # Close the previous model turn unless the model did so itself.
    text = '' if self._last_answer_token == self.tokenizer.special.end_of_turn else '<turn|>'
    text += f'\n<|turn>user\n{user_text.strip()}<turn|>\n<|turn>model\n'
    if self.empty_thought:
      text += chat_lib.EMPTY_THOUGHT
    return self.tokenizer.encode(text, add_bos=False)

  def send(self, user_text: str) -> Iterator[int]:
    """Yield the answer's token ids as they are generated.

    Raises:
      CacheFullError: the turn does not fit in the cache; the conversation
        is unchanged, so the caller may reset it or try a shorter message.
    """
    ids = self.turn_ids(user_text)
    images = None
    if self._state is None and self.images:
      images = [self.images]
    audio = None
    if self._state is None and self.audio:
      audio = [self.audio]
    pending = 0 if self._state is None else int(self._state.pending[0] >= 0)
    prefill = len(ids) + pending
    if images:
      prefill += image_prompt_tokens(self.images, self.image_budget)
    if audio:
      prefill += audio_prompt_tokens(self.audio)
    needed = self.cache_used + prefill + self.max_new_tokens
    if needed > self.cache_length:
      raise CacheFullError(
          f'this turn needs {needed} cache positions ({self.cache_used} in use'
          f' + {prefill} for the message + max-new-tokens'
          f' {self.max_new_tokens}) but the cache holds {self.cache_length};'
          ' type /reset to start a new conversation, or restart with a larger'
          ' --cache-length'
      )

    self.turns += 1
    generated = []
    start = time.perf_counter()
    first_step = None
    for tokens, active in self.sampler.stream(
        [ids],
        max_new_tokens=self.max_new_tokens,
        sampling=self.sampling,
        seed=self.seed + self.turns,
        cache_length=self.cache_length,
        state=self._state,
        images=images,
        image_budget=self.image_budget,
        audio=audio,
    ):
      if first_step is None:
        first_step = time.perf_counter()
      if active[0]:
        generated.append(int(tokens[0]))
        yield int(tokens[0])

    # `stream` stores the state for the next turn once it is exhausted.
    self._state = self.sampler.last_state
    self._last_answer_token = generated[-1] if generated else None
    self.last_stats = TurnStats(
        prefill_tokens=prefill,
        new_tokens=len(generated),
        cache_used=self.cache_used,
    )
    logger.info(
        'turn %d: prefilled %d tokens, generated %d; cache %d of %d positions'
        ' used',
        self.turns,
        prefill,
        len(generated),
        self.cache_used,
        self.cache_length,
    )
    _log_speed(start, first_step, prefill, len(generated))


def _print_events(
    events: Sequence[Any], stdout: TextIO, show_thinking: bool, in_thought: list[bool]
) -> None:
  """Print streamed parser events; `in_thought[0]` tracks an open thought."""
  for event in events:
    if isinstance(event, text_lib.ThinkingDelta):
      if show_thinking:
        if not in_thought[0]:
          stdout.write('<thinking>\n')
          in_thought[0] = True
        stdout.write(event.text)
      continue
    if in_thought[0]:
      stdout.write('\n</thinking>\n')
      in_thought[0] = False
    if isinstance(event, text_lib.TextDelta):
      stdout.write(event.text)
    elif isinstance(event, text_lib.ToolCallEvent):
      stdout.write(f'\ntool call: {format_tool_call(event.tool_call)}\n')
  stdout.flush()


def stream_turn(
    session: ChatSession, user_text: str, stdout: TextIO, show_thinking: bool
) -> None:
  """Send one message and print the answer as it is generated."""
  detokenizer = session.tokenizer.incremental_detokenizer()
  parser = text_lib.StreamParser()
  in_thought = [False]
  for token in session.send(user_text):
    delta = detokenizer.push(token)
    if delta:
      _print_events(parser.feed(delta), stdout, show_thinking, in_thought)
  tail = parser.feed(detokenizer.flush()) + parser.finish()
  _print_events(tail, stdout, show_thinking, in_thought)
  if in_thought[0]:
    stdout.write('\n</thinking>')
  stdout.write('\n')
  stdout.flush()


_CHAT_HELP = 'type a message; /reset starts a new conversation, /exit quits'


def run_chat(
    args: argparse.Namespace,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
  """Read messages from stdin and stream the answers until /exit or EOF."""
  sampling = sampling_params(args)
  images = load_images(args.image or ())
  clips = load_audio_clips(args.audio or ())
  source = resolve_source(args)
  loaded = load_model(source, args.dtype)
  session = ChatSession(
      loaded.sampler,
      cache_length=args.cache_length,
      max_new_tokens=args.max_new_tokens,
      sampling=sampling,
      seed=args.seed,
      system=args.system,
      thinking=args.thinking,
      empty_thought=uses_empty_thought(loaded.config, args.thinking),
      images=images,
      image_budget=args.image_budget,
      audio=clips,
  )

  interactive = stdin.isatty()
  if interactive:
    print(_CHAT_HELP, file=sys.stderr)
  while True:
    if interactive:
      stdout.write('> ')
      stdout.flush()
    line = stdin.readline()
    if not line:
      break
    message = line.strip()
    if not message:
      continue
    if message == '/exit':
      break
    if message == '/reset':
      session.reset()
      print('conversation cleared', file=sys.stderr)
      continue

    try:
      stream_turn(session, message, stdout, args.show_thinking)
    except (CacheFullError, CommandError) as error:
      print(f'gemma4-jax chat: error: {error}', file=sys.stderr)
  return 0
