"""Image loading and resizing for the Gemma 4 vision encoder.

An image of any size and aspect ratio is resized, aspect ratio kept, so that
its 16×16 patches fit a soft-token budget. The encoder averages each 3×3
block of patches into one soft token, so the image may have at most
`budget * 9` patches. Both sides become multiples of 48 pixels (patch size
times pooling kernel), so every pooling window is whole. The image is never
cropped or tiled (no pan-and-scan).

The resize rule, the bicubic resampling of the 8-bit RGB image with Pillow and
the patch order follow the official `gemma` 4.0.1 pipeline
(`gm.nn.gemma4.vision._preprocessing.preprocess_and_patchify`), so 8-bit
images give the same patches. Inputs that pipeline mishandles are converted
properly here, and `to_rgb_uint8` lists the cases.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

PATCH_SIZE = 16
POOLING_KERNEL_SIZE = 3
# Soft-token budgets supported for the released models.
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_SOFT_TOKEN_BUDGET = 280
# Position value of padding patches, as in the official encoder.
PADDING_POSITION = -1

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageBatch:
  """Patches of a batch of images, padded to the length of one budget.

  Attributes:
    patches: [B, L, P] float32 pixel values in [0, 1], where L is
      `budget * 9` and P is `16 * 16 * 3` (row, column, channel order inside
      a patch). Padding patches are zeros.
    positions_xy: [B, L, 2] int32 (column, row) index of each patch in its
      image's patch grid, -1 for padding.
    soft_token_counts: Soft tokens each image yields after pooling.
    resized_sizes: (height, width) in pixels of each image after resizing.
  """

  patches: np.ndarray
  positions_xy: np.ndarray
  soft_token_counts: tuple[int, ...]
  resized_sizes: tuple[tuple[int, int], ...]


def check_budget(budget: int) -> int:
  """Return `budget` if it is one of `SOFT_TOKEN_BUDGETS`, else raise."""
  if budget not in SOFT_TOKEN_BUDGETS:
    raise ValueError(
        f'soft-token budget {budget!r} is not supported. Choose one of'
        f' {SOFT_TOKEN_BUDGETS}'
    )
  return int(budget)


def max_patches_for_budget(budget: int) -> int:
  """Return the number of patches an image may have under `budget` tokens."""
  return check_budget(budget) * POOLING_KERNEL_SIZE**2


def target_size(height: int, width: int, budget: int) -> tuple[int, int]:
  """Compute the (height, width) an image is resized to under `budget`.

  The image is scaled so that its area equals `budget * 9` patches, then each
  side is rounded down to a multiple of 48 pixels. A side that rounds to zero
  (a panorama or a tall strip) becomes 48 pixels, and the other side becomes
  48 times the integer aspect ratio, capped at `budget * 48` pixels.
  """
  if height <= 0 or width <= 0:
    raise ValueError(
        f'image size {height}x{width} (height x width) is empty. Pass an'
        ' image with at least one pixel'
    )
  max_patches = max_patches_for_budget(budget)
  side_multiple = POOLING_KERNEL_SIZE * PATCH_SIZE

  # The same floating-point steps as the official rule, so that sizes on a
  # rounding boundary come out the same.
  scale = math.sqrt(max_patches * PATCH_SIZE**2 / (height * width))
  new_height = int(math.floor(scale * height / side_multiple)) * side_multiple
  new_width = int(math.floor(scale * width / side_multiple)) * side_multiple

  max_side = (max_patches // POOLING_KERNEL_SIZE**2) * side_multiple
  if new_height == 0 and new_width == 0:
    return side_multiple, side_multiple
  if new_height == 0:
    ratio = max(1, int(math.floor(width / height)))
    return side_multiple, min(ratio * side_multiple, max_side)
  if new_width == 0:
    ratio = max(1, int(math.floor(height / width)))
    return min(ratio * side_multiple, max_side), side_multiple
  return new_height, new_width


def soft_token_count(height: int, width: int, budget: int) -> int:
  """Return how many soft tokens an image of this size yields under `budget`."""
  new_height, new_width = target_size(height, width, budget)
  num_patches = (new_height // PATCH_SIZE) * (new_width // PATCH_SIZE)
  return num_patches // POOLING_KERNEL_SIZE**2


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Read an image file into [H, W, 3] uint8 RGB.

  The EXIF orientation is applied, so photos come out the way image viewers
  show them.
  """
  try:
    with Image.open(path) as image:
      image.load()
      image = ImageOps.exif_transpose(image)
  except FileNotFoundError:
    raise FileNotFoundError(f'image file {str(path)!r} not found') from None
  except (Image.UnidentifiedImageError, OSError) as error:
    raise ValueError(
        f'cannot read image file {str(path)!r}: {error}. Pass a PNG, JPEG or'
        ' another format that Pillow reads'
    ) from error
  return to_rgb_uint8(image)


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
  """Convert a path, Pillow image or array into [H, W, 3] uint8 RGB.

  Accepted arrays are [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] of dtype
  uint8, uint16 (scaled by 255/65535), bool, another integer type with
  values in [0, 255], or a float type with values in [0, 1]. Grayscale is
  repeated over the three channels and the alpha channel is dropped, as the
  official pipeline does.

  The official pipeline differs for 16-bit input: it clips 16-bit Pillow
  images at 255 and fails on 16-bit arrays that need resizing, where this
  function rescales both to 8 bits.
  """
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  if isinstance(image, Image.Image):
    return _pillow_to_rgb_uint8(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb_uint8(image)
  raise TypeError(
      f'image of type {type(image).__name__} is not supported. Pass a file'
      ' path, a PIL.Image.Image or a numpy array'
  )


def _pillow_to_rgb_uint8(image: Image.Image) -> np.ndarray:
  # Pillow's own conversion to RGB clips 16-bit and float images at 255.
  if image.mode.startswith('I;16') or image.mode == 'F':
    return _array_to_rgb_uint8(np.asarray(image))
  if image.mode == 'I':
    # Older Pillow versions open 16-bit grayscale PNGs in 32-bit 'I' mode.
    array = np.asarray(image)
    if array.size and (array.min() < 0 or array.max() > 65535):
      raise ValueError(
          f'32-bit image has values in [{array.min()}, {array.max()}], but'
          ' only 16-bit values in [0, 65535] are supported'
      )
    return _array_to_rgb_uint8(array.astype(np.uint16))
  if image.width == 0 or image.height == 0:
    _raise_empty(image.height, image.width)
  return np.asarray(image.convert('RGB'))


def _array_to_rgb_uint8(array: np.ndarray) -> np.ndarray:
  if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] > 4:
    raise ValueError(
        f'image array has shape {array.shape}, which looks channels-first.'
        ' Pass [H, W, C], for example `np.moveaxis(array, 0, -1)`'
    )
  if array.ndim == 2:
    array = array[:, :, None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f'image array has shape {array.shape}, expected [H, W], [H, W, 1],'
        ' [H, W, 3] or [H, W, 4]'
    )
  if array.shape[0] == 0 or array.shape[1] == 0:
    _raise_empty(array.shape[0], array.shape[1])

  array = _to_uint8_values(array)
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return np.ascontiguousarray(array[:, :, :3])


def _to_uint8_values(array: np.ndarray) -> np.ndarray:
  """Map pixel values of any supported dtype to uint8."""
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if array.dtype == np.uint16:
    return np.round(array.astype(np.float32) * (255 / 65535)).astype(np.uint8)
  if np.issubdtype(array.dtype, np.integer):
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
      raise ValueError(
          f'image array of dtype {array.dtype} has values in [{low}, {high}],'
          ' but integer pixels must lie in [0, 255] (or [0, 65535] as uint16)'
      )
    return array.astype(np.uint8)
  if np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all():
      raise ValueError('image array contains NaN or infinite values')
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
      raise ValueError(
          f'float image array has values in [{low:.4g}, {high:.4g}], but float'
          ' pixels must lie in [0, 1]. Rescale it or pass uint8 values'
      )
    return np.round(array.astype(np.float32) * 255.0).astype(np.uint8)
  raise ValueError(
      f'image array of dtype {array.dtype} is not supported. Pass uint8,'
      ' uint16, bool, integer or float pixels'
  )


def _raise_empty(height: int, width: int):
  raise ValueError(
      f'image size {height}x{width} (height x width) is empty. Pass an image'
      ' with at least one pixel'
  )


def resize_to_budget(image: ImageLike, budget: int) -> np.ndarray:
  """Resize an image for `budget` soft tokens.

  Returns:
    [H', W', 3] float32 pixels in [0, 1], where H' and W' are multiples of 48
    given by `target_size`.
  """
  rgb = to_rgb_uint8(image)
  height, width = rgb.shape[:2]
  new_height, new_width = target_size(height, width, budget)
  if (new_height, new_width) != (height, width):
    resized = Image.fromarray(rgb).resize(
        (new_width, new_height), resample=Image.Resampling.BICUBIC
    )
    rgb = np.asarray(resized)
  return rgb.astype(np.float32) / 255.0


def patchify(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cut [H, W, C] pixels into 16×16 patches.

  Returns:
    patches: [H/16 * W/16, 16 * 16 * C], patches in row-major grid order,
      pixels inside a patch in (row, column, channel) order.
    positions_xy: [H/16 * W/16, 2] int32 (column, row) of each patch.
  """
  height, width, channels = pixels.shape
  if height % PATCH_SIZE or width % PATCH_SIZE:
    raise ValueError(
        f'image size {height}x{width} is not a multiple of the patch size'
        f' {PATCH_SIZE}. Resize it with `resize_to_budget` first'
    )
  rows, columns = height // PATCH_SIZE, width // PATCH_SIZE

  grid = pixels.reshape(rows, PATCH_SIZE, columns, PATCH_SIZE, channels)
  patches = grid.transpose(0, 2, 1, 3, 4).reshape(rows * columns, -1)

  column_index, row_index = np.meshgrid(np.arange(columns), np.arange(rows))
  positions_xy = np.stack([column_index, row_index], axis=-1).reshape(-1, 2)
  return patches, positions_xy.astype(np.int32)


def preprocess_images(
    images: Sequence[ImageLike], budget: int = DEFAULT_SOFT_TOKEN_BUDGET
) -> ImageBatch:
  """Resize, patchify and pad a batch of images for one soft-token budget.

  Each image keeps its own aspect ratio and yields up to `budget` soft tokens.
  All images are padded to `budget * 9` patches so they batch together.
  """
  max_patches = max_patches_for_budget(budget)
  if not images:
    raise ValueError('no images given. Pass a non-empty list of images')
  patch_dim = PATCH_SIZE * PATCH_SIZE * 3

  patches = np.zeros((len(images), max_patches, patch_dim), np.float32)
  positions_xy = np.full(
      (len(images), max_patches, 2), PADDING_POSITION, np.int32
  )
  counts, sizes = [], []
  for i, image in enumerate(images):
    pixels = resize_to_budget(image, budget)
    image_patches, image_positions = patchify(pixels)
    num_patches = len(image_patches)

    patches[i, :num_patches] = image_patches
    positions_xy[i, :num_patches] = image_positions
    counts.append(num_patches // POOLING_KERNEL_SIZE**2)
    sizes.append(pixels.shape[:2])

  return ImageBatch(
      patches=patches,
      positions_xy=positions_xy,
      soft_token_counts=tuple(counts),
      resized_sizes=tuple(sizes),
  )
