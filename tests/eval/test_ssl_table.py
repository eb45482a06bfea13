"""lab.eval.ssl_table: frozen-feature rows of finished SSL runs and of their untrained twins."""
import json

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run as run_lib
from lab.data import images
from lab.eval import knn, ssl_table
from lab.train import loop, restore


def test_markdown_formats_percentages_and_missing_wall_time():
  row = dict(label='simclr', encoder='resnet', train_steps=600, knn_accuracy=0.9312,
             linear_probe_accuracy=0.95, collapse_std=0.0412, train_wall_seconds=None)
  text = ssl_table.markdown([row, {**row, 'label': 'byol', 'train_wall_seconds': 600.0}])
  assert '| simclr | resnet | 600 | 93.1% | 95.0% | 0.041 | - |' in text
  assert '| byol | resnet | 600 | 93.1% | 95.0% | 0.041 | 10 min |' in text


def test_entries_need_a_label_and_a_workdir():
  with pytest.raises(SystemExit):
    ssl_table.main(['--run', 'runs/simclr', '--out', '/tmp/unused'])


@pytest.mark.slow
def test_rows_of_a_tiny_run_and_its_untrained_twin(tmp_path):
  """A 3-step SimCLR run on digits: the trained row restores the checkpoint (its k-NN accuracy is
  the one of the restored encoder's own features), the random row re-initialises (different
  features), and both beat chance (10 %) by far, as even random conv features do on digits."""
  workdir = str(tmp_path / 'simclr')
  config = config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:method=simclr,tiny')
  loop.train(*run_lib.prepare(config), workdir)
  out = tmp_path / 'table'
  ssl_table.main(['--run', f'simclr:{workdir}', '--random', f'random:{workdir}', '--out',
                  str(out), '--n_train', '400'])
  trained, random = json.loads((out / 'table.json').read_text())
  assert (trained['train_steps'], random['train_steps']) == (3, 0)
  assert not trained['untrained'] and random['untrained']
  assert trained['n_train'] == 400 and trained['n_test'] > 0
  for row in (trained, random):
    assert 0.3 < row['knn_accuracy'] <= 1 and 0.3 < row['linear_probe_accuracy'] <= 1, row
  run = restore.load(workdir)
  train_x, train_y = images.load_arrays('digits', 'train', '', 0)
  test_x, test_y = images.load_arrays('digits', 'test', '', 0)
  order = np.random.default_rng(0).permutation(len(train_y))[:400]
  encode = jax.jit(run.task.features)
  params, state = run.params, run.state.model_state
  accuracy, _ = knn.knn_classify(np.asarray(encode(params, state, train_x[order])),
                                 train_y[order], np.asarray(encode(params, state, test_x)),
                                 test_y, num_classes=10)
  assert abs(float(accuracy) - trained['knn_accuracy']) < 1e-6
  assert trained['knn_accuracy'] != random['knn_accuracy'] or \
      trained['collapse_std'] != random['collapse_std']
  assert '| simclr | resnet | 3 |' in (out / 'table.md').read_text()
