"""Audio loading and mel features agree with the official `gemma` 4.0.1 encoder.

The official package computes mel features inside its `AudioTokenizer`
(`GemaxMelFilterbank`) and soft-token counts from the encoder's output
length, so both serve as oracles here. Clips: a 0.5 s chirp, 7 s of noise,
a 30 s chirp with noise (the maximum length) and, where `espeak-ng` is
installed, real speech.
"""

from __future__ import annotations

import shutil
import subprocess

import jax
import numpy as np
import pytest
import soundfile

from gemma4_jax.audio import features

SR = features.SAMPLE_RATE


def chirp(seconds: float, sample_rate: int = SR) -> np.ndarray:
  """Sine sweeping from 100 Hz to 7 kHz, amplitude 0.5, float32."""
  t = np.arange(int(seconds * sample_rate)) / sample_rate
  f0, f1 = 100.0, 7000.0
  phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
  return (0.5 * np.sin(phase)).astype(np.float32)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (0.3 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def synthetic_clips() -> dict[str, np.ndarray]:
  return {
      'chirp_0.5s': chirp(0.5),
      'noise_7s': noise(7.0),
      'chirp_noise_30s': chirp(30.0) + 0.05 * noise(30.0, seed=1),
  }


def speak(text: str, path) -> None:
  """Write `text` spoken by espeak-ng to the WAV file `path`."""
  subprocess.run(
      ['espeak-ng', '-w', str(path), text], check=True, capture_output=True
  )


needs_espeak = pytest.mark.skipif(
    shutil.which('espeak-ng') is None,
    reason=(
        'espeak-ng is not installed, so there is no real speech to test on.'
        ' pip does not install the espeak-ng program, so install it with'
        ' `apt-get install espeak-ng`'
    ),
)


def official_mel(waveforms: np.ndarray) -> np.ndarray:
  from gemma.gm.nn.gemma4.audio import _modules

  return np.asarray(_modules.GemaxMelFilterbank().apply({}, waveforms))


def official_token_count(num_samples: int) -> int:
  """Length of the official encoder's output for one clip, by shape only."""
  from gemma.gm.nn.gemma4.audio import _model
  from gemma.gm.nn.gemma4.audio import _modules

  tokenizer = _model.AudioTokenizer(
      config=_modules.ConformerConfig(
          num_layers=1, model_dims=8, lm_model_dims=8, atten_num_heads=2
      )
  )
  waveform = jax.ShapeDtypeStruct((1, num_samples), np.float32)
  lengths = np.array([num_samples], np.int32)
  params = jax.eval_shape(
      lambda w: tokenizer.init(jax.random.key(0), w, lengths), waveform
  )
  out, _ = jax.eval_shape(
      lambda p, w: tokenizer.apply(p, w, lengths), params, waveform
  )
  return out.shape[1]


@pytest.mark.parametrize('name', list(synthetic_clips()))
def test_mel_features_match_official(name):
  clip = synthetic_clips()[name][None]

  ours = np.asarray(features.mel_features(clip))
  expected = official_mel(clip)

  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_mel_features_batch_match_official():
  waveforms, _ = features.batch_clips([chirp(0.5), noise(1.3)])

  np.testing.assert_allclose(
      np.asarray(features.mel_features(waveforms)),
      official_mel(waveforms),
      rtol=1e-5,
      atol=1e-5,
  )


@pytest.mark.parametrize(
    'num_samples,expected',
    [(8_000, 12), (112_000, 175), (480_000, 750), (321, 1), (16_001, 25)],
)
def test_soft_token_counts(num_samples, expected):
  assert features.num_soft_tokens(num_samples) == expected
  assert official_token_count(num_samples) == expected


def test_valid_frame_mask_matches_official():
  from gemma.gm.nn.gemma4.audio import _model

  lengths = np.array([112_000, 8_000, 54_321, 321], np.int32)
  num_samples = 112_000
  num_frames = features.num_mel_frames(num_samples)

  ours = features.valid_frame_mask(lengths, num_samples, num_frames)
  expected = _model.AudioTokenizer.infer_mask(
      np.zeros((4, num_frames, 1)), lengths, num_samples
  )

  np.testing.assert_array_equal(np.asarray(ours), np.asarray(expected))


@needs_espeak
def test_speech_mel_features_match_official(tmp_path):
  path = tmp_path / 'speech.wav'
  speak('The quick brown fox jumps over the lazy dog.', path)
  waveform = features.load_audio(path)[None]

  np.testing.assert_allclose(
      np.asarray(features.mel_features(waveform)),
      official_mel(waveform),
      rtol=1e-5,
      atol=1e-5,
  )
  assert features.num_soft_tokens(waveform.shape[1]) == official_token_count(
      waveform.shape[1]
  )


def test_pcm_arrays_scale_like_official():
  from gemma.gm.nn.gemma4.audio import _model

  rng = np.random.default_rng(0)
  for dtype in (np.int16, np.int32, np.uint8):
    info = np.iinfo(dtype)
    pcm = rng.integers(info.min, info.max, 4000, dtype=dtype)

    ours = features.load_audio(pcm, sample_rate=SR)
    expected = _model.AudioTokenizer.to_float32(None, pcm)

    np.testing.assert_array_equal(ours, np.asarray(expected), err_msg=dtype)


@pytest.mark.parametrize('file_format,tolerance', [
    ('WAV', 1e-3), ('FLAC', 1e-3), ('OGG', 0.1),
])
def test_stereo_44k_file_loads_as_16k_mono(tmp_path, file_format, tolerance):
  # Left and right carry 1 kHz sines of amplitude 0.2 and 0.4 in phase, so
  # the mixdown is a 1 kHz sine of amplitude 0.3.
  rate, seconds = 44_100, 1.0
  t = np.arange(int(rate * seconds)) / rate
  sine = np.sin(2 * np.pi * 1000.0 * t)
  stereo = np.stack([0.2 * sine, 0.4 * sine], axis=1).astype(np.float32)
  path = tmp_path / f'clip.{file_format.lower()}'
  soundfile.write(path, stereo, rate, format=file_format)

  waveform = features.load_audio(path)

  assert waveform.dtype == np.float32
  assert waveform.ndim == 1
  assert waveform.shape[0] == int(np.ceil(len(t) * SR / rate))
  middle = slice(SR // 4, 3 * SR // 4)  # away from the filter's edges
  expected = 0.3 * np.sin(2 * np.pi * 1000.0 * np.arange(SR) / SR)
  np.testing.assert_allclose(
      waveform[middle], expected[middle], atol=tolerance
  )


def test_array_with_other_rate_is_resampled():
  rate = 8_000
  t = np.arange(rate) / rate
  sine = np.sin(2 * np.pi * 440.0 * t)

  waveform = features.load_audio(sine, sample_rate=rate)

  assert waveform.shape == (SR,)
  spectrum = np.abs(np.fft.rfft(waveform))
  assert np.argmax(spectrum) == 440  # 1 Hz per bin for one second


def test_empty_clip_is_rejected():
  with pytest.raises(ValueError, match='has 0 samples .* at least 321'):
    features.load_audio(np.zeros(0, np.float32), sample_rate=SR)


def test_clip_shorter_than_one_frame_is_rejected():
  with pytest.raises(ValueError, match='has 320 samples'):
    features.load_audio(np.zeros(320, np.float32), sample_rate=SR)


def test_clip_over_maximum_is_rejected():
  with pytest.raises(ValueError, match='30.50 s long .* at most 30 s'):
    features.load_audio(np.zeros(488_000, np.float32), sample_rate=SR)


def test_maximum_clip_is_accepted():
  waveform = features.load_audio(np.zeros(features.MAX_SAMPLES), sample_rate=SR)

  assert waveform.shape == (features.MAX_SAMPLES,)


def test_long_clip_at_high_rate_is_rejected():
  with pytest.raises(ValueError, match='31.00 s long'):
    features.load_audio(np.zeros(31 * 48_000, np.float32), sample_rate=48_000)


def test_unreadable_file_is_rejected(tmp_path):
  path = tmp_path / 'notes.wav'
  path.write_text('not audio')

  with pytest.raises(ValueError, match="cannot read audio file .*notes.wav"):
    features.load_audio(path)


def test_missing_file_is_rejected(tmp_path):
  with pytest.raises(ValueError, match='cannot read audio file .*absent.flac'):
    features.load_audio(tmp_path / 'absent.flac')


def test_array_without_sample_rate_is_rejected():
  with pytest.raises(ValueError, match='without its sample rate'):
    features.load_audio(np.zeros(16_000, np.float32))


def test_channels_first_array_is_rejected():
  with pytest.raises(ValueError, match=r'shape \(2, 16000\).*transpose'):
    features.load_audio(np.zeros((2, 16_000), np.float32), sample_rate=SR)


def test_float64_array_is_accepted():
  waveform = features.load_audio(np.full(1_000, 0.25), sample_rate=SR)

  assert waveform.dtype == np.float32
  np.testing.assert_array_equal(waveform, np.full(1_000, 0.25, np.float32))
