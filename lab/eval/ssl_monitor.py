"""A k-NN monitor for self-supervised training, as the loop's sample hook (Task.sample).

Every train.sample_every steps it embeds a fixed labelled subset of the run's dataset with the
current encoder (eval mode) and reports the weighted k-NN accuracy of the test images against
the training ones (InstDisc sec. 3.4, lab.eval.knn) and the collapse std of the L2-normalised
features (SimSiam sec. 4.1, lab.eval.collapse; about 1/sqrt(D) when spread, 0 when collapsed).
The numbers go to samples.txt and the terminal; the full evaluation is lab.eval.ssl_table.
"""
from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from lab.data import images
from lab.eval import collapse, knn


def make_monitor(config, features: Callable, n_bank: int = 2000, n_query: int = 500,
                 batch: int = 250) -> Callable:
  """sample(params, state, rng) -> {'knn_accuracy': text, 'collapse_std': text}.

  features(params, state, images_BXYC) -> z_BD is the encoder in eval mode; it is jitted once
  and the subset (the first n_bank training and n_query test images of config.data) is fixed.
  """
  cfg = config.data
  bank_x, bank_y = images.load_arrays(cfg.source, 'train', cfg.data_dir, cfg.image_size)
  query_x, query_y = images.load_arrays(cfg.source, 'test', cfg.data_dir, cfg.image_size)
  bank_x, bank_y = bank_x[:n_bank], bank_y[:n_bank]
  query_x, query_y = query_x[:n_query], query_y[:n_query]
  jitted = jax.jit(features)

  def embed(params, state, x_BXYC):
    out = []
    for start in range(0, len(x_BXYC), batch):
      chunk = x_BXYC[start:start + batch]
      pad = batch - len(chunk)
      z = jitted(params, state, np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)]))
      out.append(z[:batch - pad])
    return np.concatenate(jax.device_get(out))

  def sample(params, state, rng):
    del rng
    bank_z, query_z = embed(params, state, bank_x), embed(params, state, query_x)
    accuracy, _ = knn.knn_classify(bank_z, bank_y, query_z, query_y, num_classes=10)
    std = float(collapse.normalized_std(bank_z))
    return {'knn_accuracy': f'{accuracy:.4f} ({len(query_y)} test vs {len(bank_y)} train images)',
            'collapse_std': f'{std:.4f} (1/sqrt(D) = {bank_z.shape[1] ** -0.5:.4f})'}

  return sample
