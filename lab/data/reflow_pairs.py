"""(sample, noise) pairs written by lab.sampling.reflow, served as training batches.

config.data: pairs_path (the .npz), eval_batches. Batches are {'image' or 'x', 'noise'
(, 'label')}; lab/objectives/diffusion.py then noises each sample with its own paired noise
(rectified flow's reflow, Liu et al. 2023 §2.2) instead of fresh noise.
"""
from __future__ import annotations

import os

import numpy as np

from lab.config import ConfigError
from lab.data.dataset import Dataset
from lab.data.images import train_examples


def build(config) -> Dataset:
  path = config.data.pairs_path
  if not os.path.exists(path):
    raise ConfigError(f'data.pairs_path={path!r} does not exist; write it with '
                      'python -m lab.sampling.reflow')
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  if 'noise' not in arrays or not {'image', 'x'} & set(arrays):
    raise ConfigError(f'data.pairs_path={path!r} holds {sorted(arrays)}; expected noise and '
                      'image or x')
  batch, n_eval = config.train.batch_size, config.data.eval_batches * config.train.batch_size
  if len(arrays['noise']) <= n_eval:
    raise ConfigError(f'{len(arrays["noise"])} pairs in {path!r}; expected more than the '
                      f'{n_eval} held out for eval')
  held_out = {k: v[:n_eval] for k, v in arrays.items()}
  train = {k: v[n_eval:] for k, v in arrays.items()}
  eval_batches = [{k: v[i:i + batch] for k, v in held_out.items()}
                  for i in range(0, n_eval, batch)]
  sample = arrays['image' if 'image' in arrays else 'x']
  updates = ({'model.image_size': sample.shape[1], 'model.channels': sample.shape[-1]}
             if sample.ndim == 4 else {'model.channels': sample.shape[-1]})
  return Dataset(make_train_iter=lambda: train_examples(train, batch, config.seed),
                 eval_batches=eval_batches,
                 config_updates={k: v for k, v in updates.items()
                                 if k.split('.')[1] in config.model})
