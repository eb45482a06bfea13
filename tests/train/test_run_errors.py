"""Bad configs fail with one line naming the key, the value and what was expected, before any
device work."""
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError

TINY = str(REPO_ROOT / 'experiments/gpt_chars.py') + ':tiny'


def _prepare(*overrides):
  return run.prepare(config_lib.override(config_lib.load(TINY), overrides))


@pytest.mark.parametrize('override, words', [
    ('train.stepz=3', ["unknown config key 'train.stepz'"]),
    ('nosuch.key=3', ["unknown config key 'nosuch'"]),
    ('train.steps=many', ["train.steps='many'", 'int']),
    ('train.steps=1.5', ["train.steps='1.5'", 'float', 'int']),
    ('train.clip_norm=big', ["train.clip_norm='big'", 'float']),
    ('model.tie_embeddings=maybe', ['model.tie_embeddings', 'bool']),
])
def test_override_errors(override, words):
  with pytest.raises(ConfigError) as e:
    config_lib.override(config_lib.load(TINY), [override])
  for w in words:
    assert w in str(e.value)


@pytest.mark.parametrize('overrides, words', [
    (['model.n_heads=3'], ['model.n_heads=3', 'model.d_model=32']),
    (['model.n_kv_heads=3'], ['model.n_kv_heads=3', 'model.n_heads=4']),
    (['train.grad_accum=3'], ['train.batch_size=8', 'train.grad_accum=3']),
    (['train.compute_dtype=float8'], ["train.compute_dtype='float8'"]),
    (['model.norm=batchnorm'], ["model.norm='batchnorm'"]),
    (['data.block_size=128'], ['data.block_size=128', 'model.max_len=64']),
    (['data.source=tfds', 'data.tfds_name=no_such_set'], ["'no_such_set'", 'data dir']),
    (['model.vocab_size=7'], ['model.vocab_size=7', 'the data gives']),
    (['train.warmup_steps=20'], ['train.warmup_steps=20', 'train.steps=20']),
])
def test_inconsistent_values(overrides, words):
  with pytest.raises(ConfigError) as e:
    _prepare(*overrides)
  for w in words:
    assert w in str(e.value)


def test_cli_error_is_one_line_and_nonzero(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'lab.run', '--config', TINY, '--workdir',
                        str(tmp_path), '--config.model.n_heads=5'], capture_output=True, text=True)
  assert out.returncode != 0
  assert out.stderr.strip() == ('config error: model.n_heads=5 does not divide '
                                'model.d_model=32')
  assert not (tmp_path / 'checkpoints').exists()


def test_variants_parse():
  assert config_lib.parse_variant('size=tiny,runlocal') == {'size': 'tiny', 'runlocal': True}
  assert config_lib.parse_variant(None) == {}
