"""Shared fixtures: the released Gemma 4 tokenizer, fetched once per session."""

from __future__ import annotations

import pytest

from gemma4_jax.text import fetch, tokenizer


@pytest.fixture(scope='session')
def gemma4_tokenizer_path():
  """Path of the cached Gemma 4 tokenizer; downloads it from PyPI if needed."""
  return fetch.fetch_tokenizer()


@pytest.fixture(scope='session')
def gemma4_tokenizer(gemma4_tokenizer_path):
  return tokenizer.Tokenizer(gemma4_tokenizer_path)
