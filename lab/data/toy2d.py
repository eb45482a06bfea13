"""2-D toy distributions with known densities, and fresh-sample batches for the trainer.

  'moons'         scikit-learn's two half circles, centred and scaled by 2, plus isotropic
                  Gaussian noise (std 0.1); log-density by quadrature over the arc parameter.
  'checkerboard'  uniform on the 8 dark squares (those with floor(x) + floor(y) even) of a 4x4
                  board on [-2, 2]^2: density 1/8 there, 0 elsewhere.
  'gmm'           8 equally weighted isotropic Gaussians (std 0.1) with means on a circle of
                  radius 2.
  'gaussian'      one anisotropic, correlated Gaussian N(mean, cov).

config.data: distribution, eval_batches. Step i's training batch is drawn from the generator
seeded with (seed, 0, i), so the iterator's state is the step counter; each process draws its own
slice (the batches i = step * process_count + process_index).
"""
from __future__ import annotations

import dataclasses
import sys

import grain
import jax
import numpy as np
from scipy.special import logsumexp

from lab.config import ConfigError
from lab.data.dataset import Dataset


def _gaussian_log_pdf(x_NC, mean_C, cov_CC):
  """log N(x; mean, cov) in float64."""
  d_NC = np.asarray(x_NC, np.float64) - mean_C
  chol_CC = np.linalg.cholesky(cov_CC)
  z_NC = np.linalg.solve(chol_CC, d_NC.T).T
  log_det = 2 * np.log(np.diag(chol_CC)).sum()
  return -0.5 * (z_NC ** 2).sum(-1) - 0.5 * log_det - 0.5 * len(mean_C) * np.log(2 * np.pi)


@dataclasses.dataclass(frozen=True)
class Moons:
  """x = 2 (c(t) - (0.5, 0.25)) + std * eps, t ~ U(0, pi), c the upper arc (cos t, sin t) or the
  lower arc (1 - cos t, 0.5 - sin t) with probability 1/2 each (sklearn.datasets.make_moons)."""
  std: float = 0.1
  nodes: int = 256  # Gauss-Legendre nodes per arc (128 already give ~1e-13 at std 0.1)

  @staticmethod
  def _centres(t_N, upper_N):
    arc_N2 = np.where(upper_N[:, None], np.stack([np.cos(t_N), np.sin(t_N)], -1),
                      np.stack([1 - np.cos(t_N), 0.5 - np.sin(t_N)], -1))
    return 2 * (arc_N2 - np.array([0.5, 0.25]))

  def sample(self, rng, n):
    centres_N2 = self._centres(rng.uniform(0, np.pi, n), rng.random(n) < 0.5)
    return centres_N2 + self.std * rng.standard_normal((n, 2))

  def log_density(self, x_N2):
    """log (1/2) sum_arcs (1/pi) int_0^pi N(x; c(t), std^2 I) dt by Gauss-Legendre quadrature
    (the integrand is smooth in t, so it converges exponentially in the node count)."""
    u_K, w_K = np.polynomial.legendre.leggauss(self.nodes)
    t_K = (u_K + 1) * np.pi / 2
    centres_K2 = self._centres(np.concatenate([t_K, t_K]), np.arange(2 * self.nodes) < self.nodes)
    log_w_K = np.log(np.concatenate([w_K, w_K]) / 4)  # (1/2) x (1/pi) x (pi/2) w
    out_N = []
    for x_B2 in np.array_split(np.asarray(x_N2, np.float64), max(1, len(x_N2) // 2048)):
      d2_BK = ((x_B2[:, None, :] - centres_K2[None]) ** 2).sum(-1)
      out_N.append(logsumexp(log_w_K - 0.5 * d2_BK / self.std ** 2, axis=1))
    return np.concatenate(out_N) - np.log(2 * np.pi * self.std ** 2)


@dataclasses.dataclass(frozen=True)
class Checkerboard:
  """Uniform on the squares of [-2, 2]^2 whose integer corner (floor x, floor y) has an even sum."""

  def sample(self, rng, n):
    ix_N = rng.integers(-2, 2, n)
    iy_N = 2 * rng.integers(-1, 1, n) + ix_N % 2  # the parity of ix: an even sum
    return np.stack([ix_N, iy_N], -1) + rng.random((n, 2))

  def log_density(self, x_N2):
    x_N2 = np.asarray(x_N2, np.float64)
    inside_N = np.all(np.abs(x_N2) <= 2, axis=-1)
    dark_N = np.floor(x_N2).sum(-1) % 2 == 0
    return np.where(inside_N & dark_N, -np.log(8.0), -np.inf)


@dataclasses.dataclass(frozen=True)
class Ring:
  """(1/k) sum_j N(x; r (cos 2 pi j / k, sin 2 pi j / k), std^2 I)."""
  k: int = 8
  radius: float = 2.0
  std: float = 0.1

  @property
  def means_K2(self):
    angle_K = 2 * np.pi * np.arange(self.k) / self.k
    return self.radius * np.stack([np.cos(angle_K), np.sin(angle_K)], -1)

  def sample(self, rng, n):
    return self.means_K2[rng.integers(0, self.k, n)] + self.std * rng.standard_normal((n, 2))

  def log_density(self, x_N2):
    d2_NK = ((np.asarray(x_N2, np.float64)[:, None] - self.means_K2[None]) ** 2).sum(-1)
    return (logsumexp(-0.5 * d2_NK / self.std ** 2, axis=1) - np.log(self.k)
            - np.log(2 * np.pi * self.std ** 2))


@dataclasses.dataclass(frozen=True)
class Gaussian:
  """N(mean, cov); the default has std 1 and 0.5 along axes rotated by 30 degrees."""
  mean: tuple[float, float] = (0.5, -0.5)
  cov: tuple[tuple[float, float], ...] = ((0.8125, 0.3248), (0.3248, 0.4375))

  def sample(self, rng, n):
    return rng.multivariate_normal(self.mean, self.cov, n)

  def log_density(self, x_N2):
    return _gaussian_log_pdf(x_N2, np.array(self.mean), np.array(self.cov))


DISTRIBUTIONS = {'moons': Moons(), 'checkerboard': Checkerboard(), 'gmm': Ring(),
                 'gaussian': Gaussian()}


def get(name: str):
  if name not in DISTRIBUTIONS:
    raise ValueError(f'distribution {name!r} is unknown; expected one of {sorted(DISTRIBUTIONS)}')
  return DISTRIBUTIONS[name]


def sample(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
  """float32[n, 2] samples of the named distribution."""
  return get(name).sample(rng, n).astype(np.float32)


def log_density(name: str, x_N2) -> np.ndarray:
  """float64[N] log-density of the named distribution at x_N2 (-inf off its support)."""
  return get(name).log_density(x_N2)


def train_batches(name: str, batch_size: int, seed: int):
  """A grain iterator of {'x': float32[batch_size // process_count, 2]}, fresh every step."""
  get(name)
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % n_proc:
    raise ConfigError(f'train.batch_size={batch_size} is not divisible by {n_proc} processes')
  ds = grain.MapDataset.range(sys.maxsize)[proc::n_proc]
  ds = ds.map(lambda i: {'x': sample(name, np.random.default_rng((seed, 0, i)),
                                     batch_size // n_proc)})
  return iter(ds.to_iter_dataset())


def build(config) -> Dataset:
  """config_updates fill model.channels (= 2) where the model has it."""
  cfg = config.data
  if cfg.distribution not in DISTRIBUTIONS:
    raise ConfigError(f'data.distribution={cfg.distribution!r}; expected one of '
                      f'{sorted(DISTRIBUTIONS)}')
  if cfg.eval_batches < 1:
    raise ConfigError(f'data.eval_batches={cfg.eval_batches}; expected at least 1')
  batch = config.train.batch_size
  return Dataset(
      make_train_iter=lambda: train_batches(cfg.distribution, batch, config.seed),
      eval_batches=[{'x': sample(cfg.distribution, np.random.default_rng((config.seed, 1, b)),
                                 batch)} for b in range(cfg.eval_batches)],
      config_updates={'model.channels': 2} if 'channels' in config.model else {})
