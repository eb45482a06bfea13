"""Features of a whole dataset from a frozen backbone, for k-NN and linear-probe evaluation.

The backbone is any function features_fn(images_BXYC) -> features_BD (e.g. a closure over
frozen params). Images go through it in fixed batches of batch_size, the last one padded by
repeating its final image and trimmed afterwards, so it is traced and compiled once.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np


def extract(features_fn: Callable[[jax.Array], jax.Array], images_BXYC,
            batch_size: int = 256) -> np.ndarray:
  """np.ndarray [B, D]: concatenate_i features_fn(images[i b : (i + 1) b]) over batches of
  b = batch_size, computed under one jax.jit of features_fn."""
  n = len(images_BXYC)
  if batch_size < 1 or n < 1:
    raise ValueError(f'batch_size={batch_size} for {n} images; expected both >= 1')
  jitted = jax.jit(features_fn)
  out = []
  for start in range(0, n, batch_size):
    batch = np.asarray(images_BXYC[start:start + batch_size])
    pad = batch_size - len(batch)
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    f_BD = jitted(batch)
    if f_BD.ndim != 2 or f_BD.shape[0] != batch_size:
      raise ValueError(f'features_fn gave shape {f_BD.shape} for a batch of {batch_size}; '
                       f'expected [{batch_size}, D]')
    out.append(f_BD[:batch_size - pad])  # still on device: batches are dispatched back to back
  return np.concatenate(jax.device_get(out))
