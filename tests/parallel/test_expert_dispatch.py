"""Expert-parallel MoE (shard_map + all_to_all) on meshes with expert = 2, 4, 8 of 8 simulated
devices: equal to the dense reference when nothing is dropped (values, aux and gradients), and
with a small capacity the drops equal a NumPy count over each device's tokens."""
import jax
import jax.numpy as jnp
import numpy as np
from multidevice import on_8_devices

from lab.nn import moe
from lab.nn import param_spec as ps
from lab.parallel import expert_dispatch, mesh as mesh_lib, rules as rules_lib

B, T, D, F, E, K = 8, 4, 8, 16, 8, 2
# (data, fsdp, tensor, expert): tokens split over data*fsdp*expert groups, experts over expert.
MESHES = [(4, 1, 1, 2), (1, 1, 2, 4), (1, 1, 1, 8)]


def draw(mlp, seed):
  """(specs, params, x_BTD) as NumPy float32 arrays, weights of std 0.5."""
  specs = moe.moe_specs(D, F, E, mlp=mlp, std=0.5, out_std=0.5)
  rng = np.random.default_rng(seed)
  params = {k: 0.5 * rng.standard_normal(s.shape).astype(np.float32) for k, s in specs.items()}
  return specs, params, rng.standard_normal((B, T, D)).astype(np.float32)


def on_mesh(mesh_shape, specs, params):
  """(mesh, params placed in their sharded layout by the rules table)."""
  mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.AXES, mesh_shape)))
  return mesh, jax.device_put(params, ps.shardings(specs, mesh, rules_lib.DEFAULT_RULES))


def ep(capacity_factor):
  """The EP layer; it takes the mesh and rules from rules.activate, as in the train loop."""
  return lambda params, x_BTD: expert_dispatch.moe_expert_parallel(
      params, x_BTD, top_k=K, capacity_factor=capacity_factor)


def np_dropped(experts_BTK, n_groups, capacity):
  """Over-capacity assignments counted group by group (contiguous batch rows), serving all first
  choices in token order, then all second choices, C per expert."""
  dropped = 0
  for group_bTK in np.split(np.asarray(experts_BTK), n_groups):
    served_E = np.zeros(E, int)
    for e in np.moveaxis(group_bTK, -1, 0).reshape(-1):
      dropped += served_E[e] >= capacity
      served_E[e] += 1
  return dropped


def value_and_grads(moe_fn):
  """(loss, (y_BTD, aux)), grads of loss = sum(y * r) + load_balance_loss w.r.t. params and x."""
  r_BTD = np.random.default_rng(7).standard_normal((B, T, D)).astype(np.float32)

  def loss(params, x_BTD):
    y_BTD, aux = moe_fn(params, x_BTD)
    return jnp.sum(y_BTD * r_BTD) + aux['load_balance_loss'], (y_BTD, aux)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)


@on_8_devices
def test_ep_equals_dense_when_nothing_is_dropped():
  """Outputs, aux and gradients (which flow back through both all_to_alls)."""
  for mesh_shape, mlp in zip(MESHES, ['swiglu', 'gelu', 'swiglu']):
    specs, params, x_BTD = draw(mlp, seed=0)
    (_, (y_dense_BTD, aux_dense)), dense_grads = jax.jit(value_and_grads(
        lambda p, x: moe.moe_dense(p, x, top_k=K)))(params, x_BTD)
    mesh, params = on_mesh(mesh_shape, specs, params)
    assert params['w_down' if mlp == 'swiglu' else 'w_out'].sharding.spec[0] == 'expert'
    ep_grads = value_and_grads(ep(E / K))  # C = the tokens of a group: nothing can drop
    with rules_lib.activate(mesh, rules_lib.DEFAULT_RULES):
      traced = jax.jit(ep_grads).trace(params, x_BTD)
      (_, (y_BTD, aux)), grads = traced.lower().compile()(params, x_BTD)
    assert str(traced.jaxpr).count('all_to_all') == 4
    np.testing.assert_allclose(y_BTD, y_dense_BTD, rtol=1e-5, atol=1e-6, err_msg=str(mesh_shape))
    assert int(aux['dropped']) == 0
    np.testing.assert_array_equal(aux['load_E'], aux_dense['load_E'])
    np.testing.assert_allclose(aux['load_balance_loss'], aux_dense['load_balance_loss'],
                               rtol=1e-6)
    for (path, g), g_dense in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(dense_grads)):
      assert np.abs(g_dense).max() > 0
      np.testing.assert_allclose(g, g_dense, rtol=1e-4, atol=1e-5,
                                 err_msg=f'{mesh_shape} {jax.tree_util.keystr(path)}')


@on_8_devices
def test_ep_counts_drops_like_numpy():
  specs, params, x_BTD = draw('gelu', seed=3)
  _, _, experts_BTK = moe.route(params['router'], x_BTD, K, True)
  for mesh_shape, capacity_factor in zip(MESHES, (0.5, 1.0, 0.75)):
    n_groups = mesh_shape[0] * mesh_shape[1] * mesh_shape[3]
    C = moe.capacity(B // n_groups * T, E, K, capacity_factor)
    expected = np_dropped(experts_BTK, n_groups, C)
    assert expected > 0
    mesh, sharded = on_mesh(mesh_shape, specs, params)
    with rules_lib.activate(mesh, rules_lib.DEFAULT_RULES):
      y_BTD, aux = jax.jit(ep(capacity_factor))(sharded, x_BTD)
    assert int(aux['dropped']) == expected, (mesh_shape, capacity_factor)
    np.testing.assert_array_equal(aux['load_E'], np.bincount(np.ravel(experts_BTK), minlength=E))
    per_group = jax.jit(jax.vmap(lambda x: moe.moe_capacity(
        params, x, top_k=K, capacity_factor=capacity_factor)[0]))
    y_groups_GbTD = per_group(x_BTD.reshape(n_groups, B // n_groups, T, D))
    np.testing.assert_allclose(y_BTD, y_groups_GbTD.reshape(B, T, D), rtol=1e-5, atol=1e-6)
