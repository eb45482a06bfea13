"""Labelled images as float32 in [-1, 1], channels-last, for generative models and classifiers.

  'digits'  scikit-learn's load_digits (no download): 1797 8x8 images with grey levels 0..16,
            split 1500 train / 297 test by a fixed permutation.
  'mnist'   TFDS mnist from the data dir (lab.data.corpora.tfds_data_dir): 60000 / 10000 28x28.

config.data: source, data_dir, image_size (0 = native; larger pads with the background value -1,
smaller resizes with an antialiased linear filter), eval_batches. Training examples are shuffled
by grain with the run's seed and reshuffled every epoch; each process reads its own slice.
Training batches are {'image', 'label', 'index'}: index is the example's row in the train split
(0 .. train_size - 1), which memory-bank methods (InstDisc) need; eval batches have no index.
"""
from __future__ import annotations

import os

import grain
import jax
import numpy as np

from lab.config import ConfigError
from lab.data import corpora
from lab.data.dataset import Dataset

SOURCES = ('digits', 'mnist')
_DIGITS_TRAIN = 1500


def _digits(split: str):
  from sklearn.datasets import load_digits
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  idx = order[:_DIGITS_TRAIN] if split == 'train' else order[_DIGITS_TRAIN:]
  return digits.images[idx, :, :, None] / 8.0 - 1.0, digits.target[idx]


def _mnist_source(split: str, data_dir: str):
  root = corpora.tfds_data_dir(data_dir)
  if not os.path.isdir(os.path.join(root, 'mnist')):
    raise ConfigError(f'data.source="mnist": no mnist dataset in data dir {root!r}')
  import tensorflow_datasets as tfds
  return tfds.data_source('mnist', split=split, data_dir=root)


def _mnist(split: str, data_dir: str):
  source = _mnist_source(split, data_dir)
  records = source.__getitems__(range(len(source)))
  images = np.stack([r['image'] for r in records])
  return images / 127.5 - 1.0, np.array([r['label'] for r in records])


def _to_size(images_BXYC: np.ndarray, image_size: int) -> np.ndarray:
  size = images_BXYC.shape[1]
  if image_size == 0 or image_size == size:
    return images_BXYC
  if image_size > size:
    lo = (image_size - size) // 2
    pad = [(0, 0), (lo, image_size - size - lo), (lo, image_size - size - lo), (0, 0)]
    return np.pad(images_BXYC, pad, constant_values=-1.0)
  shape = (len(images_BXYC), image_size, image_size, images_BXYC.shape[-1])
  return np.clip(jax.image.resize(images_BXYC, shape, 'linear', antialias=True), -1.0, 1.0)


def load_arrays(source: str, split: str, data_dir: str = '', image_size: int = 0):
  """(images float32[B, X, Y, C] in [-1, 1], labels int32[B]) of one split ('train' | 'test')."""
  if split not in ('train', 'test'):
    raise ValueError(f'split={split!r}; expected "train" or "test"')
  if image_size < 0:
    raise ValueError(f'image_size={image_size}; expected 0 (native) or a positive size')
  if source == 'digits':
    images, labels = _digits(split)
  elif source == 'mnist':
    images, labels = _mnist(split, data_dir)
  else:
    raise ConfigError(f'data.source={source!r}; expected one of {SOURCES}')
  return _to_size(images.astype(np.float32), image_size), labels.astype(np.int32)


def train_size(source: str, data_dir: str = '') -> int:
  """The number of training examples of `source`, without reading them."""
  if source == 'digits':
    return _DIGITS_TRAIN
  if source == 'mnist':
    return len(_mnist_source('train', data_dir))
  raise ConfigError(f'data.source={source!r}; expected one of {SOURCES}')


def train_examples(arrays: dict, batch_size: int, seed: int):
  """A grain iterator of batches of `arrays` (e.g. {'image': [N, X, Y, C], 'label': [N]}), each
  [batch_size // process_count, ...], shuffled by `seed` and repeated over epochs."""
  n_proc, proc = jax.process_count(), jax.process_index()
  n = len(next(iter(arrays.values())))
  if batch_size % n_proc:
    raise ConfigError(f'train.batch_size={batch_size} is not divisible by {n_proc} processes')
  if n < batch_size:
    raise ConfigError(f'train.batch_size={batch_size} exceeds the {n} training examples')
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()[proc::n_proc]
  ds = ds.map(lambda i: {k: v[i] for k, v in arrays.items()})
  return iter(ds.batch(batch_size // n_proc, drop_remainder=True).to_iter_dataset())


def eval_examples(images_BXYC, labels_B, batch_size: int, n_batches: int) -> list:
  """Up to n_batches full batches from the start of the test split."""
  n = min(len(labels_B) // batch_size, n_batches) * batch_size
  if n == 0:
    raise ConfigError(f'{len(labels_B)} test images and data.eval_batches={n_batches} hold no '
                      f'batch of train.batch_size={batch_size}')
  return [{'image': x, 'label': y} for x, y in zip(np.split(images_BXYC[:n], n // batch_size),
                                                   np.split(labels_B[:n], n // batch_size))]


def build(config) -> Dataset:
  """config_updates fill model.image_size and model.channels where the model has them; whether a
  model is class-conditional (model.num_classes) is the experiment's choice, not the data's."""
  cfg = config.data
  train_x, train_y = load_arrays(cfg.source, 'train', cfg.data_dir, cfg.image_size)
  test_x, test_y = load_arrays(cfg.source, 'test', cfg.data_dir, cfg.image_size)
  batch = config.train.batch_size
  shape = {'image_size': train_x.shape[1], 'channels': train_x.shape[-1]}
  arrays = {'image': train_x, 'label': train_y, 'index': np.arange(len(train_y), dtype=np.int32)}
  return Dataset(
      make_train_iter=lambda: train_examples(arrays, batch, config.seed),
      eval_batches=eval_examples(test_x, test_y, batch, cfg.eval_batches),
      config_updates={f'model.{k}': v for k, v in shape.items() if k in config.model})
