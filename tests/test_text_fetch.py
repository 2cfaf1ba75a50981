"""`fetch_tokenizer` and the `gemma4-jax fetch-tokenizer` command."""

from __future__ import annotations

import shutil

import pytest

from gemma4_jax import cli
from gemma4_jax.text import fetch


def test_fetched_file_has_release_checksum(gemma4_tokenizer_path):
  assert fetch.sha256_of(gemma4_tokenizer_path) == fetch.TOKENIZER_SHA256
  assert gemma4_tokenizer_path.stat().st_size == 4_689_016


def test_cached_file_reused(tmp_path, gemma4_tokenizer_path, monkeypatch):
  shutil.copy(gemma4_tokenizer_path, tmp_path / fetch.TOKENIZER_FILENAME)

  def fail_download(download_dir):
    raise AssertionError('a valid cached tokenizer must not be downloaded again')

  monkeypatch.setattr(fetch, '_download_wheel', fail_download)
  assert fetch.fetch_tokenizer(tmp_path) == tmp_path / fetch.TOKENIZER_FILENAME


def test_corrupt_cache_raises_checksum_error(tmp_path):
  (tmp_path / fetch.TOKENIZER_FILENAME).write_bytes(b'not a tokenizer')
  with pytest.raises(fetch.ChecksumMismatchError) as error:
    fetch.fetch_tokenizer(tmp_path)
  message = str(error.value)
  assert fetch.TOKENIZER_SHA256 in message
  assert 'Delete it' in message


def test_cache_dir_from_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(fetch.CACHE_ENV_VAR, str(tmp_path))
  assert fetch.default_cache_dir() == tmp_path


def test_download_failure_names_pip_output(tmp_path, monkeypatch):
  monkeypatch.setattr(fetch, 'WHEEL_REQUIREMENT', 'maxtext==0.0.0.does.not.exist')
  with pytest.raises(fetch.TokenizerFetchError, match='pip download'):
    fetch.fetch_tokenizer(tmp_path / 'cache')


def test_cli_prints_cached_path(tmp_path, gemma4_tokenizer_path, capsys):
  shutil.copy(gemma4_tokenizer_path, tmp_path / fetch.TOKENIZER_FILENAME)
  assert cli.main(['fetch-tokenizer', '--cache-dir', str(tmp_path)]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / fetch.TOKENIZER_FILENAME)


def test_cli_reports_corrupt_cache(tmp_path, capsys):
  (tmp_path / fetch.TOKENIZER_FILENAME).write_bytes(b'x')
  assert cli.main(['fetch-tokenizer', '--cache-dir', str(tmp_path)]) == 1
  assert 'sha256' in capsys.readouterr().err
