"""Text corpora: one that ships with Python (no download) and TFDS text datasets."""
from __future__ import annotations

import os
import pathlib

from lab.config import ConfigError


def python_docs() -> str:
  """The pydoc topic pages that CPython ships (`pydoc_data.topics`): ~465k chars of English docs."""
  from pydoc_data import topics
  return '\n\n'.join(topics.topics[name] for name in sorted(topics.topics))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
  """First (1 - val_fraction) of the characters for training, the rest for validation."""
  n = int(len(text) * (1.0 - val_fraction))
  return text[:n], text[n:]


def tfds_data_dir(data_dir: str) -> str:
  """The config's data dir, else $TFDS_DATA_DIR, else ../shared/tfds beside the repo."""
  if data_dir:
    return data_dir
  if os.environ.get('TFDS_DATA_DIR'):
    return os.environ['TFDS_DATA_DIR']
  return str(pathlib.Path(__file__).resolve().parents[2].parent / 'shared' / 'tfds')


def tfds_text(name: str, split: str, data_dir: str) -> str:
  """All records of a TFDS text dataset split joined into one string (read without TensorFlow)."""
  root = tfds_data_dir(data_dir)
  if not os.path.isdir(os.path.join(root, name)):
    raise ConfigError(f'data.tfds_name={name!r}: no such dataset in data dir {root!r}')
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, split=split, data_dir=root)
  return ''.join(source[i]['text'].decode('utf-8') for i in range(len(source)))
