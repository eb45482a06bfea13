"""LayerNorm and RMSNorm against float64 NumPy formulas, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import norms
from oracles import assert_vjp_matches_oracle


def np_layer_norm(x_BTD, scale_D, bias_D, eps):
  """Ba et al. 2016: (x - mu) / sqrt(sigma^2 + eps) * g + b, biased variance over the last axis."""
  mu = x_BTD.mean(-1, keepdims=True)
  var = ((x_BTD - mu) ** 2).mean(-1, keepdims=True)
  y_BTD = (x_BTD - mu) / np.sqrt(var + eps) * scale_D
  return y_BTD if bias_D is None else y_BTD + bias_D


def np_rms_norm(x_BTD, scale_D, eps):
  """Zhang & Sennrich 2019, eq. 4: x / sqrt(mean(x^2) + eps) * g."""
  return x_BTD / np.sqrt((x_BTD ** 2).mean(-1, keepdims=True) + eps) * scale_D


def draw(seed, shape=(2, 3, 8), x_scale=1.0):
  """x_BTD (with a non-zero mean), scale_D, bias_D, rounded to float32 so the oracle sees exactly
  what jax sees."""
  rng = np.random.default_rng(seed)
  round32 = lambda a: a.astype(np.float32).astype(np.float64)
  x_BTD = round32(x_scale * (rng.standard_normal(shape) + rng.standard_normal()))
  scale_D = round32(1.0 + 0.5 * rng.standard_normal(shape[-1]))
  bias_D = round32(rng.standard_normal(shape[-1]))
  return rng, x_BTD, scale_D, bias_D


def f32(*arrays):
  return [None if a is None else jnp.asarray(a, jnp.float32) for a in arrays]


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('x_scale', [1e-3, 1.0, 100.0])  # 1e-3: variance below eps
@pytest.mark.parametrize('use_bias', [True, False])
def test_layer_norm_matches_formula(seed, x_scale, use_bias):
  _, x_BTD, scale_D, bias_D = draw(seed, x_scale=x_scale)
  bias_D = bias_D if use_bias else None
  got_BTD = norms.layer_norm(*f32(x_BTD, scale_D, bias_D), eps=1e-5)
  assert got_BTD.dtype == jnp.float32 and got_BTD.shape == x_BTD.shape
  np.testing.assert_allclose(got_BTD, np_layer_norm(x_BTD, scale_D, bias_D, 1e-5), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('x_scale', [1e-3, 1.0, 100.0])
def test_rms_norm_matches_formula(seed, x_scale):
  _, x_BTD, scale_D, _ = draw(seed, x_scale=x_scale)
  got_BTD = norms.rms_norm(*f32(x_BTD, scale_D), eps=1e-6)
  assert got_BTD.dtype == jnp.float32 and got_BTD.shape == x_BTD.shape
  np.testing.assert_allclose(got_BTD, np_rms_norm(x_BTD, scale_D, 1e-6), rtol=1e-5, atol=1e-6)


def test_default_eps():
  _, x_BTD, scale_D, bias_D = draw(1, x_scale=1e-3)
  np.testing.assert_allclose(norms.layer_norm(*f32(x_BTD, scale_D, bias_D)),
                             np_layer_norm(x_BTD, scale_D, bias_D, 1e-5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norms.rms_norm(*f32(x_BTD, scale_D)),
                             np_rms_norm(x_BTD, scale_D, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_input_keeps_dtype_and_matches(dtype):
  _, x_BTD, scale_D, bias_D = draw(2)
  x_BTD, scale_D, bias_D = (jnp.asarray(a, dtype) for a in (x_BTD, scale_D, bias_D))
  ln_BTD = norms.layer_norm(x_BTD, scale_D, bias_D)
  rms_BTD = norms.rms_norm(x_BTD, scale_D)
  assert ln_BTD.dtype == dtype and rms_BTD.dtype == dtype
  # Statistics are in float32, so the only error is the rounding of the output.
  x_BTD, scale_D, bias_D = (np.asarray(a, np.float64) for a in (x_BTD, scale_D, bias_D))
  tol = 3 * float(jnp.finfo(dtype).eps)
  for got, want in ((ln_BTD, np_layer_norm(x_BTD, scale_D, bias_D, 1e-5)),
                    (rms_BTD, np_rms_norm(x_BTD, scale_D, 1e-6))):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                               atol=tol * np.abs(want).max())


@pytest.mark.parametrize('seed', range(2))
def test_layer_norm_gradients_match_oracle(seed):
  rng, x_BTD, scale_D, bias_D = draw(seed, shape=(2, 2, 6))
  assert_vjp_matches_oracle(norms.layer_norm, lambda *a: np_layer_norm(*a, 1e-5),
                            (x_BTD, scale_D, bias_D), rng)


@pytest.mark.parametrize('seed', range(2))
def test_rms_norm_gradients_match_oracle(seed):
  rng, x_BTD, scale_D, _ = draw(seed, shape=(2, 2, 6))
  assert_vjp_matches_oracle(norms.rms_norm, lambda *a: np_rms_norm(*a, 1e-6), (x_BTD, scale_D),
                            rng)


@pytest.mark.parametrize('norm', ['layer_norm', 'rms_norm'])
def test_float64_check_grads(x64, norm):
  _, x_BTD, scale_D, bias_D = draw(3, shape=(2, 3, 6))
  args = (x_BTD, scale_D, bias_D) if norm == 'layer_norm' else (x_BTD, scale_D)
  check_grads(jax.jit(getattr(norms, norm)), args, order=2, modes=['rev'])
