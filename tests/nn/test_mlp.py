"""GELU (tanh) MLP and SwiGLU against float64 NumPy formulas, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import mlp


def np_gelu_tanh(x):
  """Hendrycks & Gimpel 2016: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_gelu_mlp(x_BTD, w_in_DF, b_in_F, w_out_FD, b_out_D):
  h_BTF = x_BTD @ w_in_DF + (0.0 if b_in_F is None else b_in_F)
  return np_gelu_tanh(h_BTF) @ w_out_FD + (0.0 if b_out_D is None else b_out_D)


def np_swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
  """Shazeer 2020, eq. 6 with Swish_1(z) = z sigmoid(z): (Swish(x W) * x V) W2."""
  gate_BTF = x_BTD @ w_gate_DF
  return (gate_BTF / (1.0 + np.exp(-gate_BTF)) * (x_BTD @ w_up_DF)) @ w_down_FD


def draw(seed, *shapes):
  """x_BTD and weights rounded to float32; scaled so pre-activations cover GELU's curved part."""
  rng = np.random.default_rng(seed)
  return [((0.7 if i else 1.5) * rng.standard_normal(s)).astype(np.float32).astype(np.float64)
          for i, s in enumerate(shapes)]


def f32(*arrays):
  return [None if a is None else jnp.asarray(a, jnp.float32) for a in arrays]


B, T, D, F = 2, 3, 4, 6


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('bias_in,bias_out', [(True, True), (False, False), (True, False)])
def test_gelu_mlp_matches_formula(seed, bias_in, bias_out):
  x_BTD, w_in_DF, b_in_F, w_out_FD, b_out_D = draw(seed, (B, T, D), (D, F), (F,), (F, D), (D,))
  b_in_F, b_out_D = (b_in_F if bias_in else None), (b_out_D if bias_out else None)
  args = (x_BTD, w_in_DF, b_in_F, w_out_FD, b_out_D)
  got_BTD = mlp.gelu_mlp(*f32(*args))
  assert got_BTD.dtype == jnp.float32 and got_BTD.shape == (B, T, D)
  np.testing.assert_allclose(got_BTD, np_gelu_mlp(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('seed', range(3))
def test_swiglu_matches_formula(seed):
  args = draw(seed, (B, T, D), (D, F), (D, F), (F, D))  # x_BTD, w_gate_DF, w_up_DF, w_down_FD
  got_BTD = mlp.swiglu_mlp(*f32(*args))
  assert got_BTD.dtype == jnp.float32 and got_BTD.shape == (B, T, D)
  np.testing.assert_allclose(got_BTD, np_swiglu(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('seed', range(2))
def test_gelu_mlp_check_grads_float64(x64, seed):
  args = [jnp.asarray(a) for a in draw(seed, (1, 2, 3), (3, 4), (4,), (4, 3), (3,))]
  check_grads(jax.jit(mlp.gelu_mlp), args, order=2, modes=['rev'])


@pytest.mark.parametrize('seed', range(2))
def test_swiglu_check_grads_float64(x64, seed):
  args = [jnp.asarray(a) for a in draw(seed, (1, 2, 3), (3, 4), (3, 4), (4, 3))]
  check_grads(jax.jit(mlp.swiglu_mlp), args, order=2, modes=['rev'])
