"""Frozen-feature evaluation of trained encoders: weighted k-NN and linear-probe accuracy.

  python -m lab.eval.ssl_table --out runs/ssl_table \
      --run simclr:runs/ssl/simclr --run byol:runs/ssl/byol ... \
      --random random_resnet:runs/ssl/simclr --run supervised:runs/ssl/supervised

Each --run label:workdir restores a finished run (lab.train.restore) and embeds images with its
task's `features(params, state, images)` (the encoder in eval mode); --random label:workdir uses
the same task with freshly initialised parameters and state (the untrained encoder of that run's
architecture). Features of the first --n_train training images and of the whole test split of
the run's dataset are scored by the weighted k-NN classifier (k = 20, tau = 0.07; InstDisc sec.
3.4, lab.eval.knn) and a linear probe (multinomial logistic regression with weight decay chosen
on a held-out fifth of the training features, lab.eval.linear_probe), plus the collapse std of
the normalised training features. Training wall time is the span between the run's config.json
(written at the start) and loss.png (written at the end). Writes table.json and table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import optax

from lab.data import images
from lab.eval import collapse, features, knn, linear_probe
from lab.train import loop, restore


def _wall_seconds(workdir: str) -> float | None:
  start, end = os.path.join(workdir, 'config.json'), os.path.join(workdir, 'loss.png')
  if not os.path.exists(end):
    return None
  return os.path.getmtime(end) - os.path.getmtime(start)


def frozen_encoder(workdir: str, *, untrained: bool):
  """(encode, run): encode(images_BXYC) -> features_BD of the finished run in workdir (its
  Task.features with the trained params and state, or freshly initialised ones if `untrained`)
  and the restored lab.train.restore.Run."""
  trained = restore.load(workdir)
  task, config = trained.task, trained.config
  if task.features is None:
    raise ValueError(f'run {workdir!r} (objective {config.objective!r}) has no Task.features '
                     'encoder to evaluate')
  if untrained:
    state = loop.init_state(config, task, optax.identity())
    params, model_state = state.params, state.model_state
  else:
    params, model_state = trained.params, trained.state.model_state
  return (lambda x_BXYC: task.features(params, model_state, x_BXYC)), trained


def evaluate(label: str, workdir: str, *, untrained: bool, n_train: int, batch: int = 500,
             seed: int = 0) -> dict:
  """One row of the table for the run in workdir (its untrained twin if `untrained`)."""
  encode, trained = frozen_encoder(workdir, untrained=untrained)
  config = trained.config
  cfg = config.data
  train_x, train_y = images.load_arrays(cfg.source, 'train', cfg.data_dir, cfg.image_size)
  test_x, test_y = images.load_arrays(cfg.source, 'test', cfg.data_dir, cfg.image_size)
  order = np.random.default_rng(seed).permutation(len(train_y))[:n_train]
  train_x, train_y = train_x[order], train_y[order]
  start = time.time()
  train_z = features.extract(encode, train_x, batch).astype(np.float32)
  test_z = features.extract(encode, test_x, batch).astype(np.float32)
  knn_accuracy, _ = knn.knn_classify(train_z, train_y, test_z, test_y, num_classes=10)
  probe = linear_probe.linear_probe(train_z, train_y, test_z, test_y, num_classes=10, seed=seed)
  return {'label': label, 'workdir': workdir, 'objective': config.objective,
          'method': config.get('objective_args', {}).get('method', config.objective),
          'encoder': config.model.name, 'untrained': untrained,
          'train_steps': 0 if untrained else trained.step, 'feature_dim': int(train_z.shape[1]),
          'knn_accuracy': float(knn_accuracy), 'linear_probe_accuracy': float(probe.accuracy),
          'probe_weight_decay': float(probe.weight_decay),
          'collapse_std': float(collapse.normalized_std(train_z)),
          'n_train': int(len(train_y)), 'n_test': int(len(test_y)),
          'train_wall_seconds': None if untrained else _wall_seconds(workdir),
          'eval_seconds': time.time() - start}


def markdown(rows: list) -> str:
  lines = ['| method | encoder | steps | k-NN acc | linear probe acc | collapse std | '
           'train wall |', '|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    wall = '-' if r['train_wall_seconds'] is None else f"{r['train_wall_seconds'] / 60:.0f} min"
    lines.append(f"| {r['label']} | {r['encoder']} | {r['train_steps']} | "
                 f"{100 * r['knn_accuracy']:.1f}% | {100 * r['linear_probe_accuracy']:.1f}% | "
                 f"{r['collapse_std']:.3f} | {wall} |")
  return '\n'.join(lines)


def _entry(parser, text: str) -> tuple[str, str]:
  label, sep, workdir = text.partition(':')
  if not sep or not label or not workdir:
    parser.error(f'{text!r}; expected label:workdir')
  return label, workdir


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m lab.eval.ssl_table',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', action='append', default=[], help='label:workdir (trained)')
  parser.add_argument('--random', action='append', default=[],
                      help="label:workdir (that run's encoder, untrained)")
  parser.add_argument('--out', required=True)
  parser.add_argument('--n_train', type=int, default=10000)
  args = parser.parse_args(argv)
  if not args.run and not args.random:
    parser.error('expected at least one --run or --random')
  os.makedirs(args.out, exist_ok=True)
  rows = []
  for text, untrained in [(t, False) for t in args.run] + [(t, True) for t in args.random]:
    label, workdir = _entry(parser, text)
    rows.append(evaluate(label, workdir, untrained=untrained, n_train=args.n_train))
    print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(args.out, 'table.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write(markdown(rows) + '\n')
  print(markdown(rows))


if __name__ == '__main__':
  main()
