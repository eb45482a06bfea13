"""Shared test fixtures: the repo root and the shared TFDS data dir beside it."""
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TFDS_DIR = REPO_ROOT.parent / 'shared' / 'tfds'


@pytest.fixture
def tfds_dir() -> str:
  if not (TFDS_DIR / 'tiny_shakespeare').is_dir():
    pytest.fail(f'shared TFDS data dir not found at {TFDS_DIR}')
  return str(TFDS_DIR)


@pytest.fixture
def x64():
  """Runs the test with float64 enabled in JAX."""
  import jax
  with jax.enable_x64(True):
    yield
