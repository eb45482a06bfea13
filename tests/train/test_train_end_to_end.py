"""A short real training run learns, and leaves every output the design promises."""
import collections
import json
import os

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.data import corpora
from lab.train import loop, metrics_log


def _unigram_cross_entropy(train: str, val: str) -> float:
  """Cross-entropy (nats/char) on val of the train set's character frequencies: a model that
  ignores context cannot beat it."""
  import math
  counts = collections.Counter(train)
  total = sum(counts.values())
  return -sum(math.log(counts[c] / total) for c in val if c in counts) / len(val)


def test_tiny_gpt_learns_context(tmp_path):
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/gpt_chars.py') + ':tiny'),
      ['train.steps=150', 'train.batch_size=32', 'train.lr=1e-2', 'train.warmup_steps=10',
       'train.log_every=10', 'train.eval_every=75', 'train.sample_every=150'])
  config, task, data = run.prepare(config)
  loop.train(config, task, data, str(tmp_path))

  records = metrics_log.read(tmp_path / 'metrics.jsonl')
  evals = [r['eval_loss'] for r in records if 'eval_loss' in r]
  losses = [r['loss'] for r in records if 'loss' in r]
  bound = _unigram_cross_entropy(*corpora.split_text(corpora.python_docs(), 0.1)) - 0.25
  assert len(evals) == 2 and evals[-1] < bound < evals[0] + 1.0, (evals, bound)
  assert losses[-1] < losses[0] - 0.5
  assert [r['step'] for r in records if 'loss' in r] == list(range(10, 151, 10))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tensorboard'))
  assert (tmp_path / 'loss.png').stat().st_size > 1000
  samples = (tmp_path / 'samples.txt').read_text()
  assert '--- step 150 sample_0' in samples
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['vocab_size'] == config.model.vocab_size > 50
