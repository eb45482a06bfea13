"""Sliced Wasserstein and MMD against analytic values and float64 NumPy oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.eval import distances


def np_w2_squared(x_N, y_M):
  """Exact W_2^2 between two 1-D empirical measures: repeat every x M times and every y N times,
  so both have N M equally weighted atoms and sorted pairing is optimal."""
  xs, ys = np.sort(np.repeat(x_N, len(y_M))), np.sort(np.repeat(y_M, len(x_N)))
  return np.mean((xs - ys) ** 2)


def np_mmd_u(x_NC, y_MC, bandwidths):
  """Gretton et al. 2012, eq. 3, as an explicit double loop in float64."""
  k = lambda a, b: sum(np.exp(-np.sum((a - b) ** 2) / (2 * h * h)) for h in bandwidths)
  n, m = len(x_NC), len(y_MC)
  xx = sum(k(x_NC[i], x_NC[j]) for i in range(n) for j in range(n) if i != j)
  yy = sum(k(y_MC[i], y_MC[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x_NC[i], y_MC[j]) for i in range(n) for j in range(m))
  return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)


@pytest.mark.parametrize('n,m', [(6, 6), (5, 3), (4, 8), (7, 1)])
def test_1d_w2_matches_replication_oracle(x64, n, m):
  rng = np.random.default_rng(n * 10 + m)
  x_LN, y_LM = rng.standard_normal((3, n)), 2 + rng.standard_normal((3, m))
  got_L = distances.wasserstein_1d_squared(jnp.asarray(x_LN), jnp.asarray(y_LM))
  np.testing.assert_allclose(got_L, [np_w2_squared(a, b) for a, b in zip(x_LN, y_LM)],
                             rtol=1e-12)
  # In one dimension every unit direction is +-1, so SW_2 is W_2 whatever the key.
  sw = distances.sliced_wasserstein(jnp.asarray(x_LN[0, :, None]), jnp.asarray(y_LM[0, :, None]),
                                    jax.random.key(n), n_projections=4)
  np.testing.assert_allclose(sw, np.sqrt(np_w2_squared(x_LN[0], y_LM[0])), rtol=1e-12)


def test_sliced_wasserstein_of_shifted_gaussians(dim=3):
  # x ~ N(0, I), y ~ N(delta, I). Along theta both project to unit-variance Gaussians whose means
  # differ by <theta, delta>, so W_2^2 = <theta, delta>^2 and, as E[theta theta^T] = I / C for
  # theta uniform on the sphere, SW_2^2 = |delta|^2 / C.
  rng = np.random.default_rng(dim)
  delta_C = rng.standard_normal(dim)
  delta_C *= 3 / np.linalg.norm(delta_C)
  x_NC = rng.standard_normal((2000, dim)).astype(np.float32)
  y_MC = (delta_C + rng.standard_normal((1500, dim))).astype(np.float32)
  sw = distances.sliced_wasserstein(x_NC, y_MC, jax.random.key(0), n_projections=1000)
  # Monte-Carlo error over 1000 directions: std(<theta, delta>^2) / mean = sqrt(2 (C-1) / (C+2))
  # = 0.89, so 2.8%.
  np.testing.assert_allclose(sw ** 2, 9 / dim, rtol=0.1)
  same = distances.sliced_wasserstein(x_NC, rng.standard_normal((1500, dim)).astype(np.float32),
                                      jax.random.key(1), n_projections=1000)
  assert same < 0.1  # finite-sample noise only
  np.testing.assert_allclose(
      distances.sliced_wasserstein(x_NC[:500], x_NC[:500][::-1], jax.random.key(2)), 0, atol=1e-6)


def test_mmd_matches_double_loop_oracle(x64):
  rng = np.random.default_rng(0)
  x_NC, y_MC = rng.standard_normal((7, 3)), 0.5 + rng.standard_normal((5, 3))
  bandwidths = (0.5, 1.0, 2.0)
  np.testing.assert_allclose(distances.mmd_rbf(jnp.asarray(x_NC), jnp.asarray(y_MC), bandwidths),
                             np_mmd_u(x_NC, y_MC, bandwidths), rtol=1e-10)


def test_mmd_near_zero_for_same_distribution_and_positive_for_shift():
  rng = np.random.default_rng(1)
  draw = lambda shift: (shift + rng.standard_normal((1000, 2))).astype(np.float32)
  x = draw(0.0)
  same = [float(distances.mmd_rbf(x, draw(0.0))) for _ in range(3)]
  shifted = float(distances.mmd_rbf(x, draw(np.array([0.5, 0.0]))))
  assert shifted > 0.03 and shifted > 20 * max(abs(s) for s in same), (same, shifted)


def test_mismatched_dims_are_errors():
  with pytest.raises(ValueError, match=r'\(4, 2\)'):
    distances.sliced_wasserstein(jnp.zeros((4, 2)), jnp.zeros((4, 3)), jax.random.key(0))
  with pytest.raises(ValueError, match=r'\(1, 2\)'):
    distances.mmd_rbf(jnp.zeros((1, 2)), jnp.zeros((4, 2)))
