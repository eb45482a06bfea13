"""GroupNorm against a float64 NumPy loop over (example, group), values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import norms
from oracles import assert_vjp_matches_oracle


def np_group_norm(x_BXYC, scale_C, bias_C, groups, eps):
  """Wu & He 2018, eqs. 1-3 and 7: each example's group of C / G channels is normalised with the
  mean and biased variance over all its positions and channels, then scaled and shifted."""
  B, C = x_BXYC.shape[0], x_BXYC.shape[-1]
  y = np.empty_like(x_BXYC)
  width = C // groups
  for b in range(B):
    for g in range(groups):
      s = x_BXYC[b, ..., g * width:(g + 1) * width]
      y[b, ..., g * width:(g + 1) * width] = (s - s.mean()) / np.sqrt(s.var() + eps)
  return y * scale_C + bias_C


def draw(seed, shape, x_scale=1.0):
  """x (per-channel means, so the groups differ), scale_C, bias_C, rounded to float32."""
  rng = np.random.default_rng(seed)
  round32 = lambda a: a.astype(np.float32).astype(np.float64)
  x = x_scale * (rng.standard_normal(shape) + 3 * rng.standard_normal(shape[-1]))
  scale_C = 1.0 + 0.5 * rng.standard_normal(shape[-1])
  return rng, round32(x), round32(scale_C), round32(rng.standard_normal(shape[-1]))


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('groups', [1, 2, 8])
@pytest.mark.parametrize('x_scale', [1e-3, 1.0, 100.0])  # 1e-3: variance below eps
def test_group_norm_matches_formula(seed, groups, x_scale):
  _, x, scale_C, bias_C = draw(seed, (2, 3, 4, 8), x_scale)
  got = norms.group_norm(*(jnp.asarray(a, jnp.float32) for a in (x, scale_C, bias_C)), groups)
  assert got.dtype == jnp.float32 and got.shape == x.shape
  np.testing.assert_allclose(got, np_group_norm(x, scale_C, bias_C, groups, 1e-5), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('shape', [(3, 6), (2, 5, 6), (1, 2, 3, 2, 6)])
def test_any_number_of_spatial_axes(shape):
  _, x, scale_C, bias_C = draw(4, shape)
  got = norms.group_norm(*(jnp.asarray(a, jnp.float32) for a in (x, scale_C, bias_C)), 3,
                         eps=1e-3)
  np.testing.assert_allclose(got, np_group_norm(x, scale_C, bias_C, 3, 1e-3), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('groups', [0, 3, 16])
def test_groups_must_divide_channels(groups):
  x = jnp.zeros((1, 2, 2, 8))
  with pytest.raises(ValueError, match=f'groups={groups}'):
    norms.group_norm(x, jnp.ones(8), jnp.zeros(8), groups)


def test_bfloat16_keeps_dtype_and_matches():
  _, x, scale_C, bias_C = draw(5, (2, 3, 3, 4))
  args = [jnp.asarray(a, jnp.bfloat16) for a in (x, scale_C, bias_C)]
  got = norms.group_norm(*args, 2)
  assert got.dtype == jnp.bfloat16
  want = np_group_norm(*(np.asarray(a, np.float64) for a in args), 2, 1e-5)
  tol = 3 * float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                             atol=tol * np.abs(want).max())


@pytest.mark.parametrize('seed', range(2))
def test_gradients_match_oracle(seed):
  rng, x, scale_C, bias_C = draw(seed, (2, 2, 3, 4))
  assert_vjp_matches_oracle(lambda *a: norms.group_norm(*a, 2),
                            lambda *a: np_group_norm(*a, 2, 1e-5), (x, scale_C, bias_C), rng)


def test_float64_check_grads(x64):
  _, x, scale_C, bias_C = draw(3, (2, 2, 2, 6))
  check_grads(jax.jit(lambda *a: norms.group_norm(*a, 3)), (x, scale_C, bias_C), order=1,
              modes=['rev'])
