"""Language-model batches from one token stream: random windows of block_size + 1 tokens.

Training windows start at every offset of the stream, shuffled by grain with the run's seed and
reshuffled every epoch; each process reads its own slice (`ds[process_index::process_count]`).
The iterator's state is one integer, so checkpoints resume the exact batch sequence.
"""
from __future__ import annotations

import grain
import jax
import numpy as np

from lab.config import ConfigError


def train_windows(tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
  """A grain iterator of {'tokens': int32[batch_size // process_count, block_size + 1]}."""
  n_windows = len(tokens) - block_size
  if n_windows < batch_size:
    raise ConfigError(f'data.block_size={block_size} leaves {n_windows} windows in a corpus of '
                      f'{len(tokens)} tokens; expected at least train.batch_size={batch_size}')
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise ConfigError(f'train.batch_size={batch_size} is not divisible by {n_proc} processes')
  ds = grain.MapDataset.range(n_windows).shuffle(seed=seed).repeat()[proc::n_proc]
  ds = ds.map(lambda start: {'tokens': tokens[start:start + block_size + 1]})
  return iter(ds.batch(batch_size // n_proc, drop_remainder=True).to_iter_dataset())


def eval_windows(tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int) -> list:
  """Up to n_batches batches of non-overlapping windows from the start of the stream."""
  n_windows = min((len(tokens) - 1) // block_size, batch_size * n_batches)
  n_windows -= n_windows % batch_size
  if n_windows == 0:
    raise ConfigError(f'eval text of {len(tokens)} tokens holds no batch of {batch_size} windows '
                      f'of data.block_size={block_size}')
  starts = np.arange(n_windows) * block_size
  windows = np.stack([tokens[s:s + block_size + 1] for s in starts])
  return [{'tokens': b} for b in np.split(windows, n_windows // batch_size)]
