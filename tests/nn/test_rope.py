"""RoPE against the RoFormer rotation written with complex numbers in float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import rope
from oracles import assert_vjp_matches_oracle


def np_angles(positions_BT, head_dim, theta):
  """Su et al. 2021, eq. 34: pair i turns by position * theta^(-2i/H), i < H/2."""
  i = np.arange(head_dim // 2)
  return positions_BT[..., None] * theta ** (-2.0 * i / head_dim)


def np_rope(x_BTNH, positions_BT, theta):
  """Half-split layout: pair i is the complex number x_i + 1j x_{i+H/2}, times e^(1j angle)."""
  half = x_BTNH.shape[-1] // 2
  z_BTNh = x_BTNH[..., :half] + 1j * x_BTNH[..., half:]
  z_BTNh = z_BTNh * np.exp(1j * np_angles(positions_BT, x_BTNH.shape[-1], theta))[:, :, None, :]
  return np.concatenate([z_BTNh.real, z_BTNh.imag], axis=-1)


def draw(seed, shape=(2, 5, 3, 8), max_position=64):
  """x_BTNH rounded to float32 and random (unsorted) integer positions_BT below max_position."""
  rng = np.random.default_rng(seed)
  x_BTNH = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
  positions_BT = rng.integers(0, max_position, shape[:2])
  return rng, x_BTNH, positions_BT


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('head_dim,theta', [(8, 10_000.0), (16, 500_000.0), (2, 10.0)])
def test_apply_rope_matches_formula(seed, head_dim, theta):
  _, x_BTNH, positions_BT = draw(seed, shape=(2, 5, 3, head_dim))
  got_BTNH = rope.apply_rope(jnp.asarray(x_BTNH, jnp.float32), jnp.asarray(positions_BT), theta)
  assert got_BTNH.dtype == jnp.float32 and got_BTNH.shape == x_BTNH.shape
  # Angles are float32 (up to 64 rad, ulp 4e-6), hence the absolute tolerance.
  np.testing.assert_allclose(got_BTNH, np_rope(x_BTNH, positions_BT, theta), rtol=1e-5,
                             atol=2e-5)


def test_rope_angles_match_formula():
  _, _, positions_BT = draw(0, max_position=4096)
  got_BTh = rope.rope_angles(jnp.asarray(positions_BT), 16, 10_000.0)
  assert got_BTh.dtype == jnp.float32 and got_BTh.shape == (*positions_BT.shape, 8)
  np.testing.assert_allclose(got_BTh, np_angles(positions_BT, 16, 10_000.0), rtol=1e-6)


def test_scores_depend_only_on_relative_position():
  """<R(m) q, R(n) k> = <R(m + s) q, R(n + s) k>: the property RoPE is built for."""
  rng, x_BTNH, _ = draw(1, shape=(1, 2, 1, 8))
  m, n, s = rng.integers(0, 30, 3)
  def score(pm, pn):
    q_11NH = rope.apply_rope(jnp.asarray(x_BTNH[:, :1], jnp.float32), jnp.full((1, 1), pm), 100.)
    k_11NH = rope.apply_rope(jnp.asarray(x_BTNH[:, 1:], jnp.float32), jnp.full((1, 1), pn), 100.)
    return float(jnp.vdot(q_11NH, k_11NH))
  np.testing.assert_allclose(score(m, n), score(m + s, n + s), rtol=1e-5, atol=1e-5)


def test_odd_head_dim_raises():
  with pytest.raises(ValueError, match='head_dim=7'):
    rope.apply_rope(jnp.ones((1, 2, 1, 7)), jnp.zeros((1, 2), jnp.int32), 10_000.0)


def test_bfloat16_keeps_dtype():
  _, x_BTNH, positions_BT = draw(2)
  x_BTNH = jnp.asarray(x_BTNH, jnp.bfloat16)
  got_BTNH = rope.apply_rope(x_BTNH, jnp.asarray(positions_BT), 10_000.0)
  assert got_BTNH.dtype == jnp.bfloat16
  want_BTNH = np_rope(np.asarray(x_BTNH, np.float64), positions_BT, 10_000.0)
  np.testing.assert_allclose(np.asarray(got_BTNH, np.float64), want_BTNH, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('seed', range(2))
def test_gradients_match_oracle(seed):
  rng, x_BTNH, positions_BT = draw(seed, shape=(1, 3, 2, 6))
  assert_vjp_matches_oracle(lambda x: rope.apply_rope(x, jnp.asarray(positions_BT), 10_000.0),
                            lambda x: np_rope(x, positions_BT, 10_000.0), (x_BTNH,), rng)


def test_float64_check_grads(x64):
  _, x_BTNH, positions_BT = draw(3, shape=(1, 3, 2, 6))
  check_grads(jax.jit(lambda x: rope.apply_rope(x, jnp.asarray(positions_BT), 10_000.0)),
              (x_BTNH,), order=2, modes=['rev'])
