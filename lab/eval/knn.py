"""Weighted k-nearest-neighbour classification on frozen features.

Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (InstDisc, arXiv:1805.01978), sec. 3.4, as DINO's eval_knn (Caron et al. 2021,
arXiv:2104.14294) runs it: features are L2-normalised, a query's k most cosine-similar training
features vote for their labels with weight exp(s / tau), and the class with the most weight wins.

Letters: M training (bank) examples, Q queries, G query chunks, R the k retrieved neighbours,
V classes, D feature width.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(f_MD: jax.Array, eps: float = 1e-12) -> jax.Array:
  """f / max(||f||_2, eps) per row (torch's F.normalize)."""
  return f_MD / jnp.maximum(jnp.linalg.norm(f_MD, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k', 'chunk_size'))
def knn_predict(bank_MD: jax.Array, bank_labels_M: jax.Array, queries_QD: jax.Array, *,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 256) -> jax.Array:
  """int32 predictions [Q]: argmax_c sum_{i in top-k(q)} exp(s_qi / tau) [y_i = c] with
  s_qi = <f_q, f_i> / (||f_q|| ||f_i||) (InstDisc sec. 3.4: w_c = sum alpha_i [c_i = c],
  alpha_i = exp(s_i / tau)). Queries are processed chunk_size at a time, so memory is
  O(chunk_size M); a vote tie goes to the smaller class index."""
  bank_MD = l2_normalize(bank_MD)
  n_queries = queries_QD.shape[0]
  n_chunks = -(-n_queries // chunk_size)
  padded_QD = jnp.pad(queries_QD, ((0, n_chunks * chunk_size - n_queries), (0, 0)))

  def predict_chunk(q_QD):
    sims_QM = jnp.einsum('QD,MD->QM', l2_normalize(q_QD), bank_MD)
    sims_QR, idx_QR = jax.lax.top_k(sims_QM, k)
    votes_QRV = jax.nn.one_hot(bank_labels_M[idx_QR], num_classes, dtype=sims_QR.dtype)
    votes_QV = jnp.einsum('QR,QRV->QV', jnp.exp(sims_QR / temperature), votes_QRV)
    return jnp.argmax(votes_QV, axis=-1).astype(jnp.int32)

  preds_GQ = jax.lax.map(predict_chunk, padded_QD.reshape(n_chunks, chunk_size, -1))
  return preds_GQ.reshape(-1)[:n_queries]


def knn_classify(train_features_MD, train_labels_M, test_features_QD, test_labels_Q, *,
                 k: int = 20, temperature: float = 0.07, chunk_size: int = 256,
                 num_classes: int | None = None) -> tuple[float, np.ndarray]:
  """(top-1 accuracy, predictions [Q]) of the weighted k-NN vote (knn_predict) of the test
  features against the training bank. num_classes defaults to 1 + the largest label."""
  train_labels_M, test_labels_Q = np.asarray(train_labels_M), np.asarray(test_labels_Q)
  (m, d), (q, d_q) = np.shape(train_features_MD), np.shape(test_features_QD)
  if d != d_q or train_labels_M.shape != (m,) or test_labels_Q.shape != (q,) or q < 1:
    raise ValueError(f'features {np.shape(train_features_MD)} / {np.shape(test_features_QD)} and '
                     f'labels {train_labels_M.shape} / {test_labels_Q.shape}; expected [M, D], '
                     '[Q, D], [M], [Q] with Q >= 1')
  if not 1 <= k <= m:
    raise ValueError(f'k={k}; expected 1 <= k <= {m} (the training bank size)')
  if temperature <= 0 or chunk_size < 1:
    raise ValueError(f'temperature={temperature}, chunk_size={chunk_size}; expected both > 0')
  num_classes = int(train_labels_M.max()) + 1 if num_classes is None else num_classes
  if train_labels_M.min() < 0 or train_labels_M.max() >= num_classes:
    raise ValueError(f'training labels in [{train_labels_M.min()}, {train_labels_M.max()}]; '
                     f'expected labels in [0, num_classes={num_classes})')
  preds_Q = np.asarray(knn_predict(
      jnp.asarray(train_features_MD), jnp.asarray(train_labels_M, jnp.int32),
      jnp.asarray(test_features_QD), num_classes=num_classes, k=k, temperature=temperature,
      chunk_size=min(chunk_size, q)))
  return float(np.mean(preds_Q == test_labels_Q)), preds_Q
