"""Top-k MoE: router, gates, load-balance loss, dense reference and capacity dispatch against
float64 NumPy oracles (a per-token loop over experts), and gradients in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.nn import moe
from lab.nn import param_spec as ps

B, T, D, F, E = 2, 5, 4, 6, 4


def np_gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_ffn(params, e, x_D):
  """Expert e on one token: GELU_tanh(x W_in) W_out or (SiLU(x W_gate) * x W_up) W_down."""
  if 'w_gate' in params:
    g_F = x_D @ params['w_gate'][e]
    return (g_F / (1.0 + np.exp(-g_F)) * (x_D @ params['w_up'][e])) @ params['w_down'][e]
  return np_gelu_tanh(x_D @ params['w_in'][e]) @ params['w_out'][e]


def np_route(router_DE, x_BTD, top_k, renormalize):
  """Float64 softmax router; top-k by a stable descending sort (ties to the lower index)."""
  logits_BTE = x_BTD @ router_DE
  p_BTE = np.exp(logits_BTE - logits_BTE.max(-1, keepdims=True))
  p_BTE /= p_BTE.sum(-1, keepdims=True)
  experts_BTK = np.argsort(-p_BTE, axis=-1, kind='stable')[..., :top_k]
  gates_BTK = np.take_along_axis(p_BTE, experts_BTK, -1)
  if renormalize:
    gates_BTK /= gates_BTK.sum(-1, keepdims=True)
  return p_BTE, gates_BTK, experts_BTK


def np_moe(params, x_BTD, top_k, renormalize, capacity=None):
  """Per-token loop: y = sum of gate * expert output over the kept assignments; assignments are
  served all first choices in token order, then second choices, ..., C per expert."""
  _, gates_BTK, experts_BTK = np_route(params['router'], x_BTD, top_k, renormalize)
  y_BTD = np.zeros_like(x_BTD)
  served_E = np.zeros(E, int)
  dropped = 0
  for k in range(top_k):
    for b in range(x_BTD.shape[0]):
      for t in range(x_BTD.shape[1]):
        e = experts_BTK[b, t, k]
        if capacity is not None and served_E[e] >= capacity:
          dropped += 1
          continue
        served_E[e] += 1
        y_BTD[b, t] += gates_BTK[b, t, k] * np_ffn(params, e, x_BTD[b, t])
  return y_BTD, dropped


def np_load_balance_loss(p_BTE, experts_BTK):
  """Switch (Fedus et al. 2021, eq. 4-6) with f_e over the N*K assignments: E sum_e f_e P_e."""
  f_E = np.bincount(experts_BTK.reshape(-1), minlength=E) / experts_BTK.size
  return E * np.sum(f_E * p_BTE.reshape(-1, E).mean(0))


def draw(seed, mlp):
  """x_BTD and params rounded to float32 (values float64), scaled so that GELU curves."""
  rng = np.random.default_rng(seed)
  shapes = {'router': (D, E)} | ({'w_gate': (E, D, F), 'w_up': (E, D, F), 'w_down': (E, F, D)}
                                 if mlp == 'swiglu' else {'w_in': (E, D, F), 'w_out': (E, F, D)})
  params = {k: rng.standard_normal(s).astype(np.float32).astype(np.float64) * 0.8
            for k, s in shapes.items()}
  x_BTD = rng.standard_normal((B, T, D)).astype(np.float32).astype(np.float64) * 1.5
  return params, x_BTD


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_specs_shapes_and_logical_axes():
  specs = moe.moe_specs(D, F, E, mlp='swiglu', std=0.02, out_std=0.01)
  assert {k: (s.shape, s.axes) for k, s in specs.items()} == {
      'router': ((D, E), ('embed', None)),
      'w_gate': ((E, D, F), ('experts', 'embed', 'mlp')),
      'w_up': ((E, D, F), ('experts', 'embed', 'mlp')),
      'w_down': ((E, F, D), ('experts', 'mlp', 'embed'))}
  assert set(moe.moe_specs(D, F, E, mlp='gelu', std=0.02, out_std=0.01)) == {
      'router', 'w_in', 'w_out'}
  params = ps.init(specs, jax.random.key(0))
  assert not np.allclose(params['w_gate'], params['w_up'])
  with pytest.raises(ValueError, match="mlp='relu'"):
    moe.moe_specs(D, F, E, mlp='relu', std=0.02, out_std=0.01)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('top_k', [1, 2, 3])
@pytest.mark.parametrize('renormalize', [True, False])
def test_route_matches_numpy(seed, top_k, renormalize):
  params, x_BTD = draw(seed, 'gelu')
  probs_BTE, gates_BTK, experts_BTK = moe.route(*f32((params['router'], x_BTD)), top_k,
                                                renormalize)
  np_probs_BTE, np_gates_BTK, np_experts_BTK = np_route(params['router'], x_BTD, top_k,
                                                        renormalize)
  np.testing.assert_array_equal(experts_BTK, np_experts_BTK)
  np.testing.assert_allclose(probs_BTE, np_probs_BTE, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gates_BTK, np_gates_BTK, rtol=1e-5, atol=1e-6)
  if renormalize:
    np.testing.assert_allclose(gates_BTK.sum(-1), 1.0, rtol=1e-6)
  else:
    assert np.all(gates_BTK.sum(-1) < 1.0)


def test_route_rejects_bad_top_k():
  with pytest.raises(ValueError, match='top_k=5'):
    moe.route(jnp.zeros((D, E)), jnp.zeros((B, T, D)), 5, True)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('top_k', [1, 2])
def test_load_and_load_balance_loss_match_numpy(seed, top_k):
  params, x_BTD = draw(seed, 'gelu')
  _, aux = moe.moe_dense(f32(params), f32(x_BTD), top_k=top_k)
  p_BTE, _, experts_BTK = np_route(params['router'], x_BTD, top_k, True)
  np.testing.assert_array_equal(aux['load_E'], np.bincount(experts_BTK.reshape(-1), minlength=E))
  np.testing.assert_allclose(aux['load_balance_loss'], np_load_balance_loss(p_BTE, experts_BTK),
                             rtol=1e-5)
  assert aux['dropped'] == 0


def test_load_balance_loss_is_one_when_balanced():
  load_E = jnp.full((E,), 3)
  aux = moe.routing_aux(load_E, jnp.full((E,), 6 / E), 6, 2, jnp.zeros((), jnp.int32))
  np.testing.assert_allclose(aux['load_balance_loss'], 1.0, rtol=1e-6)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('top_k,renormalize', [(1, False), (2, True), (3, False)])
def test_moe_dense_matches_per_token_loop(seed, mlp, top_k, renormalize):
  params, x_BTD = draw(seed, mlp)
  y_BTD, _ = moe.moe_dense(f32(params), f32(x_BTD), top_k=top_k, renormalize=renormalize)
  assert y_BTD.shape == (B, T, D) and y_BTD.dtype == jnp.float32
  np_y_BTD, _ = np_moe(params, x_BTD, top_k, renormalize)
  np.testing.assert_allclose(y_BTD, np_y_BTD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
@pytest.mark.parametrize('capacity_factor', [0.5, 1.25])
def test_moe_capacity_drops_in_priority_order(seed, mlp, capacity_factor):
  params, x_BTD = draw(seed, mlp)
  C = moe.capacity(B * T, E, 2, capacity_factor)
  assert C == int(np.ceil(capacity_factor * B * T * 2 / E))
  y_BTD, aux = moe.moe_capacity(f32(params), f32(x_BTD), top_k=2,
                                capacity_factor=capacity_factor)
  np_y_BTD, np_dropped = np_moe(params, x_BTD, 2, True, capacity=C)
  assert int(aux['dropped']) == np_dropped
  np.testing.assert_allclose(y_BTD, np_y_BTD, rtol=1e-5, atol=1e-5)
  if capacity_factor == 0.5:
    assert np_dropped > 0


@pytest.mark.parametrize('mlp', ['gelu', 'swiglu'])
def test_moe_capacity_without_drops_equals_dense(mlp):
  params, x_BTD = draw(0, mlp)
  args = f32((params, x_BTD))
  y_BTD, aux = moe.moe_capacity(*args, top_k=2, capacity_factor=E / 2)
  y_dense_BTD, aux_dense = moe.moe_dense(*args, top_k=2)
  np.testing.assert_allclose(y_BTD, y_dense_BTD, rtol=1e-6, atol=1e-6)
  assert int(aux['dropped']) == 0
  jax.tree.map(np.testing.assert_array_equal, aux, aux_dense)


def test_capacity_rejects_non_positive_factor():
  with pytest.raises(ValueError, match='capacity_factor=0'):
    moe.capacity(10, E, 2, 0)


@pytest.mark.parametrize('mlp,capacity_factor', [('gelu', None), ('swiglu', 0.75)])
def test_check_grads_float64(x64, mlp, capacity_factor):
  """Through the router, gates, experts and the load-balance loss; dense, or capacity with drops."""
  params, x_BTD = jax.tree.map(jnp.asarray, draw(1, mlp))

  def loss(p, x):
    if capacity_factor is None:
      y_BTD, aux = moe.moe_dense(p, x, top_k=2)
    else:
      y_BTD, aux = moe.moe_capacity(p, x, top_k=2, capacity_factor=capacity_factor)
    return jnp.sum(y_BTD ** 2) + aux['load_balance_loss']

  check_grads(jax.jit(loss), (params, x_BTD), order=1, modes=['rev'])
