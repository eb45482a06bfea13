"""MoCo v1/v2 (lab.objectives.moco): the loss against a float64 NumPy re-derivation of eq. 1 with
the queue as negatives, keys without gradient (also before the first momentum step), the FIFO
queue against a deque, the momentum update (eq. 2) against its formula, per-group batch norm
against separate calls, the shuffle undone, config errors, and a tiny training run."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.models import backbone
from lab.nn import mlp_head
from lab.nn import param_spec as ps
from lab.objectives import moco
from lab.train import optimizers
from lab.train import step as step_lib
from lab.train.state import TrainState


def tiny_task(spec: str, overrides=()):
  """(config, task) of experiments/ssl.py:<spec> (e.g. 'method=moco_v1,tiny') with overrides."""
  config = config_lib.override(config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:{spec}'),
                               list(overrides))
  config, task, _ = run.prepare(config)
  return config, task


def np_init(specs, rng, dtype=np.float32):
  """Parameters of `specs` from NumPy: zeros and ones where the spec says so, else normal with
  std 1 / sqrt(fan_in) (fan_in: the product of all dims but the last). It stands in for
  param_spec.init, whose jitted threefry draws take about a second of CPU per array to compile."""
  def one(s):
    if s.init in (ps.zeros, ps.ones):
      return jnp.asarray(s.init(None, s.shape, dtype))
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), dtype)
  return jax.tree.map(one, specs, is_leaf=ps.is_spec)


def tiny_run(spec: str, overrides, steps: int) -> np.ndarray:
  """The training losses of `steps` train steps (lab.train.step, the loop's step with the task's
  after_step) of experiments/ssl.py:<spec> on digits."""
  config = config_lib.override(config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:{spec}'),
                               [f'train.steps={steps}', *overrides])
  config, task, data = run.prepare(config)
  params = np_init(task.param_specs, np.random.default_rng(0))
  opt = optimizers.make(config.train)
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=opt.init(params),
                     model_state=task.init_state(jax.random.key(1)), ema_params=None,
                     loss_scale=None, rng=jax.random.key(2))
  train_step = jax.jit(step_lib.make_train_step(config.train, task, opt))
  batches, losses = data.make_train_iter(), []
  for _ in range(steps):
    state, metrics = train_step(state, next(batches))
    losses.append(float(metrics['loss']))
  return np.asarray(losses)


def np_normalize(x_BD):
  return x_BD / np.sqrt((x_BD ** 2).sum(-1, keepdims=True))


def np_moco_loss(q_BD, k_BD, queue_ND, tau):
  """MoCo eq. 1 for each query: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_n exp(q.u_n/tau)),
  q and k L2-normalised, negatives exactly the queue rows u_n; the mean over the batch."""
  q, k = np_normalize(q_BD), np_normalize(k_BD)
  total = 0.0
  for b in range(len(q)):
    logits = np.concatenate([[q[b] @ k[b]], queue_ND @ q[b]]) / tau
    m = logits.max()
    total += -(logits[0] - m - np.log(np.exp(logits - m).sum()))
  return total / len(q)


def synced_state(task, target, key=1):
  """The task's initial state with the momentum network set to `target` (as after step 1)."""
  state = task.init_state(jax.random.key(key))
  return {**state, 'synced': jnp.asarray(True),
          'target': {**state['target'], 'params': target}}


def embed(config, spec, p, s, x_BXYC):
  """g(f(x)) in eval mode through lab's backbone and head."""
  z_BD, _ = backbone.features(config.model, p['encoder'], s['encoder'], x_BXYC, train=False)
  return mlp_head.head(p['projector'], s['projector'], spec, z_BD, train=False)[0]


@pytest.mark.parametrize('method', ['moco_v1', 'moco_v2'])
def test_loss_is_info_nce_against_the_queue(method, x64, monkeypatch):
  config, task = tiny_task(f'method={method},tiny', ['objective_args.queue_size=48'])
  rng = np.random.default_rng(0)
  params = np_init(task.param_specs, rng, np.float64)
  target = np_init(task.param_specs, rng, np.float64)
  state = synced_state(task, target)
  x_q, x_k = rng.uniform(-1, 1, (2, 16, 8, 8, 1))
  monkeypatch.setattr(moco, 'two_views', lambda spec, key, x: (jnp.asarray(x_q), jnp.asarray(x_k)))
  loss, (metrics, new_state) = jax.jit(task.loss_fn, static_argnums=4)(
      params, state, {'image': jnp.zeros((16, 8, 8, 1))}, None, False)
  args = config.objective_args
  spec = moco.head_layers(method, backbone.feature_dim(config.model), args.dim, args.mlp_hidden)
  net = jax.jit(lambda p, s, x: embed(config, spec, p, s, x))
  q = np.asarray(net(params, state['online'], x_q))
  k = np.asarray(net(target, state['target']['state'], x_k))
  assert q.shape == (16, 128) and not np.allclose(q, k)
  want = np_moco_loss(q, k, np.asarray(state['queue'], np.float64),
                      0.07 if method == 'moco_v1' else 0.2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-10)
  assert metrics['loss'] == loss and 0.0 <= metrics['accuracy'] <= 1.0
  jax.tree.map(np.testing.assert_array_equal, new_state, state)  # evaluation changes no state


def test_keys_carry_no_gradient_before_and_after_the_first_step():
  """Before the first after_step the key encoder is a copy of the query encoder: the loss and
  its gradient equal those with an explicit (synced) copy, and the copy is what loss_fn stores.
  The loss has no gradient with respect to the key encoder (keys are constants)."""
  _, task = tiny_task('method=moco_v2,tiny', ['objective_args.queue_size=32'])
  params = np_init(task.param_specs, np.random.default_rng(1))
  batch = {'image': jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (16, 8, 8, 1)),
                                jnp.float32)}
  init = task.init_state(jax.random.key(1))

  def loss(p, target, synced):
    state = {**init, 'synced': synced, 'target': {**init['target'], 'params': target}}
    return task.loss_fn(p, state, batch, jax.random.key(3), True)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (g_copy, _), (_, state_copy) = grad(params, init['target']['params'], jnp.asarray(False))
  (g_sync, g_target), (_, state_sync) = grad(params, params, jnp.asarray(True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               g_copy, g_sync)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_sync)) > 1e-3
  assert all(not g.any() for g in jax.tree.leaves(g_target))
  jax.tree.map(np.testing.assert_array_equal, state_copy['target']['params'], params)
  np.testing.assert_array_equal(state_copy['queue'], state_sync['queue'])


def test_momentum_update_is_eq_2_from_a_copy():
  """theta_k <- m theta_k + (1 - m) theta_q after each step (m = 0.999), starting from the copy
  of theta_q^(0) that momentum_network hands loss_fn to store before the first step."""
  _, task = tiny_task('method=moco_v1,tiny')
  rng = np.random.default_rng(4)
  theta0 = np_init(task.param_specs, rng)
  theta1 = np_init(task.param_specs, rng)
  state = task.init_state(jax.random.key(0))
  copy = moco.momentum_network(state['target']['params'], theta0, state['synced'])
  jax.tree.map(np.testing.assert_array_equal, copy, theta0)
  kept = moco.momentum_network(theta1, theta0, jnp.asarray(True))
  jax.tree.map(np.testing.assert_array_equal, kept, theta1)
  after_step = jax.jit(task.after_step)
  state = after_step(theta1, {**state, 'target': {**state['target'], 'params': copy}}, 1)
  assert bool(state['synced'])
  jax.tree.map(lambda k, a, b: np.testing.assert_allclose(
      k, 0.999 * np.float64(a) + 0.001 * np.float64(b), rtol=1e-6, atol=1e-7),
      state['target']['params'], theta0, theta1)
  state = after_step(theta0, state, 2)
  jax.tree.map(lambda k, a, b: np.testing.assert_allclose(
      k, 0.999 * (0.999 * np.float64(a) + 0.001 * np.float64(b)) + 0.001 * np.float64(a),
      rtol=1e-6, atol=1e-7), state['target']['params'], theta0, theta1)


def test_queue_is_fifo_of_fixed_size():
  """Against a deque of maxlen N: after every enqueue, the rows read from ptr on (oldest first)
  are the last N keys in arrival order; the queue never changes size."""
  rng = np.random.default_rng(5)
  N, B, D = 12, 4, 3
  queue_ND = moco.init_queue(jax.random.key(0), N, D)
  np.testing.assert_allclose(np.linalg.norm(queue_ND, axis=1), 1.0, rtol=1e-6)
  oracle = collections.deque(np.asarray(queue_ND), maxlen=N)
  ptr = jnp.asarray(0, jnp.int32)
  for _ in range(7):
    keys_BD = rng.standard_normal((B, D)).astype(np.float32)
    queue_ND, ptr = jax.jit(moco.enqueue)(queue_ND, ptr, jnp.asarray(keys_BD))
    oracle.extend(keys_BD)
    assert queue_ND.shape == (N, D)
    np.testing.assert_array_equal(np.roll(np.asarray(queue_ND), -int(ptr), axis=0),
                                  np.stack(oracle))
  with pytest.raises(ValueError, match=r'keys of shape \(5, 3\)'):
    moco.enqueue(queue_ND, ptr, jnp.zeros((5, D)))


def test_batch_norm_groups_and_the_shuffle():
  """grouped_features equals separate backbone calls on the G sub-batches (running statistics:
  their mean); `shuffled` hands every row back to its image, while the permuted groups give
  different keys than the unshuffled ones (other BN statistics) unless G = 1."""
  config, task = tiny_task('method=moco_v1,tiny')
  cfg = config.model
  rng = np.random.default_rng(6)
  p = np_init(task.param_specs, rng)['encoder']
  s = backbone.init_state(cfg)
  x = jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)), jnp.float32)
  grouped = jax.jit(lambda x, g: moco.grouped_features(cfg, p, s, x, g, train=True, rng=None),
                    static_argnums=1)
  z, new_s = grouped(x, 4)
  single = jax.jit(lambda x: backbone.features(cfg, p, s, x, train=True))
  parts = [single(x[i:i + 4]) for i in range(0, 16, 4)]
  np.testing.assert_allclose(z, np.concatenate([z_i for z_i, _ in parts]), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda got, *want: np.testing.assert_allclose(got, np.mean(want, 0), rtol=1e-5,
                                                             atol=1e-7),
               new_s, *[s_i for _, s_i in parts])
  key = jax.random.key(7)
  z_shuf, _ = moco.shuffled(lambda x: grouped(x, 4), x, key)
  assert not np.allclose(z_shuf, z, atol=1e-3)
  perm = np.asarray(jax.random.permutation(key, 16))
  np.testing.assert_allclose(np.asarray(z_shuf)[perm], grouped(x[perm], 4)[0], rtol=1e-6)
  z1, _ = grouped(x, 1)
  np.testing.assert_allclose(moco.shuffled(lambda x: grouped(x, 1), x, key)[0], z1, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize('override, match', [
    ('objective_args.queue_size=40', 'queue_size=40; expected a positive multiple of the '
                                     'micro-batch 16'),
    ('objective_args.bn_groups=3', 'bn_groups=3; expected a divisor'),
    ('objective_args.temperature=0.0', 'temperature=0.0; expected > 0'),
    ('objective_args.method=moco_v9', "method='moco_v9'"),
])
def test_config_errors(override, match):
  with pytest.raises(ConfigError, match=match):
    tiny_task('method=moco_v1,tiny', [override])


@pytest.mark.parametrize('method', ['moco_v1', 'moco_v2'])
def test_tiny_run_learns(method):
  """Digits, a width-16 ResNet, a queue of 2 batches: after the queue holds real keys (step 3
  on) the loss falls from chance, log(65), with no NaN. AdamW at 3e-3 and m = 0.99 (as
  test_simclr: the recipe's SGD at 0.015 and m = 0.999 move too little in 150 steps to show)."""
  losses = tiny_run(f'method={method},tiny', ['objective_args.queue_size=64',
                                              'objective_args.momentum=0.99',
                                              'train.optimizer=adamw', 'train.lr=3e-3',
                                              'train.weight_decay=0.0', 'train.warmup_steps=10',
                                              'train.batch_size=32', 'model.width=16'], 150)
  assert np.isfinite(losses).all()
  first, last = losses[3:33].mean(), losses[-30:].mean()
  assert first > np.log(65) - 0.1 and last < first - 0.12, (first, last)
