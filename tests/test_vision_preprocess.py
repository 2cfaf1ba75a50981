"""Image preprocessing matches the official `gemma` 4.0.1 pipeline.

Resized sizes and soft-token counts are compared with the official
`gm.nn.gemma4.vision._preprocessing` for a grid of image sizes and every
soft-token budget. Patches and positions are compared on a batch of odd
inputs: a panorama, an icon, grayscale, RGBA and palette images. 16-bit input,
which the official pipeline clips, is checked against values computed here.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gemma4_jax.vision import preprocess

BUDGETS = preprocess.SOFT_TOKEN_BUDGETS


def _official():
  from gemma.gm.nn.gemma4.vision import _preprocessing

  return _preprocessing


def _size_grid() -> list[tuple[int, int]]:
  """(height, width) pairs: extremes, common photo sizes and random sizes."""
  fixed = [
      (1, 1), (1, 2), (2, 1), (1, 5000), (5000, 1), (3, 4000), (4000, 3),
      (16, 16), (32, 32), (47, 47), (48, 48), (49, 49), (48, 4000),
      (300, 4000), (4000, 300), (100, 10000), (10000, 100), (224, 224),
      (240, 320), (480, 640), (640, 480), (600, 800), (768, 1024),
      (720, 1280), (1080, 1920), (1920, 1080), (2160, 3840), (3024, 4032),
      (4032, 3024), (1000, 1000), (1024, 1024), (896, 896), (1584, 1584),
      (1585, 1585), (512, 2048), (2048, 512), (97, 1501), (1501, 97),
  ]
  rng = np.random.default_rng(0)
  random_sizes = [
      (int(h), int(w)) for h, w in rng.integers(1, 3000, size=(30, 2))
  ]
  return fixed + random_sizes


SIZES = _size_grid()


def test_size_grid_is_large():
  assert len(set(SIZES)) >= 50


@pytest.mark.parametrize('budget', BUDGETS)
def test_target_size_matches_official(budget):
  official = _official()
  for height, width in SIZES:
    expected_size = official.get_target_dimensions(
        height, width, max_patches=budget * 9
    )
    expected_count = official.predict_soft_token_count(
        height, width, max_soft_tokens=budget
    )
    size = (height, width)
    assert preprocess.target_size(height, width, budget) == expected_size, size
    count = preprocess.soft_token_count(height, width, budget)
    assert count == expected_count, size
    assert expected_count <= budget, size


@pytest.mark.parametrize('budget', BUDGETS)
def test_resized_images_match_official(budget):
  """The real pipelines, run on images of each size, agree on size and count."""
  official = _official()
  images = [np.full((h, w, 3), 128, np.uint8) for h, w in SIZES]

  processed, official_counts = official.preprocess_images(
      images, max_soft_tokens=budget
  )

  cases = zip(images, processed, official_counts)
  for image, expected, expected_count in cases:
    resized = preprocess.resize_to_budget(image, budget)
    assert resized.shape == expected.shape, image.shape
    _, positions = preprocess.patchify(resized)
    assert len(positions) // 9 == expected_count, image.shape


def _odd_images() -> list:
  rng = np.random.default_rng(1)
  return [
      rng.integers(0, 256, (300, 4000, 3), np.uint8),  # panorama
      rng.integers(0, 256, (32, 32, 3), np.uint8),  # icon
      rng.integers(0, 256, (640, 360, 3), np.uint8),  # portrait
      rng.integers(0, 256, (200, 150), np.uint8),  # grayscale [H, W]
      rng.integers(0, 256, (90, 120, 1), np.uint8),  # grayscale [H, W, 1]
      rng.integers(0, 256, (130, 170, 4), np.uint8),  # RGBA
      Image.fromarray(rng.integers(0, 256, (70, 50, 4), np.uint8)),  # RGBA
      Image.fromarray(rng.integers(0, 256, (60, 80), np.uint8)),  # L
      Image.fromarray(rng.integers(0, 256, (60, 80, 3), np.uint8)).convert(
          'P'
      ),  # palette
  ]


@pytest.mark.parametrize('budget', (70, 280))
def test_patches_match_official(budget):
  images = _odd_images()
  patches, positions, counts = _official().preprocess_and_patchify(
      images, max_soft_tokens=budget
  )

  batch = preprocess.preprocess_images(images, budget)

  assert batch.patches.dtype == np.float32
  assert batch.patches.shape == tuple(patches.shape)
  np.testing.assert_array_equal(batch.positions_xy, np.asarray(positions))
  np.testing.assert_array_equal(batch.patches, np.asarray(patches))
  assert batch.soft_token_counts == tuple(counts)


def test_panorama_fits_budget():
  panorama = np.zeros((300, 4000, 3), np.uint8)
  for budget in BUDGETS:
    batch = preprocess.preprocess_images([panorama], budget)
    height, width = batch.resized_sizes[0]
    assert batch.soft_token_counts[0] <= budget
    assert height % 48 == 0
    assert width % 48 == 0
    assert width / height > 10  # aspect ratio kept, no crop


def test_icon_is_upscaled():
  icon = np.zeros((32, 32, 3), np.uint8)
  batch = preprocess.preprocess_images([icon], 280)
  assert batch.resized_sizes == ((768, 768),)
  assert batch.soft_token_counts == (256,)


def test_16bit_png_is_rescaled(tmp_path):
  values = (np.arange(40 * 64).reshape(40, 64) * 25).astype(np.uint16)
  path = tmp_path / 'gray16.png'
  Image.fromarray(values).save(path)

  rgb = preprocess.to_rgb_uint8(path)

  expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  assert rgb.shape == (40, 64, 3)
  np.testing.assert_array_equal(rgb[..., 0], expected)
  np.testing.assert_array_equal(rgb[..., 2], expected)


def test_16bit_array_is_rescaled():
  values = np.array([[0, 257, 65535]], np.uint16)
  rgb = preprocess.to_rgb_uint8(values)
  np.testing.assert_array_equal(rgb[0, :, 1], [0, 1, 255])


def test_16bit_png_size_matches_official(tmp_path):
  path = tmp_path / 'gray16.png'
  Image.fromarray(np.zeros((300, 4000), np.uint16)).save(path)
  batch = preprocess.preprocess_images([path], 140)
  expected = _official().get_target_dimensions(300, 4000, max_patches=140 * 9)
  assert batch.resized_sizes == (expected,)


def test_rgba_png_file_matches_official(tmp_path):
  pixels = np.random.default_rng(2).integers(0, 256, (50, 70, 4), np.uint8)
  path = tmp_path / 'rgba.png'
  Image.fromarray(pixels).save(path)

  with Image.open(path) as image:
    expected = _official().preprocess_image(image, max_soft_tokens=70)
  ours = preprocess.resize_to_budget(path, 70)

  np.testing.assert_array_equal(ours, np.asarray(expected))


def test_float_array_accepted():
  pixels = np.linspace(0, 1, 12, dtype=np.float32).reshape(2, 2, 3)
  rgb = preprocess.to_rgb_uint8(pixels)
  expected = np.round(pixels.reshape(-1) * 255)
  np.testing.assert_array_equal(rgb.reshape(-1), expected)


@pytest.mark.parametrize(
    'image, message',
    [
        (np.zeros((0, 10, 3), np.uint8), 'empty'),
        (np.zeros((3, 64, 64), np.uint8), 'channels-first'),
        (np.zeros((8, 8, 2), np.uint8), 'expected'),
        (np.full((8, 8, 3), 1.5, np.float32), r'\[0, 1\]'),
        (np.full((8, 8, 3), np.nan, np.float32), 'NaN'),
        (np.full((8, 8, 3), 300, np.int32), r'\[0, 255\]'),
        (np.zeros((8, 8, 3), np.complex64), 'not supported'),
        ([[1, 2], [3, 4]], 'not supported'),
    ],
)
def test_bad_image_rejected(image, message):
  with pytest.raises((ValueError, TypeError), match=message):
    preprocess.to_rgb_uint8(image)


def test_missing_file_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    preprocess.to_rgb_uint8(tmp_path / 'missing.png')


def test_non_image_file_rejected(tmp_path):
  path = tmp_path / 'notes.png'
  path.write_text('not an image')
  with pytest.raises(ValueError, match='cannot read image file'):
    preprocess.to_rgb_uint8(path)


@pytest.mark.parametrize('suffix', ('png', 'jpeg'))
def test_truncated_file_rejected(tmp_path, suffix):
  path = tmp_path / f'cut.{suffix}'
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(pixels).save(path)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  with pytest.raises(ValueError, match=f'cannot read image file .*cut.{suffix}'):
    preprocess.to_rgb_uint8(path)


@pytest.mark.parametrize('budget', (0, 100, 281, 2240))
def test_unsupported_budget_rejected(budget):
  with pytest.raises(ValueError, match='soft-token budget'):
    preprocess.preprocess_images([np.zeros((8, 8, 3), np.uint8)], budget)


def test_empty_batch_rejected():
  with pytest.raises(ValueError, match='no images'):
    preprocess.preprocess_images([], 280)
