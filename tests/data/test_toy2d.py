"""2-D toy distributions: samples follow the stated densities, densities are normalised and match
scipy / scikit-learn, and training batches are deterministic and resume exactly."""
import functools

import ml_collections
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import logsumexp

from lab.config import ConfigError
from lab.data import toy2d

H = 0.05  # grid spacing; cell edges fall on the integers, so the checkerboard sum is exact
EDGES = np.arange(-5, 5 + H / 2, H)


@functools.lru_cache(maxsize=None)
def grid_density(name):
  """Density at the midpoints of the H-grid on [-5, 5]^2, [X, Y]."""
  mid = (EDGES[:-1] + EDGES[1:]) / 2
  xx, yy = np.meshgrid(mid, mid, indexing='ij')
  return np.exp(toy2d.log_density(name, np.stack([xx.ravel(), yy.ravel()], -1))).reshape(xx.shape)


@pytest.mark.parametrize('name', sorted(toy2d.DISTRIBUTIONS))
def test_log_density_integrates_to_one(name):
  # The midpoint rule is exact for the checkerboard and spectrally accurate for std-0.1 bumps.
  np.testing.assert_allclose(grid_density(name).sum() * H * H, 1.0, atol=1e-6)


@pytest.mark.parametrize('name', sorted(toy2d.DISTRIBUTIONS))
def test_sample_histogram_matches_density(name):
  n, cell = 200_000, 5  # 0.25 x 0.25 histogram cells of 5 x 5 grid points
  x_N2 = toy2d.sample(name, np.random.default_rng(0), n)
  assert x_N2.shape == (n, 2) and x_N2.dtype == np.float32
  counts, _, _ = np.histogram2d(x_N2[:, 0], x_N2[:, 1], bins=[EDGES[::cell]] * 2)
  p = grid_density(name)
  expected = n * H * H * p.reshape(len(p) // cell, cell, len(p) // cell, cell).sum((1, 3))
  busy = expected > 30
  z = (counts[busy] - expected[busy]) / np.sqrt(expected[busy])
  assert np.abs(z).max() < 5.5, (name, np.abs(z).max())
  assert counts[~busy].sum() < 30 + 2 * expected[~busy].sum()  # no mass where the density is ~0


def test_checkerboard_samples_lie_in_dark_squares_uniformly():
  n = 80_000
  x_N2 = toy2d.sample('checkerboard', np.random.default_rng(1), n)
  assert np.all(np.abs(x_N2) <= 2)
  corner_N2 = np.floor(x_N2).astype(int)
  assert np.all(corner_N2.sum(-1) % 2 == 0)
  _, per_square = np.unique(corner_N2, axis=0, return_counts=True)
  assert len(per_square) == 8
  assert np.abs(per_square - n / 8).max() < 5 * np.sqrt(n / 8 * 7 / 8)


def test_gmm_moments_and_component_counts():
  ring, n = toy2d.Ring(), 100_000
  x_N2 = toy2d.sample('gmm', np.random.default_rng(2), n).astype(np.float64)
  var = ring.std ** 2 + ring.radius ** 2 / 2  # cov = std^2 I + (1/8) sum_k mu_k mu_k^T
  np.testing.assert_allclose(x_N2.mean(0), 0.0, atol=5 * np.sqrt(var / n))
  np.testing.assert_allclose(np.cov(x_N2, rowvar=False), var * np.eye(2), atol=0.03)
  nearest_N = ((x_N2[:, None] - ring.means_K2[None]) ** 2).sum(-1).argmin(1)
  counts = np.bincount(nearest_N, minlength=8)
  assert np.abs(counts - n / 8).max() < 5 * np.sqrt(n / 8 * 7 / 8)
  dist_N = np.linalg.norm(x_N2 - ring.means_K2[nearest_N], axis=1)  # Rayleigh(std)
  np.testing.assert_allclose(np.mean(dist_N ** 2), 2 * ring.std ** 2, rtol=0.03)


def test_gaussian_and_gmm_log_density_match_scipy():
  x_N2 = np.random.default_rng(3).uniform(-3, 3, (50, 2))
  g = toy2d.Gaussian()
  np.testing.assert_allclose(toy2d.log_density('gaussian', x_N2),
                             stats.multivariate_normal(g.mean, g.cov).logpdf(x_N2), rtol=1e-12)
  x_N2 = toy2d.sample('gmm', np.random.default_rng(4), 50)
  angle_K = 2 * np.pi * np.arange(8) / 8
  comp_KN = [stats.multivariate_normal([2 * np.cos(a), 2 * np.sin(a)], 0.01).logpdf(x_N2)
             for a in angle_K]
  np.testing.assert_allclose(toy2d.log_density('gmm', x_N2),
                             logsumexp(comp_KN, axis=0) - np.log(8), rtol=1e-10)


def test_moons_lie_on_sklearn_arcs_and_density_matches_adaptive_quadrature():
  from sklearn.datasets import make_moons
  arcs_M2, _ = make_moons(n_samples=40_000, noise=0.0)
  arcs_M2 = 2 * (arcs_M2 - [0.5, 0.25])
  clean_N2 = toy2d.Moons(std=0.0).sample(np.random.default_rng(5), 300)
  gap_N = np.sqrt(((clean_N2[:, None] - arcs_M2[None]) ** 2).sum(-1)).min(1)
  assert gap_N.max() < 1e-3
  # p(x) = (1/2) sum_arcs (1/pi) int_0^pi N(x; c(t), 0.01 I) dt, by scipy's adaptive quad.
  x_N2 = np.concatenate([toy2d.sample('moons', np.random.default_rng(6), 6), [[0, 0], [3.1, -0.8]]])
  arcs = [lambda t: 2 * (np.array([np.cos(t), np.sin(t)]) - [0.5, 0.25]),
          lambda t: 2 * (np.array([1 - np.cos(t), 0.5 - np.sin(t)]) - [0.5, 0.25])]
  pdf = lambda x, c: np.exp(-((x - c) ** 2).sum() / 0.02) / (0.02 * np.pi)
  want_N = [np.log(sum(integrate.quad(lambda t: pdf(x, arc(t)) / (2 * np.pi), 0, np.pi,
                                      points=[np.pi / 2], limit=200, epsabs=0, epsrel=1e-12)[0]
                       for arc in arcs)) for x in x_N2]
  np.testing.assert_allclose(toy2d.log_density('moons', x_N2), want_N, rtol=1e-10)


def test_unknown_distribution_is_an_error():
  with pytest.raises(ValueError, match="'spiral'"):
    toy2d.sample('spiral', np.random.default_rng(0), 3)


def _config(**data):
  return ml_collections.ConfigDict({
      'seed': 7, 'train': {'batch_size': 16}, 'model': {},
      'data': {'name': 'toy2d', 'distribution': 'gmm', 'eval_batches': 3, **data}})


def test_train_batches_are_fresh_deterministic_and_resume_exactly():
  data = toy2d.build(_config())
  it = data.make_train_iter()
  first = [next(it)['x'] for _ in range(4)]
  assert first[0].shape == (16, 2) and first[0].dtype == np.float32
  assert not np.array_equal(first[0], first[1])
  np.testing.assert_array_equal(first[2], toy2d.sample('gmm', np.random.default_rng((7, 0, 2)), 16))
  state = it.get_state()
  after = [next(it)['x'] for _ in range(3)]
  fresh = data.make_train_iter()
  fresh.set_state(state)
  for a in after:
    np.testing.assert_array_equal(next(fresh)['x'], a)
  assert len(data.eval_batches) == 3 and data.eval_batches[0]['x'].shape == (16, 2)
  assert data.config_updates == {}
  with_channels = _config()
  with_channels.model.channels = 0
  assert toy2d.build(with_channels).config_updates == {'model.channels': 2}
  assert not any(np.array_equal(e['x'], f) for e in data.eval_batches for f in first)


@pytest.mark.parametrize('field,value', [('distribution', 'spiral'), ('eval_batches', 0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ConfigError, match=f'data.{field}'):
    toy2d.build(_config(**{field: value}))


def test_processes_draw_different_halves(monkeypatch):
  import jax
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  local = []
  for proc in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda: proc)
    local.append(next(toy2d.train_batches('gaussian', 16, seed=7))['x'])
    assert local[-1].shape == (8, 2)
  np.testing.assert_array_equal(local[1], toy2d.sample('gaussian', np.random.default_rng((7, 0, 1)),
                                                       8))
  assert not np.array_equal(local[0], local[1])
  with pytest.raises(ConfigError, match='batch_size=15'):
    toy2d.train_batches('gaussian', 15, seed=7)
