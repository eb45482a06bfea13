"""Linear probe: the fit against scikit-learn's multinomial logistic regression, a known linear rule
recovered, digits from raw pixels, determinism."""
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from lab.data import images
from lab.eval import linear_probe


def draw_rule(seed, m, q, d=6, v=4):
  """Features with per-dimension offsets and scales (so standardisation matters) and labels from
  a known linear rule argmax(x A + c)."""
  rng = np.random.default_rng(seed)
  offset_D, scale_D = rng.uniform(-5, 5, d), rng.uniform(0.1, 10, d)
  a_DV, c_V = rng.standard_normal((d, v)) / scale_D[:, None], rng.standard_normal(v)
  x = offset_D + scale_D * rng.standard_normal((m + q, d))
  y = np.argmax((x - offset_D) @ a_DV + c_V, 1)
  return x[:m], y[:m], x[m:], y[m:]


def softmax(logits):
  e = np.exp(logits - logits.max(1, keepdims=True))
  return e / e.sum(1, keepdims=True)


def test_fit_matches_sklearn_on_standardised_features():
  # min mean CE + lam / 2 ||W||^2 is sklearn's min C sum CE + 1/2 ||W||^2 with C = 1 / (lam M);
  # sklearn's intercept is not penalised either.
  x, y, x_test, _ = draw_rule(0, 300, 50)
  y = np.where(np.random.default_rng(1).uniform(size=300) < 0.2, (y + 1) % 4, y)  # label noise
  lam = 1e-2
  w_DV, b_V = linear_probe.fit_logistic(x.astype(np.float32), y, num_classes=4, weight_decay=lam)
  mean_D, scale_D = x.mean(0), x.std(0)
  ref = LogisticRegression(C=1 / (lam * 300), tol=1e-10, max_iter=10000)
  ref.fit((x - mean_D) / scale_D, y)
  np.testing.assert_allclose(softmax(x_test @ w_DV + b_V),
                             ref.predict_proba((x_test - mean_D) / scale_D), atol=3e-5)
  np.testing.assert_allclose(w_DV * scale_D[:, None], ref.coef_.T, atol=1e-4)


def test_recovers_a_known_linear_rule():
  x, y, x_test, y_test = draw_rule(2, 800, 400)
  result = linear_probe.linear_probe(x, y, x_test, y_test, seed=0)
  assert result.accuracy > 0.97, result
  assert len(result.heldout_accuracy) == len(linear_probe.WEIGHT_DECAYS)
  # Noise-free labels: the least regularised fits are best on held-out data.
  assert result.weight_decay <= 1e-3 and result.heldout_accuracy[-1] < max(result.heldout_accuracy)
  np.testing.assert_allclose(result.accuracy,
                             np.mean(np.argmax(x_test @ result.w_DV + result.b_V, 1) == y_test))
  again = linear_probe.linear_probe(x, y, x_test, y_test, seed=0)
  assert (again.accuracy, again.weight_decay, again.heldout_accuracy) == (
      result.accuracy, result.weight_decay, result.heldout_accuracy)
  np.testing.assert_array_equal(again.w_DV, result.w_DV)
  other = linear_probe.linear_probe(x, y, x_test, y_test, seed=1)  # another held-out split
  assert other.heldout_accuracy != result.heldout_accuracy


def test_digits_raw_pixels_above_90_percent():
  train_x, train_y = images.load_arrays('digits', 'train')
  test_x, test_y = images.load_arrays('digits', 'test')
  result = linear_probe.linear_probe(train_x.reshape(1500, 64), train_y, test_x.reshape(-1, 64),
                                     test_y, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1))
  assert result.accuracy > 0.9, result.accuracy
  # digits has always-blank corner pixels: constant features keep scale 1 and weight 0.
  blank = train_x.reshape(1500, 64).std(0) == 0
  assert blank.any() and np.all(np.isfinite(result.w_DV))
  np.testing.assert_allclose(result.w_DV[blank], 0, atol=1e-6)


def test_standardize_stats():
  x = np.random.default_rng(3).standard_normal((50, 3)) * [1, 5, 0] + [0, 2, 7]
  mean_D, scale_D = linear_probe.standardize_stats(x)
  np.testing.assert_allclose(mean_D, [x[:, 0].mean(), x[:, 1].mean(), 7])
  np.testing.assert_allclose(scale_D, [x[:, 0].std(), x[:, 1].std(), 1])


@pytest.mark.parametrize('kwargs,match', [({'heldout_fraction': 0.0}, 'heldout_fraction=0.0'),
                                          ({'weight_decays': ()}, r'weight_decays=\(\)'),
                                          ({'num_classes': 2}, 'num_classes=2')])
def test_bad_arguments_are_errors(kwargs, match):
  x, y, x_test, y_test = draw_rule(4, 20, 5)
  with pytest.raises(ValueError, match=match):
    linear_probe.linear_probe(x, y, x_test, y_test, **kwargs)
