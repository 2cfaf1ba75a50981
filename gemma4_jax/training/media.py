"""Images and audio in fine-tuning examples.

A conversation line may hold image and audio parts, as `chat.format_chat`
takes them, with file paths (relative paths are read from the directory of
the JSONL file):

    {"messages": [
      {"role": "user", "content": [
        {"type": "image", "path": "photos/cat.jpg"},
        {"type": "audio", "path": "clips/question.wav"},
        {"type": "text", "text": "Answer the question about the photo."}]},
      {"role": "model", "content": "It is a cat."}]}

Encoding expands each `<|image|>` and `<|audio|>` mark into its placeholder
run, exactly as the sampler does, and every token it adds has loss weight 0.
Each example also carries `example_ids` (its record index plus one at every
position), which packing keeps with its tokens. After batching,
`attach_media` reads each row's media in the order of its examples and
replaces `example_ids` with fixed-shape arrays:

- `image_patches` [B, I, L, 768] float32 and `image_positions` [B, I, L, 2]
  int32, I = `MediaConfig.max_images_per_row`, L the patch count of the
  image budget; missing images have all positions -1;
- `audio_waveforms` [B, C, S] float32, `audio_lengths` [B, C] and
  `audio_counts` [B, C] int32, C = `max_clips_per_row`, S the samples of
  `max_clip_seconds`; missing clips have length S and count 0.

These are the media keys of `loss.model_loss`, and neither kind of padding
adds soft tokens. The audio encoder's last soft token of a clip depends
slightly on how much padding follows the clip, so a clip gives slightly
different soft tokens here (padded to S) than alone in the sampler.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from gemma4_jax.audio import features as audio_features
from gemma4_jax.audio import merge as audio_merge
from gemma4_jax.text import chat as chat_lib
from gemma4_jax.text.tokenizer import Tokenizer
from gemma4_jax.vision import merge as image_merge
from gemma4_jax.vision import preprocess

EXAMPLE_IDS = 'example_ids'


@dataclasses.dataclass(frozen=True)
class MediaConfig:
  """Shapes of the media arrays of a batch.

  Attributes:
    image_budget: Soft tokens per image at most (70, 140, 280, 560, 1120).
    max_images_per_row: Image slots per row. A packed row that needs more
      raises an error that names this setting.
    max_clips_per_row: Audio clip slots per row, likewise.
    max_clip_seconds: Samples per clip slot, in seconds (at most 30).
  """

  image_budget: int = preprocess.DEFAULT_SOFT_TOKEN_BUDGET
  max_images_per_row: int = 2
  max_clips_per_row: int = 2
  max_clip_seconds: float = audio_features.MAX_SECONDS

  def __post_init__(self):
    preprocess.check_budget(self.image_budget)
    if self.max_images_per_row < 0 or self.max_clips_per_row < 0:
      raise ValueError(
          f'max_images_per_row={self.max_images_per_row} and'
          f' max_clips_per_row={self.max_clips_per_row} must be 0 or more'
      )
    if not 0 < self.max_clip_seconds <= audio_features.MAX_SECONDS:
      raise ValueError(
          f'max_clip_seconds={self.max_clip_seconds} must be in (0,'
          f' {audio_features.MAX_SECONDS}]'
      )

  @property
  def clip_samples(self) -> int:
    return int(self.max_clip_seconds * audio_features.SAMPLE_RATE)


def _resolve(source: Any, base: Path) -> Any:
  if isinstance(source, str) and not Path(source).is_absolute():
    return str(base / source)
  return source


def record_media(data: dict[str, Any], jsonl_path: str) -> tuple[list, list]:
  """Return (images, clips) of a conversation's parts, in prompt order."""
  messages = data.get('messages')
  if not messages:
    return [], []
  base = Path(jsonl_path).parent
  images = [_resolve(s, base) for s in chat_lib.message_images(messages)]
  clips = [_resolve(s, base) for s in chat_lib.message_audio(messages)]
  return images, clips


@functools.lru_cache(maxsize=4096)
def _image_tokens(path: str, budget: int) -> int:
  height, width = preprocess.load_image(path).shape[:2]
  return preprocess.soft_token_count(height, width, budget)


@functools.lru_cache(maxsize=4096)
def _clip_tokens(path: str) -> int:
  return audio_features.num_soft_tokens(len(audio_features.load_audio(path)))


def expand_media_marks(
    ids: Sequence[int],
    weights: Sequence[float],
    tokenizer: Tokenizer,
    image_counts: Sequence[int],
    clip_counts: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
  """Expand the media marks of encoded ids; added tokens get weight 0.

  Each mark keeps its own weight on its first replacement token. The ids
  equal those of `vision.merge.expand_image_placeholders` followed by
  `audio.merge.expand_audio_placeholders`.
  """
  image_ids = image_merge.image_token_ids(tokenizer)
  audio_ids = audio_merge.audio_token_ids(tokenizer)
  images, clips = iter(image_counts), iter(clip_counts)
  out_ids: list[int] = []
  out_weights: list[float] = []
  for token, weight in zip(ids, weights):
    if token == image_ids['image_token']:
      run = [image_ids['double_newline'], image_ids['start_of_image']]
      run += [image_merge.SOFT_TOKEN_PLACEHOLDER] * next(images)
      run += [image_ids['end_of_image'], image_ids['double_newline']]
    elif token == audio_ids['audio_token']:
      run = [audio_ids['start_of_audio']]
      run += [audio_merge.AUDIO_SOFT_TOKEN_PLACEHOLDER] * next(clips)
      run += [audio_ids['end_of_audio']]
    else:
      out_ids.append(int(token))
      out_weights.append(float(weight))
      continue
    out_ids += run
    out_weights += [float(weight)] + [0.0] * (len(run) - 1)
  return np.asarray(out_ids, np.int32), np.asarray(out_weights, np.float32)


def encode_media(
    data: dict[str, Any],
    jsonl_path: str,
    ids: np.ndarray,
    weights: np.ndarray,
    tokenizer: Tokenizer,
    config: MediaConfig,
) -> tuple[np.ndarray, np.ndarray]:
  """Expand the media marks of one encoded conversation.

  Raises:
    ValueError: a media file cannot be read, or the example has more
      images or clips than a row has slots for.
  """
  images, clips = record_media(data, jsonl_path)
  for kind, items, limit, name in (
      ('images', images, config.max_images_per_row, 'max_images_per_row'),
      ('audio clips', clips, config.max_clips_per_row, 'max_clips_per_row'),
  ):
    if len(items) > limit:
      raise ValueError(
          f'the example has {len(items)} {kind} but {name}={limit}; raise'
          f' {name}'
      )
  for source in (*images, *clips):
    if not isinstance(source, str):
      raise ValueError(
          f'media part {source!r} is not a file path; training examples'
          ' name their images and clips by path'
      )
  image_counts = [_image_tokens(p, config.image_budget) for p in images]
  clip_counts = []
  for path in clips:
    samples = len(audio_features.load_audio(path))
    if samples > config.clip_samples:
      raise ValueError(
          f'audio clip {path!r} is {samples / audio_features.SAMPLE_RATE:.2f}'
          f' s long but max_clip_seconds={config.max_clip_seconds}; raise'
          ' max_clip_seconds or shorten the clip'
      )
    clip_counts.append(_clip_tokens(path))
  return expand_media_marks(ids, weights, tokenizer, image_counts, clip_counts)


def attach_media(
    batch: dict[str, np.ndarray],
    records: Sequence[Any],
    config: MediaConfig,
) -> dict[str, np.ndarray]:
  """Replace a batch's `example_ids` with the media arrays of its rows.

  Args:
    batch: Arrays [B, L] with `example_ids` (record index + 1, 0 on padding)
      and `segment_ids`.
    records: The `records.Record`s the indices refer to.
    config: The media shapes.

  Raises:
    ValueError: a row needs more image or clip slots than `config` has.
  """
  batch = dict(batch)
  example_ids = batch.pop(EXAMPLE_IDS)
  rows, _ = example_ids.shape
  num_patches = preprocess.max_patches_for_budget(config.image_budget)
  patch_dim = preprocess.PATCH_SIZE * preprocess.PATCH_SIZE * 3
  image_patches = np.zeros(
      (rows, config.max_images_per_row, num_patches, patch_dim), np.float32
  )
  image_positions = np.full(
      (rows, config.max_images_per_row, num_patches, 2),
      preprocess.PADDING_POSITION, np.int32,
  )
  samples = config.clip_samples
  waveforms = np.zeros((rows, config.max_clips_per_row, samples), np.float32)
  lengths = np.full((rows, config.max_clips_per_row), samples, np.int32)
  counts = np.zeros((rows, config.max_clips_per_row), np.int32)

  for row in range(rows):
    segments = batch['segment_ids'][row]
    row_images, row_clips = [], []
    for segment in range(1, int(segments.max(initial=0)) + 1):
      ids = example_ids[row][segments == segment]
      if not len(ids) or ids[0] == 0:
        continue
      record = records[int(ids[0]) - 1]
      images, clips = record_media(record.data, record.path)
      row_images += images
      row_clips += clips
    for kind, items, limit, name in (
        ('images', row_images, config.max_images_per_row, 'max_images_per_row'),
        ('audio clips', row_clips, config.max_clips_per_row, 'max_clips_per_row'),
    ):
      if len(items) > limit:
        raise ValueError(
            f'a packed row has {len(items)} {kind} but {name}={limit};'
            f' raise {name} (each slot costs memory in every row) or train'
            ' without packing'
        )
    if row_images:
      prepared = preprocess.preprocess_images(row_images, config.image_budget)
      image_patches[row, : len(row_images)] = prepared.patches
      image_positions[row, : len(row_images)] = prepared.positions_xy
    for slot, path in enumerate(row_clips):
      clip = audio_features.load_audio(path)
      waveforms[row, slot, : len(clip)] = clip
      lengths[row, slot] = len(clip)
      counts[row, slot] = audio_features.num_soft_tokens(len(clip))

  if config.max_images_per_row:
    batch['image_patches'] = image_patches
    batch['image_positions'] = image_positions
  if config.max_clips_per_row:
    batch['audio_waveforms'] = waveforms
    batch['audio_lengths'] = lengths
    batch['audio_counts'] = counts
  return batch
