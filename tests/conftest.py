"""Shared test fixtures: the repo root and the shared TFDS data dir beside it.

Every test process (the pytest-xdist workers and the subprocesses some tests start, which inherit
the environment) shares one persistent XLA compilation cache under .cache/jax: many tests build
the same tiny models, and a compiled executable is reused whenever its HLO, flags and devices
match (JAX's cache key).

They also compile with LLVM's optimisations off (XLA_FLAGS below, appended to any the caller
set): the tests' models are tiny, so compiling, not running, is most of their time, and the
unoptimised code halves it (tests/models/test_deepseek.py: 185 s -> 96 s). XLA's own HLO passes
(fusion, layout, sharding) still run, so what is tested is the program a run executes; only the
machine code is less tuned. Benchmarks, runs and the notebooks (whose training loops would run
slower: tests/colab) keep the default.
"""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TFDS_DIR = REPO_ROOT.parent / 'shared' / 'tfds'

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(REPO_ROOT / '.cache' / 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def xla_flags_plus(flags: str) -> str:
  """This process's XLA_FLAGS with `flags` appended (for a subprocess's environment)."""
  return f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


if FAST_COMPILE_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = xla_flags_plus(FAST_COMPILE_FLAGS)


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
