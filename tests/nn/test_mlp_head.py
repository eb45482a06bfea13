"""SSL heads: every layer against a float64 NumPy re-derivation (linear, bias, batch norm with or
without affine parameters and its running statistics, activation), and the layer recipes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.nn import mlp_head
from lab.nn import param_spec as ps


def np_head(params, spec, x, momentum, eps):
  """y = act(BN(x W + b)) per layer, BN over the batch (Ioffe & Szegedy Alg. 1) with running
  statistics m * old + (1 - m) * batch (unbiased variance)."""
  stats = []
  for layer, p in zip(spec, params):
    x = x @ p['w'] + (p['b'] if layer.bias else 0.0)
    if layer.bn:
      mu, var = x.mean(0), x.var(0)
      n = x.shape[0]
      stats.append((momentum * 0.0 + (1 - momentum) * mu,
                    momentum * 1.0 + (1 - momentum) * var * n / (n - 1)))
      x = (x - mu) / np.sqrt(var + eps)
      if layer.bn_affine:
        x = x * p['bn']['scale'] + p['bn']['bias']
    else:
      stats.append(None)
    if layer.act == 'relu':
      x = np.maximum(x, 0.0)
  return x, stats


@pytest.mark.parametrize('spec', [
    mlp_head.layers((16, 16, 8), bn_hidden=True, bn_last=True),                    # SimSiam projector
    mlp_head.layers((16, 8), bn_hidden=True, bn_last=True, last_affine=False),     # MoCo v3
    mlp_head.layers((16, 8), bn_hidden=False),                                     # MoCo v2
])
def test_head_matches_numpy(spec):
  rng = np.random.default_rng(0)
  specs = mlp_head.head_specs(6, spec)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), specs,
                        is_leaf=ps.is_spec)
  x = rng.standard_normal((10, 6)).astype(np.float32)
  y, state = mlp_head.head(params, mlp_head.init_head_state(spec), spec, jnp.asarray(x),
                           train=True, momentum=0.9, eps=1e-5)
  want, stats = np_head(jax.tree.map(np.float64, params), spec, x.astype(np.float64), 0.9, 1e-5)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert y.shape == (10, spec[-1].width)
  for layer, s, w in zip(spec, state, stats):
    assert ('bn' in s) == layer.bn
    if layer.bn:
      np.testing.assert_allclose(s['bn']['mean'], w[0], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(s['bn']['var'], w[1], rtol=1e-4, atol=1e-5)
  # Eval mode uses the running statistics and leaves them alone.
  y_eval, state_eval = mlp_head.head(params, state, spec, jnp.asarray(x), train=False)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), state_eval, state))
  if any(l.bn for l in spec):
    assert not np.allclose(y_eval, y)
  else:
    np.testing.assert_allclose(y_eval, y, rtol=1e-6)


def test_layer_recipes_and_errors():
  spec = mlp_head.layers((32, 32, 4), bn_hidden=True)
  assert [l.bn for l in spec] == [True, True, False] and [l.act for l in spec] == ['relu', 'relu',
                                                                                  None]
  assert [l.bias for l in spec] == [False, False, True]      # no bias right before a BN
  specs = mlp_head.head_specs(5, spec)
  assert [s['w'].shape for s in specs] == [(5, 32), (32, 32), (32, 4)]
  assert 'bn' in specs[0] and 'b' not in specs[0] and 'b' in specs[2]
  with pytest.raises(ValueError, match='width=0'):
    mlp_head.Layer(0)
  with pytest.raises(ValueError, match="act='tanh'"):
    mlp_head.Layer(4, act='tanh')
