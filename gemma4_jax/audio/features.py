"""Audio input for the Gemma 4 audio encoder: loading, resampling, mel features.

A clip goes from a file or an array to a mono float32 waveform at 16 kHz
(`load_audio`), then to 128-bin log-mel frames (`mel_features`), one frame per
10 ms. The encoder turns every 4 frames into one soft token
(`num_soft_tokens`).

The mel features follow the filterbank of the official `gemma` 4.0.1 audio
encoder (`GemaxMelFilterbank`), which computes them inside the model:

- frames of 320 samples (20 ms) every 160 samples (10 ms), only whole frames
  and no padding, so a clip of n samples has `(n - 321) // 160 + 1` frames
  (a window of 321 samples is cut and its last sample dropped).
- each frame times a Hann window shifted by half a sample,
  `0.5 - 0.5 * cos(2π (i + 0.5) / 320)`, which never reaches zero.
- magnitude (not power) of a 512-point real FFT.
- 128 triangular filters spaced evenly on the HTK mel scale
  `2595 log10(1 + f / 700)` from 0 Hz to 8 kHz, unnormalised (peak 1).
- `log(mel + 0.001)` with the natural logarithm.

Neither loading, mono mixdown nor resampling exist in the official package,
whose sampler takes 16 kHz float arrays. Files are read with `soundfile`
(libsndfile: WAV, FLAC, OGG/Vorbis and more). Other rates are resampled with
`scipy.signal.resample_poly`, a polyphase FIR filter with a Kaiser window.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16_000
FRAME_LENGTH = 320  # samples, 20 ms
HOP_LENGTH = 160  # samples, 10 ms
FFT_LENGTH = 512
NUM_MEL_BINS = 128
MEL_FLOOR = 0.001  # added before the logarithm
MIN_FREQUENCY_HZ = 0.0
MAX_FREQUENCY_HZ = 8000.0

# The official sampler caps a clip at 750 soft tokens, which 30 s of audio
# produce (2998 mel frames).
MAX_SOFT_TOKENS = 750
MAX_SECONDS = 30
MAX_SAMPLES = MAX_SECONDS * SAMPLE_RATE

# A clip shorter than this has no whole mel frame.
MIN_SAMPLES = FRAME_LENGTH + 1

# Stride of each of the two convolutions of the encoder's subsampling block.
SUBSAMPLING_STRIDES = (2, 2)


def _to_float32(samples: np.ndarray) -> np.ndarray:
  """Scale integer PCM to [-1, 1) as the official encoder does, cast floats."""
  if samples.dtype == np.int16:
    return samples.astype(np.float32) / 32768.0
  if samples.dtype == np.int32:
    return samples.astype(np.float32) / 2147483648.0
  if samples.dtype == np.uint8:
    return (samples.astype(np.float32) - 128.0) / 128.0
  if np.issubdtype(samples.dtype, np.floating):
    return samples.astype(np.float32)
  raise ValueError(
      f'audio samples have dtype {samples.dtype}, which is not a PCM format.'
      ' Pass float samples in [-1, 1] or int16, int32 or uint8 PCM'
  )


def _read_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  import soundfile  # pylint: disable=g-import-not-at-top

  try:
    samples, sample_rate = soundfile.read(
        os.fspath(path), dtype='float32', always_2d=True
    )
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
    raise ValueError(
        f'cannot read audio file {os.fspath(path)!r}: {error}. Pass a WAV,'
        ' FLAC or OGG file, or the samples as an array with their sample rate'
    ) from error
  return samples, sample_rate


def _mix_to_mono(samples: np.ndarray) -> np.ndarray:
  """Average the channels of [samples] or [samples, channels] audio."""
  if samples.ndim in (1, 2) and samples.shape[0] == 0:
    raise ValueError(
        f'audio clip has 0 samples (it is empty, shape {samples.shape}). Pass'
        f' a clip of at least {MIN_SAMPLES} samples at 16 kHz'
    )
  if samples.ndim == 1:
    return samples
  if samples.ndim != 2:
    raise ValueError(
        f'audio array has shape {samples.shape}. Pass [samples] or'
        ' [samples, channels]'
    )
  if samples.shape[1] > samples.shape[0]:
    raise ValueError(
        f'audio array has shape {samples.shape}, more channels than samples.'
        ' Pass [samples, channels]: transpose a [channels, samples] array'
    )
  return samples.mean(axis=1, dtype=np.float32)


def resample(samples: np.ndarray, sample_rate: int) -> np.ndarray:
  """Resample a mono float32 waveform from `sample_rate` to 16 kHz."""
  if sample_rate <= 0:
    raise ValueError(f'sample rate {sample_rate} Hz is not positive')
  if sample_rate == SAMPLE_RATE:
    return samples
  from scipy import signal  # pylint: disable=g-import-not-at-top

  divisor = math.gcd(SAMPLE_RATE, sample_rate)
  resampled = signal.resample_poly(
      samples, SAMPLE_RATE // divisor, sample_rate // divisor
  )
  return resampled.astype(np.float32)


def check_clip_length(num_samples: int) -> None:
  """Raise ValueError unless a 16 kHz clip of `num_samples` fits the encoder."""
  if num_samples < MIN_SAMPLES:
    raise ValueError(
        f'audio clip has {num_samples} samples at 16 kHz but needs at least'
        f' {MIN_SAMPLES} ({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms) for one'
        ' mel frame. Pass a longer clip'
    )
  if num_samples > MAX_SAMPLES:
    raise ValueError(
        f'audio clip is {num_samples / SAMPLE_RATE:.2f} s long but the audio'
        f' encoder takes at most {MAX_SECONDS} s ({MAX_SOFT_TOKENS} soft'
        f' tokens). Split the clip into parts of at most {MAX_SECONDS} s'
    )


def load_audio(
    source: str | os.PathLike | np.ndarray | Sequence[float],
    sample_rate: int | None = None,
) -> np.ndarray:
  """Load one clip as a mono float32 waveform [samples] at 16 kHz.

  Args:
    source: path of an audio file that libsndfile reads (WAV, FLAC, OGG and
      others), or samples as [samples] or [samples, channels]: floats in
      [-1, 1] or int16, int32 or uint8 PCM.
    sample_rate: sample rate of an array `source` in Hz. Required for
      arrays, and rejected for files, which state their own.

  Returns:
    The channels averaged and resampled to 16 kHz.

  Raises:
    ValueError: the file cannot be read, the sample rate is missing, or the
      clip is shorter than one mel frame or longer than 30 s.
  """
  if isinstance(source, (str, os.PathLike)):
    if sample_rate is not None:
      raise ValueError(
          f'sample_rate={sample_rate} was passed with the file'
          f' {os.fspath(source)!r}, which states its own rate. Drop'
          ' sample_rate'
      )
    samples, sample_rate = _read_file(source)
  else:
    if sample_rate is None:
      raise ValueError(
          'an audio array was passed without its sample rate. Pass'
          ' sample_rate in Hz, e.g. sample_rate=16000'
      )
    samples = _to_float32(np.asarray(source))

  waveform = resample(_mix_to_mono(samples), sample_rate)
  check_clip_length(waveform.shape[0])
  return waveform


def num_mel_frames(num_samples: int) -> int:
  """Count the whole 20 ms frames, 10 ms apart, in a 16 kHz clip."""
  return (num_samples - MIN_SAMPLES) // HOP_LENGTH + 1


def num_soft_tokens(num_samples: int) -> int:
  """Count the soft tokens that the encoder makes of a 16 kHz clip.

  Each subsampling convolution (kernel 3, stride 2, one frame of zero
  padding on each side) turns t frames into ceil(t / 2).
  """
  check_clip_length(num_samples)
  length = num_mel_frames(num_samples)
  for stride in SUBSAMPLING_STRIDES:
    length = -(-length // stride)
  return length


def batch_clips(clips: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Right-pad 16 kHz clips with zeros into one batch.

  Returns:
    waveforms [B, S] float32, S the longest clip, and lengths [B] int32.
  """
  if not clips:
    raise ValueError('no audio clips were passed. Pass at least one clip')
  lengths = np.array([len(clip) for clip in clips], np.int32)
  for length in lengths:
    check_clip_length(int(length))
  waveforms = np.zeros((len(clips), lengths.max()), np.float32)
  for i, clip in enumerate(clips):
    waveforms[i, : len(clip)] = clip
  return waveforms, lengths


# One clip: a file path, 16 kHz float samples, or (samples, sample rate in Hz).
AudioLike = Union[str, os.PathLike, np.ndarray, tuple[np.ndarray, int]]


@dataclasses.dataclass(frozen=True)
class AudioBatch:
  """Clips ready for the audio encoder, and their soft-token counts.

  Attributes:
    waveforms: [N, S] float32 16 kHz samples, right-padded with zeros.
    lengths: [N] int32 samples of each clip.
    soft_token_counts: Soft tokens of each clip in the text sequence
      (`num_soft_tokens` of its length).
  """

  waveforms: np.ndarray
  lengths: np.ndarray
  soft_token_counts: tuple[int, ...]

  def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (waveforms, lengths, counts), which can cross `jax.jit`."""
    return (
        self.waveforms,
        self.lengths,
        np.asarray(self.soft_token_counts, np.int32),
    )


def prepare_audio(clips: Sequence[AudioLike]) -> AudioBatch:
  """Load, resample and batch clips for the audio encoder.

  Args:
    clips: Each a path of an audio file, a [samples] or [samples, channels]
      array at 16 kHz, or a (samples, sample_rate) pair.

  Raises:
    ValueError: a clip cannot be read, is shorter than one mel frame (an
      empty clip, for example) or is longer than 30 s.
  """
  waveforms = []
  for i, clip in enumerate(clips):
    try:
      if isinstance(clip, tuple):
        samples, sample_rate = clip
        waveforms.append(load_audio(samples, sample_rate))
      elif isinstance(clip, (str, os.PathLike)):
        waveforms.append(load_audio(clip))
      else:
        waveforms.append(load_audio(clip, SAMPLE_RATE))
    except ValueError as error:
      raise ValueError(f'audio clip {i}: {error}') from error
  batch, lengths = batch_clips(waveforms)
  return AudioBatch(
      waveforms=batch,
      lengths=lengths,
      soft_token_counts=tuple(num_soft_tokens(int(n)) for n in lengths),
  )


def _hertz_to_mel(frequency):
  return 2595.0 * np.log10(1.0 + frequency / 700.0)


def _mel_to_hertz(mel):
  return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank() -> np.ndarray:
  """Build the triangular HTK-mel filters [257 FFT bins, 128 mel bins].

  Filter m rises linearly from edge m to edge m + 1 and falls to edge m + 2,
  the 130 edges spaced evenly in mel from 0 Hz to 8 kHz. Computed in float64
  and rounded once to float32.
  """
  fft_frequencies = np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1)
  mel_edges = np.linspace(
      _hertz_to_mel(MIN_FREQUENCY_HZ),
      _hertz_to_mel(MAX_FREQUENCY_HZ),
      NUM_MEL_BINS + 2,
  )
  edges = _mel_to_hertz(mel_edges)  # [130] Hz

  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  f = fft_frequencies[:, None]
  rising = (f - lower) / (center - lower)
  falling = (upper - f) / (upper - center)
  return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


def hann_window() -> jax.Array:
  """Return the Hann window [320] sampled half a sample off the grid.

  Shifted so, it never reaches zero.
  """
  i = jnp.arange(FRAME_LENGTH, dtype=jnp.float32)
  return 0.5 - 0.5 * jnp.cos((2.0 * jnp.pi / FRAME_LENGTH) * (i + 0.5))


def mel_features(waveforms: jax.Array) -> jax.Array:
  """Compute log-mel features [B, frames, 128] of 16 kHz waveforms [B, S].

  `frames` is `num_mel_frames(S)`. Frames of a right-padded clip past its own
  length see zeros, and the encoder masks them (`valid_frame_mask`).
  """
  waveforms = jnp.asarray(waveforms, jnp.float32)
  num_frames = num_mel_frames(waveforms.shape[-1])
  if num_frames < 1:
    raise ValueError(
        f'waveforms have {waveforms.shape[-1]} samples, fewer than the'
        f' {MIN_SAMPLES} of one mel frame. Pass longer clips'
    )

  starts = jnp.arange(num_frames) * HOP_LENGTH
  indices = starts[:, None] + jnp.arange(FRAME_LENGTH)[None, :]
  frames = waveforms[:, indices]  # [B, frames, 320]

  spectrum = jnp.fft.rfft(frames * hann_window(), n=FFT_LENGTH)
  magnitude = jnp.abs(spectrum)  # [B, frames, 257]
  mel = magnitude @ jnp.asarray(mel_filterbank())
  return jnp.log(mel + MEL_FLOOR)


def valid_frame_mask(
    lengths: jax.Array, num_samples: int, num_frames: int
) -> jax.Array:
  """Mark the mel frames [B, frames] that count for each clip.

  The official encoder scales each clip's length by the batch's average
  number of samples per frame, `num_samples / num_frames`, in float32, and
  keeps that many leading frames. For a clip shorter than the batch this can
  differ by one from `num_mel_frames` of the clip alone.

  Args:
    lengths: [B] samples of each clip.
    num_samples: S, samples per padded waveform.
    num_frames: frames per padded waveform.
  """
  samples_per_frame = num_samples / num_frames
  valid_frames = jnp.floor(jnp.asarray(lengths) / samples_per_frame)
  return jnp.arange(num_frames)[None, :] < valid_frames.astype(jnp.int32)[
      :, None
  ]
