"""Collapse monitors against float64 NumPy formulas and their known limits."""
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.eval import collapse


def np_normalized_std(z_BD):
  """SimSiam sec. 4.1: std over the batch of each dim of z / ||z||, averaged over dims."""
  return (z_BD / np.linalg.norm(z_BD, axis=1, keepdims=True)).std(0).mean()


def np_effective_rank(z_BD):
  """Roy & Vetterli 2007: exp(H(p)), p = singular values / their sum."""
  s = np.linalg.svd(z_BD, compute_uv=False)
  p = s[s > 0] / s.sum()
  return np.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize('d', [4, 32, 128])
def test_normalized_std_of_isotropic_gaussian_is_one_over_sqrt_d(d):
  # E[(z_d / ||z||)^2] = 1 / D for z ~ N(0, I) and the mean is 0, so the std is 1 / sqrt(D).
  z_BD = np.random.default_rng(d).standard_normal((4000, d)) * 3.0
  got = collapse.normalized_std(jnp.asarray(z_BD, jnp.float32))
  np.testing.assert_allclose(got, np_normalized_std(z_BD), rtol=1e-5)
  np.testing.assert_allclose(got, 1 / np.sqrt(d), rtol=0.02)


def test_collapsed_embeddings_give_zero():
  rng = np.random.default_rng(0)
  c_D = rng.standard_normal(16)
  # Every example maps to a positive multiple of one vector: the normalised outputs coincide.
  z_BD = rng.uniform(0.5, 4, (256, 1)) * c_D
  assert float(collapse.normalized_std(jnp.asarray(z_BD, jnp.float32))) < 1e-6
  np.testing.assert_allclose(collapse.effective_rank(jnp.asarray(z_BD, jnp.float32)), 1.0,
                             rtol=1e-4)
  spread = rng.standard_normal((256, 16))
  assert float(collapse.normalized_std(jnp.asarray(spread, jnp.float32))) > 0.2


def test_effective_rank_of_a_known_spectrum():
  rng = np.random.default_rng(1)
  u_BB, _ = np.linalg.qr(rng.standard_normal((20, 20)))
  v_DD, _ = np.linalg.qr(rng.standard_normal((8, 8)))
  sigma = np.array([3.0, 1.0, 1.0, 0, 0, 0, 0, 0])
  z_BD = (u_BB[:, :8] * sigma) @ v_DD.T
  p = np.array([0.6, 0.2, 0.2])
  np.testing.assert_allclose(collapse.effective_rank(jnp.asarray(z_BD, jnp.float32)),
                             np.exp(-np.sum(p * np.log(p))), rtol=1e-4)
  iso_BD = rng.standard_normal((3000, 16))
  got = collapse.effective_rank(jnp.asarray(iso_BD, jnp.float32))
  np.testing.assert_allclose(got, np_effective_rank(iso_BD), rtol=1e-5)
  assert 15.5 < float(got) <= 16
  # Equal singular values: the rank itself.
  np.testing.assert_allclose(collapse.effective_rank(jnp.asarray(u_BB[:, :5], jnp.float32)), 5,
                             rtol=1e-5)


def test_gradients(x64):
  z_BD = np.random.default_rng(2).standard_normal((7, 4))
  check_grads(collapse.normalized_std, (z_BD,), order=1, modes=['rev'])
  check_grads(collapse.effective_rank, (z_BD,), order=1, modes=['rev'])


def test_bad_shape_is_an_error():
  with pytest.raises(ValueError, match=r'\(5,\)'):
    collapse.normalized_std(jnp.ones(5))
  with pytest.raises(ValueError, match=r'\(1, 3\)'):
    collapse.effective_rank(jnp.ones((1, 3)))
