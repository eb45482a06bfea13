"""Momentum targets: the EMA update and BYOL/DINO's cosine schedule against their formulas."""
import jax.numpy as jnp
import numpy as np
import pytest

from lab.objectives import momentum


def test_ema_is_the_convex_combination_leaf_by_leaf():
  rng = np.random.default_rng(0)
  target = {'a': rng.standard_normal(3), 'b': [rng.standard_normal((2, 2))]}
  online = {'a': rng.standard_normal(3), 'b': [rng.standard_normal((2, 2))]}
  got = momentum.ema(target, online, 0.99)
  np.testing.assert_allclose(got['a'], 0.99 * target['a'] + 0.01 * online['a'])
  np.testing.assert_allclose(got['b'][0], 0.99 * target['b'][0] + 0.01 * online['b'][0])


def test_cosine_schedule_formula_and_ends():
  K, base = 100, 0.996
  ks = np.arange(0, K + 20, 7)
  want = 1 - (1 - base) * (np.cos(np.pi * np.minimum(ks, K) / K) + 1) / 2
  np.testing.assert_allclose([float(momentum.cosine_momentum(base, k, K)) for k in ks], want,
                             rtol=1e-6)
  assert float(momentum.cosine_momentum(base, 0, K)) == pytest.approx(base)
  assert float(momentum.cosine_momentum(base, jnp.asarray(K), K)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='base=1.5'):
    momentum.cosine_momentum(1.5, 0, K)
