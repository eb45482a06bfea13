"""Frechet distance against closed forms and scipy's sqrtm; the digits classifier and its FID."""
import numpy as np
import pytest
import scipy.linalg

from lab.data import images
from lab.eval import feature_fid


def random_cov(rng, f):
  a_FF = rng.standard_normal((f, f))
  return a_FF @ a_FF.T / f + 0.1 * np.eye(f)


def test_frechet_distance_commuting_covariances_closed_form():
  # S1 = U diag(a) U^T, S2 = U diag(b) U^T commute: Tr(S1 + S2 - 2 (S1 S2)^(1/2)) =
  # sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  u_FF, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  a_F, b_F = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  mu1_F, mu2_F = rng.standard_normal(6), rng.standard_normal(6)
  want = np.sum((mu1_F - mu2_F) ** 2) + np.sum((np.sqrt(a_F) - np.sqrt(b_F)) ** 2)
  for u in (np.eye(6), u_FF):  # diagonal, then rotated
    got = feature_fid.frechet_distance(mu1_F, (u * a_F) @ u.T, mu2_F, (u * b_F) @ u.T)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  s1_FF, s2_FF = random_cov(rng, 8), random_cov(rng, 8)
  mu1_F, mu2_F = rng.standard_normal(8), rng.standard_normal(8)
  want = (np.sum((mu1_F - mu2_F) ** 2)
          + np.trace(s1_FF + s2_FF - 2 * scipy.linalg.sqrtm(s1_FF @ s2_FF).real))
  np.testing.assert_allclose(feature_fid.frechet_distance(mu1_F, s1_FF, mu2_F, s2_FF), want,
                             rtol=1e-9)
  np.testing.assert_allclose(feature_fid.frechet_distance(mu2_F, s2_FF, mu1_F, s1_FF), want,
                             rtol=1e-9)
  assert abs(feature_fid.frechet_distance(mu1_F, s1_FF, mu1_F, s1_FF)) < 1e-10


@pytest.fixture(scope='module')
def digits_net():
  x, y = images.load_arrays('digits', 'train')
  return feature_fid.train_classifier(x, y, num_classes=10, steps=120, seed=0)


def test_classifier_reaches_90_percent_on_digits_test(digits_net):
  assert digits_net.accuracy(*images.load_arrays('digits', 'test')) > 0.9


def test_feature_fid_small_for_real_halves_large_for_noise(digits_net):
  x, _ = images.load_arrays('digits', 'train')
  real, other = x[:750], x[750:]
  f_BF = digits_net.features(real)
  assert f_BF.shape == (750, feature_fid.FEATURES) and f_BF.dtype == np.float64
  noise = np.random.default_rng(0).uniform(-1, 1, real.shape).astype(np.float32)
  blurred = (real + np.roll(real, 1, axis=1) + np.roll(real, 1, axis=2)) / 3
  fid_real, fid_blur, fid_noise = (feature_fid.feature_fid(digits_net, real, fake)
                                   for fake in (other, blurred, noise))
  assert fid_real < fid_blur < fid_noise, (fid_real, fid_blur, fid_noise)
  assert fid_real < 0.05 * fid_noise
  mu_F, s_FF = feature_fid.feature_stats(digits_net, other)
  np.testing.assert_allclose(mu_F, digits_net.features(other).mean(0), rtol=1e-12)
  np.testing.assert_allclose(
      feature_fid.frechet_distance(*feature_fid.feature_stats(digits_net, real), mu_F, s_FF),
      fid_real, rtol=1e-12)


def test_save_load_round_trip(digits_net, tmp_path):
  path = str(tmp_path / 'classifier.npz')
  digits_net.save(path)
  loaded = feature_fid.FeatureNet.load(path)
  x, _ = images.load_arrays('digits', 'test')
  np.testing.assert_array_equal(loaded.features(x), digits_net.features(x))


def test_labels_beyond_num_classes_are_an_error():
  x, y = images.load_arrays('digits', 'test')
  with pytest.raises(ValueError, match='num_classes=5'):
    feature_fid.train_classifier(x, y, num_classes=5, steps=1, seed=0)


def test_images_of_another_size_are_an_error(digits_net):
  with pytest.raises(ValueError, match=r'\(2, 16, 16, 1\)'):
    digits_net.features(np.zeros((2, 16, 16, 1), np.float32))
