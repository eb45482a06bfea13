"""DeepSeekMoE with aux-loss-free balancing against float64 NumPy oracles written from DeepSeek-V3
§2.1.2 (eqs. 12-20) and Wang et al. 2024 (Alg. 1, eq. 4); gradients in float64; the dense,
capacity and expert-parallel dispatches agree; the bias update balances a skewed router; and
the layer equals transformers' DeepseekV3MoE (torch, CPU) with copied weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from multidevice import on_8_devices

from lab.nn import deepseek_moe as dsm
from lab.nn import deepseek_moe_hf
from lab.nn import param_spec as ps

B, T, D, F, E, N_SHARED = 2, 6, 8, 5, 8, 2
# (top_k, n_groups, top_k_groups, routed_scaling_factor, normalize)
ROUTINGS = [(2, 1, 1, 1.0, True), (3, 4, 2, 2.5, True), (1, 2, 1, 1.0, False),
            (4, 4, 3, 2.5, False)]


def kwargs(routing):
  top_k, n_groups, top_k_groups, scale, normalize = routing
  return dict(top_k=top_k, n_groups=n_groups, top_k_groups=top_k_groups,
              routed_scaling_factor=scale, normalize=normalize)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_swiglu(x_D, w_gate_DF, w_up_DF, w_down_FD):
  g_F = x_D @ w_gate_DF
  return (g_F * np_sigmoid(g_F) * (x_D @ w_up_DF)) @ w_down_FD


def np_route(router_DE, bias_E, x_BTD, top_k, n_groups, top_k_groups, scale, normalize):
  """Token by token: s = sigmoid(u e) (eq. 15); groups ranked by the sum of their 2 largest
  s + b, the best top_k_groups kept; top-k of s + b among their experts (eq. 16, stable sort);
  gates s / sum s (eq. 13) times the scale."""
  s_BTE = np_sigmoid(x_BTD @ router_DE)
  n_b, n_t, n_e = s_BTE.shape
  experts_BTK = np.zeros((n_b, n_t, top_k), int)
  gates_BTK = np.zeros((n_b, n_t, top_k))
  for b, t in np.ndindex(n_b, n_t):
    choice_E = s_BTE[b, t] + bias_E
    group_score = np.sort(choice_E.reshape(n_groups, -1), axis=1)[:, -2:].sum(1)
    kept = np.argsort(-group_score, kind='stable')[:top_k_groups]
    allowed_E = np.isin(np.arange(n_e) // (n_e // n_groups), kept)
    experts = np.argsort(-np.where(allowed_E, choice_E, -np.inf), kind='stable')[:top_k]
    gates = s_BTE[b, t, experts]
    experts_BTK[b, t] = experts
    gates_BTK[b, t] = scale * (gates / gates.sum() if normalize else gates)
  return s_BTE, gates_BTK, experts_BTK


def np_moe(params, bias_E, x_BTD, routing, capacity=None):
  """(y_BTD, dropped): the N_s shared experts (the fused FFN split into its N_s FFNs of width F)
  plus gate * routed expert over the kept assignments, served all first choices in token order,
  then second choices, ..., at most `capacity` per expert (eq. 12 without the residual)."""
  _, gates_BTK, experts_BTK = np_route(params['router'], bias_E, x_BTD, *routing)
  y_BTD = np.zeros_like(x_BTD)
  if 'shared' in params:
    sh = params['shared']
    for i in range(sh['w_gate'].shape[1] // F):
      cols = slice(i * F, (i + 1) * F)
      for b, t in np.ndindex(x_BTD.shape[:2]):
        y_BTD[b, t] += np_swiglu(x_BTD[b, t], sh['w_gate'][:, cols], sh['w_up'][:, cols],
                                 sh['w_down'][cols])
  served_E, dropped = np.zeros(E, int), 0
  for k in range(routing[0]):
    for b, t in np.ndindex(x_BTD.shape[:2]):
      e = experts_BTK[b, t, k]
      if capacity is not None and served_E[e] >= capacity:
        dropped += 1
        continue
      served_E[e] += 1
      y_BTD[b, t] += gates_BTK[b, t, k] * np_swiglu(
          x_BTD[b, t], params['w_gate'][e], params['w_up'][e], params['w_down'][e])
  return y_BTD, dropped


def np_balance_loss(s_BTE, experts_BTK):
  """V3 eqs. 17-20 with alpha = 1, sequence by sequence, averaged over the batch."""
  n_b, n_t, n_e = s_BTE.shape
  K = experts_BTK.shape[-1]
  loss = 0.0
  for b in range(n_b):
    f_E = np.zeros(n_e)
    for t in range(n_t):
      f_E[experts_BTK[b, t]] += n_e / (K * n_t)
    P_E = (s_BTE[b] / s_BTE[b].sum(-1, keepdims=True)).mean(0)
    loss += f_E @ P_E
  return loss / n_b


def draw(seed, n_shared=N_SHARED, d=D, n_experts=E, batch=B):
  """(params, bias_E, x_BTD): float64 values rounded to float32; router and bias scaled so that
  affinities spread over (0, 1) and the bias moves some choices."""
  rng = np.random.default_rng(seed)
  specs = dsm.deepseek_moe_specs(d, F, n_experts, n_shared, std=1.0, out_std=1.0)
  params = jax.tree.map(lambda s: 0.6 * rng.standard_normal(s.shape), specs, is_leaf=ps.is_spec)
  bias_E = 0.15 * rng.standard_normal(n_experts)
  x_BTD = rng.standard_normal((batch, T, d))
  return jax.tree.map(lambda a: a.astype(np.float32).astype(np.float64), (params, bias_E, x_BTD))


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_specs_shapes_and_logical_axes():
  specs = dsm.deepseek_moe_specs(D, F, E, 3, std=0.02, out_std=0.01)
  shapes = jax.tree.map(lambda s: (s.shape, s.axes), specs, is_leaf=ps.is_spec)
  assert shapes == {
      'router': ((D, E), ('embed', None)),
      'w_gate': ((E, D, F), ('experts', 'embed', 'mlp')),
      'w_up': ((E, D, F), ('experts', 'embed', 'mlp')),
      'w_down': ((E, F, D), ('experts', 'mlp', 'embed')),
      'shared': {'w_gate': ((D, 3 * F), ('embed', 'mlp')), 'w_up': ((D, 3 * F), ('embed', 'mlp')),
                 'w_down': ((3 * F, D), ('mlp', 'embed'))}}
  assert 'shared' not in dsm.deepseek_moe_specs(D, F, E, 0, std=0.02, out_std=0.01)
  with pytest.raises(ValueError, match='n_shared=-1'):
    dsm.deepseek_moe_specs(D, F, E, -1, std=0.02, out_std=0.01)


@pytest.mark.parametrize('routing', ROUTINGS)
def test_route_matches_numpy(routing):
  params, bias_E, x_BTD = draw(0)
  scores_BTE, gates_BTK, experts_BTK = dsm.route(*f32((params['router'], bias_E, x_BTD)),
                                                 **kwargs(routing))
  np_s_BTE, np_gates_BTK, np_experts_BTK = np_route(params['router'], bias_E, x_BTD, *routing)
  np.testing.assert_array_equal(experts_BTK, np_experts_BTK)
  np.testing.assert_allclose(scores_BTE, np_s_BTE, rtol=1e-6)
  np.testing.assert_allclose(gates_BTK, np_gates_BTK, rtol=1e-5)
  if routing[4]:
    np.testing.assert_allclose(gates_BTK.sum(-1), routing[3], rtol=1e-6)


def test_bias_moves_the_choice_but_not_the_gates():
  """With b != 0 some tokens choose other experts than with b = 0; gates stay s / sum s."""
  params, bias_E, x_BTD = draw(1)
  args = f32((params['router'], bias_E, x_BTD))
  s_BTE, gates_BTK, experts_BTK = dsm.route(*args, top_k=2)
  _, _, unbiased_BTK = dsm.route(args[0], jnp.zeros(E), args[2], top_k=2)
  assert np.any(np.asarray(experts_BTK) != np.asarray(unbiased_BTK))
  chosen_s_BTK = np.take_along_axis(np.asarray(s_BTE), np.asarray(experts_BTK), -1)
  np.testing.assert_allclose(gates_BTK, chosen_s_BTK / chosen_s_BTK.sum(-1, keepdims=True),
                             rtol=1e-6)


def test_group_limit_changes_the_choice():
  """Affinities (0.9, 0.1 | 0.8, 0.7 | 0.2, 0.3 | 0.4, 0.1), K = 2: ungrouped top-2 is {0, 2};
  one kept group of 2 keeps group 1 (0.8 + 0.7 > 0.9 + 0.1), so {2, 3}."""
  s_E = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.4, 0.1])
  x_BTD = f32(np.log(s_E / (1 - s_E))[None, None])  # router = identity: sigmoid(x) = s
  router_DE, bias_E = jnp.eye(E), jnp.zeros(E)
  _, _, experts_BTK = dsm.route(router_DE, bias_E, x_BTD, top_k=2)
  assert experts_BTK.tolist() == [[[0, 2]]]
  _, gates_BTK, experts_BTK = dsm.route(router_DE, bias_E, x_BTD, top_k=2, n_groups=4,
                                        top_k_groups=1)
  assert experts_BTK.tolist() == [[[2, 3]]]
  np.testing.assert_allclose(gates_BTK, [[[0.8 / 1.5, 0.7 / 1.5]]], rtol=1e-6)
  assert np_route(np.eye(E), np.zeros(E), np.asarray(x_BTD, np.float64), 2, 4, 1, 1.0,
                  True)[2].tolist() == [[[2, 3]]]


@pytest.mark.parametrize('bad,match', [
    (dict(n_groups=3), 'n_groups=3'), (dict(n_groups=8, top_k_groups=1), 'n_groups=8'),
    (dict(n_groups=4, top_k_groups=5), 'top_k_groups=5'), (dict(top_k_groups=0), 'top_k_groups=0'),
    (dict(n_groups=4, top_k_groups=1, top_k=3), 'top_k=3'), (dict(top_k=0), 'top_k=0')])
def test_route_rejects_bad_arguments(bad, match):
  with pytest.raises(ValueError, match=match):
    dsm.route(jnp.zeros((D, E)), jnp.zeros(E), jnp.zeros((B, T, D)), **({'top_k': 2} | bad))


def test_route_rejects_a_bias_of_the_wrong_shape():
  with pytest.raises(ValueError, match=r'bias shape \(7,\)'):
    dsm.route(jnp.zeros((D, E)), jnp.zeros(7), jnp.zeros((B, T, D)), top_k=2)


@pytest.mark.parametrize('routing', ROUTINGS[:2])
def test_balance_loss_load_and_max_vio_match_numpy(routing):
  params, bias_E, x_BTD = draw(2)
  _, aux = dsm.deepseek_moe(*f32((params, bias_E, x_BTD)), **kwargs(routing))
  s_BTE, _, experts_BTK = np_route(params['router'], bias_E, x_BTD, *routing)
  load_E = np.bincount(experts_BTK.reshape(-1), minlength=E)
  np.testing.assert_array_equal(aux['load_E'], load_E)
  np.testing.assert_allclose(aux['max_vio'], (load_E.max() - load_E.mean()) / load_E.mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(aux['load_balance_loss'], np_balance_loss(s_BTE, experts_BTK),
                             rtol=1e-5)
  assert int(aux['dropped']) == 0


def test_balance_loss_is_one_when_balanced_within_each_sequence():
  """Equal affinities and every expert chosen equally often in each sequence: f = 1, P = 1/E."""
  experts_BTK = jnp.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]]])
  loss = dsm.sequence_balance_loss(jnp.full((2, 2, 4), 0.3), experts_BTK)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  skewed_BTE = jnp.array([0.9, 0.9, 0.1, 0.1]) * jnp.ones((2, 2, 4))
  assert dsm.sequence_balance_loss(skewed_BTE, jnp.array([[[0, 1]] * 2] * 2)) > 1.5


def test_update_bias_steps_by_gamma_toward_the_mean_load():
  load_LE = jnp.array([[5, 3, 4, 4], [4, 4, 4, 4]])
  bias_LE = jnp.array([[0.1, -0.2, 0.3, 0.0], [0.5, 0.25, 0.0, -1.0]], jnp.float32)
  new_LE = dsm.update_bias(bias_LE, load_LE, 0.125)
  np.testing.assert_array_equal(new_LE, np.float32(bias_LE) + np.float32(
      [[-0.125, 0.125, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
  assert new_LE.dtype == jnp.float32
  with pytest.raises(ValueError, match='gamma=-0.1'):
    dsm.update_bias(bias_LE, load_LE, -0.1)


@pytest.mark.parametrize('routing', ROUTINGS)
@pytest.mark.parametrize('n_shared', [0, N_SHARED])
def test_dense_matches_per_token_loop(routing, n_shared):
  params, bias_E, x_BTD = draw(3, n_shared=n_shared)
  y_BTD, _ = dsm.deepseek_moe(*f32((params, bias_E, x_BTD)), **kwargs(routing))
  assert y_BTD.shape == (B, T, D) and y_BTD.dtype == jnp.float32
  np.testing.assert_allclose(y_BTD, np_moe(params, bias_E, x_BTD, routing)[0], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('capacity_factor', [0.5, 1.0, E / 3])
def test_capacity_dispatch_drops_in_priority_order(capacity_factor):
  """Capacity E / K drops nothing and equals the dense reference (values and aux)."""
  routing = ROUTINGS[1]
  params, bias_E, x_BTD = draw(4)
  args = f32((params, bias_E, x_BTD))
  y_BTD, aux = dsm.deepseek_moe(*args, **kwargs(routing), dispatch='capacity',
                                capacity_factor=capacity_factor)
  C = int(np.ceil(capacity_factor * B * T * routing[0] / E))
  np_y_BTD, np_dropped = np_moe(params, bias_E, x_BTD, routing, capacity=C)
  assert int(aux['dropped']) == np_dropped
  np.testing.assert_allclose(y_BTD, np_y_BTD, rtol=1e-5, atol=1e-5)
  if capacity_factor == E / 3:
    assert np_dropped == 0
    y_dense_BTD, aux_dense = dsm.deepseek_moe(*args, **kwargs(routing))
    np.testing.assert_allclose(y_BTD, y_dense_BTD, rtol=1e-6, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, aux, aux_dense)
  else:
    assert np_dropped > 0


def test_dispatch_arguments_are_checked():
  args = f32(draw(0))
  with pytest.raises(ValueError, match="dispatch='sparse'"):
    dsm.deepseek_moe(*args, top_k=2, dispatch='sparse')
  with pytest.raises(ValueError, match='capacity_factor=None'):
    dsm.deepseek_moe(*args, top_k=2, dispatch='capacity')


@pytest.mark.parametrize('dispatch,capacity_factor', [('dense', None), ('capacity', 0.75)])
def test_check_grads_float64(x64, dispatch, capacity_factor):
  """Through the router (sigmoid gates), routed and shared experts and the balance loss; the
  bias gets exactly zero gradient, although it changes the output through the choice."""
  params, bias_E, x_BTD = jax.tree.map(jnp.asarray, draw(5))
  r_BTD = np.random.default_rng(6).standard_normal((B, T, D))
  kw = dict(kwargs(ROUTINGS[1]), dispatch=dispatch, capacity_factor=capacity_factor)

  def loss(p, b, x):
    y_BTD, aux = dsm.deepseek_moe(p, b, x, **kw)
    return jnp.sum(y_BTD * r_BTD) + aux['load_balance_loss']

  check_grads(jax.jit(lambda p, x: loss(p, bias_E, x)), (params, x_BTD), order=1, modes=['rev'])
  grad_bias_E = jax.grad(loss, argnums=1)(params, bias_E, x_BTD)
  np.testing.assert_array_equal(grad_bias_E, np.zeros(E))
  assert loss(params, bias_E, x_BTD) != loss(params, 3 * bias_E, x_BTD)


def test_bias_updates_balance_a_skewed_router():
  """Aux-loss-free balancing (Wang et al. Alg. 1): a router whose affinities favour low expert
  ids (logit offsets 2 .. -2) overloads them, MaxVio > 2 on batches of 512 random tokens; after
  250 steps of update_bias with gamma = 0.01 the batches' MaxVio stays below 0.3 (mean of the
  last 50 steps; what is left is mostly the sampling noise of 1024 assignments)."""
  d, n_tokens, top_k, gamma = 8, 512, 2, 0.01
  rng = np.random.default_rng(0)
  router_DE = 0.3 * rng.standard_normal((d, E))
  router_DE[0] = np.linspace(2.0, -2.0, E)  # x[..., 0] = 1: a per-expert offset of the logits
  router_DE = jnp.asarray(router_DE, jnp.float32)

  def step(bias_E, key):
    x_BTD = jax.random.normal(key, (1, n_tokens, d)).at[..., 0].set(1.0)
    _, _, experts_BTK = dsm.route(router_DE, bias_E, x_BTD, top_k=top_k)
    load_E = jnp.bincount(experts_BTK.reshape(-1), length=E)
    return dsm.update_bias(bias_E, load_E, gamma), dsm.max_violation(load_E)

  scan = jax.jit(lambda keys: jax.lax.scan(step, jnp.zeros(E), keys))
  bias_E, max_vio = scan(jax.random.split(jax.random.key(1), 300))
  assert max_vio[0] > 2.0
  assert max_vio[-50:].mean() < 0.3
  assert np.all(np.diff(bias_E) > 0)  # the favoured experts got the lowest bias


@on_8_devices
def test_expert_parallel_equals_dense_and_capacity_per_device():
  """On a (data 2, expert 4) mesh of 8 devices: with capacity E / K the expert-parallel layer
  equals the dense reference in value, aux and gradients; with capacity 0.5 it equals the
  capacity dispatch applied to each device's tokens."""
  from lab.parallel import mesh as mesh_lib, rules as rules_lib
  routing = kwargs(ROUTINGS[1])
  specs = dsm.deepseek_moe_specs(D, F, E, 1, std=1.0, out_std=1.0)
  params, bias_E, x_BTD = f32(draw(7, n_shared=1, batch=8))
  r_BTD = np.random.default_rng(8).standard_normal(x_BTD.shape).astype(np.float32)

  def value_and_grads(**kw):
    def loss(p, x):
      y_BTD, aux = dsm.deepseek_moe(p, bias_E, x, **routing, **kw)
      return jnp.sum(y_BTD * r_BTD) + aux['load_balance_loss'], (y_BTD, aux)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  (_, (y_dense_BTD, aux_dense)), dense_grads = jax.jit(value_and_grads())(params, x_BTD)
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 1, 'expert': 4})
  sharded = jax.device_put(params, ps.shardings(specs, mesh, rules_lib.DEFAULT_RULES))
  assert sharded['w_down'].sharding.spec[0] == 'expert'
  with rules_lib.activate(mesh, rules_lib.DEFAULT_RULES):
    ep = value_and_grads(dispatch='expert_parallel', capacity_factor=E / routing['top_k'])
    traced = jax.jit(ep).trace(sharded, x_BTD)
    (_, (y_BTD, aux)), grads = traced.lower().compile()(sharded, x_BTD)
    y_small_BTD, aux_small = jax.jit(lambda p, x: dsm.deepseek_moe(
        p, bias_E, x, **routing, dispatch='expert_parallel', capacity_factor=0.5))(sharded, x_BTD)
  assert str(traced.jaxpr).count('all_to_all') == 4
  np.testing.assert_allclose(y_BTD, y_dense_BTD, rtol=1e-5, atol=1e-5)
  for key in aux:
    np.testing.assert_allclose(aux[key], aux_dense[key], rtol=1e-6, err_msg=key)
  for (path, g), g_dense in zip(jax.tree_util.tree_leaves_with_path(grads),
                                jax.tree.leaves(dense_grads)):
    assert np.abs(g_dense).max() > 0
    np.testing.assert_allclose(g, g_dense, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  per_group = jax.vmap(lambda x: dsm.deepseek_moe(params, bias_E, x, **routing,
                                                  dispatch='capacity', capacity_factor=0.5))
  y_groups_GbTD, aux_groups = per_group(x_BTD.reshape(8, -1, T, D))
  assert int(aux_small['dropped']) == int(aux_groups['dropped'].sum()) > 0
  np.testing.assert_allclose(y_small_BTD, y_groups_GbTD.reshape(x_BTD.shape), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('routing', [ROUTINGS[1], (2, 1, 1, 1.0, False)])
def test_matches_hf_deepseek_v3_moe(routing):
  """transformers' DeepseekV3MoE (float32, CPU) with random weights and a random
  e_score_correction_bias, copied through deepseek_moe_hf.from_hf: same experts, gates and
  output; to_hf inverts from_hf, and the per-expert checkpoint layout loads the same."""
  import torch
  import transformers
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3

  top_k, n_groups, top_k_groups, scale, normalize = routing
  config = transformers.DeepseekV3Config(
      hidden_size=16, moe_intermediate_size=F, n_routed_experts=E, num_experts_per_tok=top_k,
      n_group=n_groups, topk_group=top_k_groups, n_shared_experts=N_SHARED,
      routed_scaling_factor=scale, norm_topk_prob=normalize)
  config._experts_implementation = 'eager'
  torch.manual_seed(0)
  hf_moe = hf_v3.DeepseekV3MoE(config).eval()
  with torch.no_grad():
    for name, tensor in hf_moe.state_dict().items():
      tensor.normal_(std=0.1 if 'bias' in name else 0.5)
  tensors = {k: v.numpy() for k, v in hf_moe.state_dict().items()}
  assert deepseek_moe_hf.routing_kwargs(config.to_dict()) == kwargs(routing)
  params, bias_E = deepseek_moe_hf.from_hf(tensors)
  jax.tree.map(np.testing.assert_array_equal, deepseek_moe_hf.to_hf(params, bias_E), tensors)

  x_BTD = np.random.default_rng(9).standard_normal((B, T, 16)).astype(np.float32)
  with torch.no_grad():
    y_hf_BTD = hf_moe(torch.from_numpy(x_BTD)).numpy()
    _, gates_hf, experts_hf = hf_moe.gate(torch.from_numpy(x_BTD))
  _, gates_BTK, experts_BTK = dsm.route(params['router'], bias_E, x_BTD, **kwargs(routing))
  order = np.argsort(experts_hf.numpy(), -1)  # HF's top-k is unsorted
  np.testing.assert_array_equal(np.sort(experts_BTK.reshape(-1, top_k), -1),
                                np.take_along_axis(experts_hf.numpy(), order, -1))
  np.testing.assert_allclose(np.take_along_axis(gates_BTK.reshape(-1, top_k),
                                                np.argsort(experts_BTK.reshape(-1, top_k), -1), -1),
                             np.take_along_axis(gates_hf.numpy(), order, -1), rtol=1e-5)
  y_BTD, _ = dsm.deepseek_moe(params, bias_E, x_BTD, **kwargs(routing))
  np.testing.assert_allclose(y_BTD, y_hf_BTD, rtol=1e-5, atol=1e-5)

  per_expert = {k: v for k, v in tensors.items() if not k.startswith('experts.')}
  gate_up = tensors['experts.gate_up_proj']
  for e in range(E):
    per_expert[f'experts.{e}.gate_proj.weight'] = gate_up[e, :F]
    per_expert[f'experts.{e}.up_proj.weight'] = gate_up[e, F:]
    per_expert[f'experts.{e}.down_proj.weight'] = tensors['experts.down_proj'][e]
  jax.tree.map(np.testing.assert_array_equal, deepseek_moe_hf.from_hf(per_expert),
               (params, bias_E))
