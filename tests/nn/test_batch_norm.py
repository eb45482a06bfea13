"""Batch norm against a float64 NumPy re-derivation of Ioffe & Szegedy 2015 (Alg. 1, Alg. 2 step 10
for the running variance) and against torch.nn.BatchNorm2d; values, gradients, running statistics,
and the synchronised statistics of a batch sharded over 8 simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from lab.nn import batch_norm as bn
from lab.nn import param_spec as ps
from multidevice import on_8_devices
from oracles import assert_vjp_matches_oracle


def np_batch_norm_train(x, scale_C, bias_C, mean_C, var_C, momentum, eps):
  """Alg. 1 over all axes but the last, and the running update with the unbiased variance."""
  axes = tuple(range(x.ndim - 1))
  m = x.size // x.shape[-1]
  mu = x.mean(axes)
  sigma2 = ((x - mu) ** 2).mean(axes)
  y = scale_C * (x - mu) / np.sqrt(sigma2 + eps) + bias_C
  return y, momentum * mean_C + (1 - momentum) * mu, \
      momentum * var_C + (1 - momentum) * sigma2 * m / (m - 1)


def np_batch_norm_eval(x, scale_C, bias_C, mean_C, var_C, eps):
  """Alg. 2 step 11: the running statistics replace the batch ones."""
  return scale_C * (x - mean_C) / np.sqrt(var_C + eps) + bias_C


def draw(seed, shape=(4, 3, 5, 6), x_scale=1.0):
  """x (non-zero channel means), scale, bias, running mean and var, rounded to float32."""
  rng = np.random.default_rng(seed)
  r32 = lambda a: a.astype(np.float32).astype(np.float64)
  C = shape[-1]
  x = r32(x_scale * (rng.standard_normal(shape) + rng.standard_normal(C)))
  return (rng, x, r32(1 + 0.5 * rng.standard_normal(C)), r32(rng.standard_normal(C)),
          r32(rng.standard_normal(C)), r32(rng.uniform(0.5, 2.0, C)))


def _p(scale, bias):
  return {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}


def _s(mean, var):
  return {'mean': jnp.asarray(mean, jnp.float32), 'var': jnp.asarray(var, jnp.float32)}


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('shape', [(4, 3, 5, 6), (7, 3), (2, 5, 4)])
@pytest.mark.parametrize('x_scale', [1e-3, 1.0, 50.0])  # 1e-3: variance below eps
def test_train_mode_matches_algorithm_1(seed, shape, x_scale):
  _, x, scale, bias, mean, var = draw(seed, shape, x_scale)
  y, new = bn.batch_norm(_p(scale, bias), _s(mean, var), jnp.asarray(x, jnp.float32), train=True,
                         momentum=0.9, eps=1e-5)
  want_y, want_mean, want_var = np_batch_norm_train(x, scale, bias, mean, var, 0.9, 1e-5)
  assert y.dtype == jnp.float32 and y.shape == x.shape
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(new['mean'], want_mean, rtol=1e-5, atol=1e-6 * x_scale)
  np.testing.assert_allclose(new['var'], want_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seed', range(2))
def test_eval_mode_uses_running_stats_and_keeps_them(seed):
  _, x, scale, bias, mean, var = draw(seed)
  state = _s(mean, var)
  y, new = bn.batch_norm(_p(scale, bias), state, jnp.asarray(x, jnp.float32), train=False,
                         momentum=0.9, eps=1e-3)
  np.testing.assert_allclose(y, np_batch_norm_eval(x, scale, bias, mean, var, 1e-3), rtol=1e-5,
                             atol=1e-5)
  assert new is state
  y_train, _ = bn.batch_norm(_p(scale, bias), state, jnp.asarray(x, jnp.float32), train=True,
                             momentum=0.9, eps=1e-3)
  assert np.abs(np.asarray(y_train) - np.asarray(y)).max() > 0.1


def test_momentum_zero_stores_batch_mean_and_unbiased_variance():
  _, x, scale, bias, mean, var = draw(3, (5, 2, 2, 3))
  _, new = bn.batch_norm(_p(scale, bias), _s(mean, var), jnp.asarray(x, jnp.float32), train=True,
                         momentum=0.0, eps=1e-5)
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(new['mean'], flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], flat.var(0, ddof=1), rtol=1e-5)


def test_matches_torch_batchnorm2d_over_two_steps_and_eval():
  """torch momentum is the weight of the new batch: torch 0.1 == ours 0.9."""
  rng, _, scale, bias, mean, var = draw(4, (1, 1, 1, 5))
  torch_bn = torch.nn.BatchNorm2d(5, eps=1e-4, momentum=0.1).double()
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias))
    torch_bn.running_mean.copy_(torch.from_numpy(mean))
    torch_bn.running_var.copy_(torch.from_numpy(var))
  p, state = _p(scale, bias), _s(mean, var)
  for step in range(2):
    x_BXYC = rng.standard_normal((3, 4, 4, 5)) * 2 + step
    torch_bn.train()
    want = torch_bn(torch.from_numpy(x_BXYC.transpose(0, 3, 1, 2))).detach().numpy()
    y, state = bn.batch_norm(p, state, jnp.asarray(x_BXYC, jnp.float32), train=True,
                             momentum=0.9, eps=1e-4)
    np.testing.assert_allclose(y, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state['mean'], torch_bn.running_mean.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(state['var'], torch_bn.running_var.numpy(), rtol=1e-5)
  torch_bn.eval()
  want = torch_bn(torch.from_numpy(x_BXYC.transpose(0, 3, 1, 2))).detach().numpy()
  y, _ = bn.batch_norm(p, state, jnp.asarray(x_BXYC, jnp.float32), train=False, momentum=0.9,
                       eps=1e-4)
  np.testing.assert_allclose(y, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('seed', range(2))
def test_train_gradients_match_oracle(seed):
  """Backprop through the batch statistics (sec. 3 of the paper) vs finite differences."""
  rng, x, scale, bias, mean, var = draw(seed, (3, 2, 2, 3))
  f = lambda x, s, b: bn.batch_norm(_p(s, b), _s(mean, var), x, train=True, momentum=0.9,
                                    eps=1e-3)[0]
  oracle = lambda x, s, b: np_batch_norm_train(x, s, b, mean, var, 0.9, 1e-3)[0]
  assert_vjp_matches_oracle(f, oracle, (x, scale, bias), rng)


@pytest.mark.parametrize('train', [True, False])
def test_float64_check_grads(x64, train):
  _, x, scale, bias, mean, var = draw(5, (3, 2, 2, 4))
  state = {'mean': mean, 'var': var}
  f = lambda x, s, b: bn.batch_norm({'scale': s, 'bias': b}, state, x, train=train, momentum=0.9,
                                    eps=1e-3)[0]
  check_grads(jax.jit(f), (x, scale, bias), order=2, modes=['rev'])


def test_running_stats_carry_no_gradient():
  _, x, scale, bias, mean, var = draw(6, (4, 2, 2, 3))
  g = jax.grad(lambda x: bn.batch_norm(_p(scale, bias), _s(mean, var), x, train=True,
                                       momentum=0.5, eps=1e-5)[1]['mean'].sum())(
      jnp.asarray(x, jnp.float32))
  assert not np.any(np.asarray(g))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_input_uses_float32_statistics(dtype):
  _, x, scale, bias, mean, var = draw(7, x_scale=30.0)
  x_lo = jnp.asarray(x, dtype)
  y, new = bn.batch_norm(_p(scale, bias), _s(mean, var), x_lo, train=True, momentum=0.9,
                         eps=1e-5)
  assert y.dtype == dtype and new['mean'].dtype == jnp.float32
  want_y, want_mean, _ = np_batch_norm_train(np.asarray(x_lo, np.float64), scale, bias, mean,
                                             var, 0.9, 1e-5)
  tol = 4 * float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=tol,
                             atol=tol * np.abs(want_y).max())
  np.testing.assert_allclose(new['mean'], want_mean, rtol=1e-5)


def test_bad_inputs_raise():
  _, x, scale, bias, mean, var = draw(8, (1, 1, 1, 6))
  p, s, x = _p(scale, bias), _s(mean, var), jnp.asarray(x, jnp.float32)
  with pytest.raises(ValueError, match='m=1'):
    bn.batch_norm(p, s, x, train=True, momentum=0.9, eps=1e-5)
  with pytest.raises(ValueError, match='4 channels'):
    bn.batch_norm(p, s, x[..., :4], train=False, momentum=0.9, eps=1e-5)
  with pytest.raises(ValueError, match='momentum=1.5'):
    bn.batch_norm(p, s, x, train=False, momentum=1.5, eps=1e-5)


def test_init_state_tree_mirrors_bn_paths():
  conv = {'w': ps.ParamSpec((3, 3, 2, 4), ps.zeros, (None, None, 'conv_in', 'conv_out'))}
  specs = {'stem': {'conv': conv, 'bn': bn.batch_norm_specs(4)},
           'blocks': [{'a': {'conv': conv, 'bn': bn.batch_norm_specs(4, zero_scale=True)},
                       'se': conv}, {'se': conv}],
           'head': {'w': conv['w']}}
  state = bn.init_state_tree(specs)
  assert jax.tree.structure(state) == jax.tree.structure(
      {'stem': {'bn': {'mean': 0, 'var': 0}}, 'blocks': [{'a': {'bn': {'mean': 0, 'var': 0}}},
                                                          {}]})
  np.testing.assert_array_equal(state['stem']['bn']['mean'], np.zeros(4))
  np.testing.assert_array_equal(state['stem']['bn']['var'], np.ones(4))
  params = ps.init(specs, jax.random.key(0))
  np.testing.assert_array_equal(params['blocks'][0]['a']['bn']['scale'], np.zeros(4))
  np.testing.assert_array_equal(params['stem']['bn']['scale'], np.ones(4))


@on_8_devices
def test_batch_sharded_over_data_gives_global_statistics():
  """With the batch split over 8 devices on 'data', jit computes the global batch statistics:
  output, new running stats and gradients equal the one-device numbers, and differ from what
  per-device statistics would give."""
  from jax.sharding import NamedSharding, PartitionSpec as P

  from lab.parallel import mesh as mesh_lib
  _, x, scale, bias, mean, var = draw(9, (16, 3, 3, 4))
  p, s, x = _p(scale, bias), _s(mean, var), jnp.asarray(x, jnp.float32)
  mesh = mesh_lib.make_mesh({'data': 8})
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  assert len(x_sharded.sharding.device_set) == 8

  def loss(p, x):
    y, new = bn.batch_norm(p, s, x, train=True, momentum=0.8, eps=1e-5)
    return (y * jnp.arange(y.size).reshape(y.shape) / y.size).sum(), (y, new)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, (y1, new1)), grads1 = step(p, x)
  (_, (y8, new8)), grads8 = step(p, x_sharded)
  assert y8.sharding.spec[0] == 'data'
  np.testing.assert_allclose(y8, y1, rtol=1e-6, atol=1e-6)
  for k in ('mean', 'var'):
    np.testing.assert_allclose(new8[k], new1[k], rtol=1e-6, atol=1e-7)
  for g8, g1 in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5 * np.abs(g1).max())
  y_local, _ = bn.batch_norm(p, s, x[:2], train=True, momentum=0.8, eps=1e-5)
  assert np.abs(np.asarray(y_local) - np.asarray(y1[:2])).max() > 0.05
