"""Weighted k-NN against a brute-force float64 NumPy vote; separable clusters; chunking; digits
through features.extract."""
import jax.numpy as jnp
import numpy as np
import pytest

from lab.data import images
from lab.eval import features, knn


def np_weighted_knn(bank_MD, labels_M, queries_QD, num_classes, k, tau):
  """InstDisc sec. 3.4 one query at a time: cosine similarities, the k largest, class weights
  w_c = sum_i exp(s_i / tau) [c_i = c]; also the vote margin between the best two classes."""
  bank = bank_MD / np.linalg.norm(bank_MD, axis=1, keepdims=True)
  preds, margins = [], []
  for q in queries_QD:
    s = bank @ (q / np.linalg.norm(q))
    top = np.argsort(-s)[:k]
    w = np.zeros(num_classes)
    for i in top:
      w[labels_M[i]] += np.exp(s[i] / tau)
    preds.append(np.argmax(w))
    margins.append(np.diff(np.sort(w)[-2:])[0] / w.max())
  return np.array(preds), np.array(margins)


@pytest.mark.parametrize('k,tau', [(1, 0.07), (5, 0.07), (20, 0.5)])
def test_matches_brute_force_vote(k, tau):
  rng = np.random.default_rng(k)
  bank_MD = rng.standard_normal((120, 6)) * rng.uniform(0.5, 3, (120, 1))  # norms differ
  labels_M = rng.integers(0, 5, 120)
  queries_QD = rng.standard_normal((37, 6))
  test_labels_Q = rng.integers(0, 5, 37)
  want, margin = np_weighted_knn(bank_MD, labels_M, queries_QD, 5, k, tau)
  acc, got = knn.knn_classify(bank_MD.astype(np.float32), labels_M, queries_QD.astype(np.float32),
                              test_labels_Q, k=k, temperature=tau, chunk_size=16)
  assert got.shape == (37,) and got.dtype == np.int32
  clear = margin > 1e-4  # float32 may break a vote that float64 calls a near tie either way
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(got[clear], want[clear])
  assert acc == np.mean(got == test_labels_Q)


def test_separable_clusters_are_classified_perfectly():
  rng = np.random.default_rng(0)
  centers_VD = 5 * rng.standard_normal((4, 8))
  labels_M, labels_Q = rng.integers(0, 4, 200), rng.integers(0, 4, 50)
  bank_MD = centers_VD[labels_M] + 0.3 * rng.standard_normal((200, 8))
  queries_QD = centers_VD[labels_Q] + 0.3 * rng.standard_normal((50, 8))
  acc, preds = knn.knn_classify(bank_MD, labels_M, queries_QD, labels_Q)
  assert acc == 1.0
  np.testing.assert_array_equal(preds, labels_Q)
  # Shuffled training labels carry no information: chance accuracy.
  acc_shuffled, _ = knn.knn_classify(bank_MD, rng.permutation(labels_M), queries_QD, labels_Q)
  assert acc_shuffled < 0.6


def test_chunking_does_not_change_predictions():
  rng = np.random.default_rng(1)
  bank_MD, labels_M = rng.standard_normal((90, 5)), rng.integers(0, 7, 90)
  queries_QD, labels_Q = rng.standard_normal((41, 5)), rng.integers(0, 7, 41)
  _, want = knn.knn_classify(bank_MD, labels_M, queries_QD, labels_Q, k=10, chunk_size=41)
  for chunk_size in (1, 8, 40, 1000):
    _, got = knn.knn_classify(bank_MD, labels_M, queries_QD, labels_Q, k=10,
                              chunk_size=chunk_size)
    np.testing.assert_array_equal(got, want)


def test_digits_pixels_through_extract():
  # features.extract with a random projection of the pixels as the "backbone": one trace for all
  # batches (the last padded), the same features as one big call, and k-NN above 95% on digits.
  train_x, train_y = images.load_arrays('digits', 'train')
  test_x, test_y = images.load_arrays('digits', 'test')
  proj_PD = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)), jnp.float32)
  traces = []

  def backbone(images_BXYC):
    traces.append(images_BXYC.shape)
    return images_BXYC.reshape(images_BXYC.shape[0], -1) @ proj_PD

  f_train = features.extract(backbone, train_x, batch_size=256)  # 1500 = 5 x 256 + 220
  assert traces == [(256, 8, 8, 1)] and f_train.shape == (1500, 48)
  np.testing.assert_allclose(f_train, np.asarray(train_x.reshape(1500, 64) @ proj_PD),
                             rtol=1e-5, atol=1e-4)
  f_test = features.extract(backbone, test_x, batch_size=256)
  acc, _ = knn.knn_classify(f_train, train_y, f_test, test_y, k=20)
  assert acc > 0.95, acc


@pytest.mark.parametrize('kwargs,match', [({'k': 0}, 'k=0'), ({'k': 31}, 'k=31'),
                                          ({'temperature': 0.0}, 'temperature=0.0'),
                                          ({'num_classes': 2}, 'num_classes=2')])
def test_bad_arguments_are_errors(kwargs, match):
  rng = np.random.default_rng(2)
  with pytest.raises(ValueError, match=match):
    knn.knn_classify(rng.standard_normal((30, 4)), np.arange(30) % 3, rng.standard_normal((5, 4)),
                     np.zeros(5, int), **kwargs)


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError, match=r'\(5, 3\)'):
    knn.knn_classify(np.ones((30, 4)), np.zeros(30, int), np.ones((5, 3)), np.zeros(5, int))
  with pytest.raises(ValueError, match='batch_size=0'):
    features.extract(lambda x: x, np.zeros((3, 2)), batch_size=0)
  with pytest.raises(ValueError, match=r'shape \(4, 2, 1\)'):
    features.extract(lambda x: x[..., None], np.zeros((3, 2)), batch_size=4)
