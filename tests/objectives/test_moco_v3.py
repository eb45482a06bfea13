"""MoCo v3 (lab.objectives.moco_v3): the symmetric loss with its 2 tau factor against a float64
NumPy re-derivation (values and gradients, none into the keys), loss_fn's wiring of predictor,
momentum network and frozen patch projection, the cosine momentum schedule (eq. 2 with m from
0.99 to 1), the heads' layout, and a tiny ViT training run."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.data import augment
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives import moco_v3
from oracles import assert_vjp_matches_oracle
from test_moco import np_init, synced_state, tiny_run, tiny_task

SMALL_HEADS = ['objective_args.mlp_hidden=32', 'objective_args.dim=16']


def np_normalize(x_BD):
  return x_BD / np.sqrt((x_BD ** 2).sum(-1, keepdims=True))


def np_ctr(q_BD, k_BD, tau):
  """Algorithm 1's ctr: 2 tau * mean_b -log softmax_s(q_b . k_s / tau)[b], q and k normalised,
  the batch's keys as candidates."""
  q, k = np_normalize(q_BD), np_normalize(k_BD)
  logits = q @ k.T / tau
  m = logits.max(1, keepdims=True)
  log_p = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
  return 2 * tau * -np.mean(np.diag(log_p))


def np_symmetric(q1, q2, k1, k2, tau):
  return np_ctr(q1, k2, tau) + np_ctr(q2, k1, tau)


def test_symmetric_loss_matches_numpy(x64):
  rng = np.random.default_rng(0)
  q1, q2, k1, k2 = rng.standard_normal((4, 6, 5))
  for tau in (0.2, 1.0):
    loss, metrics = moco_v3.symmetric_loss(*map(jnp.asarray, (q1, q2, k1, k2)), tau)
    np.testing.assert_allclose(float(loss), np_symmetric(q1, q2, k1, k2, tau), rtol=1e-12)
    acc = (np.mean(np.argmax(np_normalize(q1) @ np_normalize(k2).T, 1) == np.arange(6)) +
           np.mean(np.argmax(np_normalize(q2) @ np_normalize(k1).T, 1) == np.arange(6))) / 2
    assert float(metrics['accuracy']) == pytest.approx(acc)
  # At chance (all logits equal) each ctr is 2 tau log B.
  ones = jnp.ones((6, 5))
  assert float(moco_v3.symmetric_loss(ones, ones, ones, ones, 0.2)[0]) == pytest.approx(
      2 * 2 * 0.2 * math.log(6))
  grads_k = jax.grad(lambda k1, k2: moco_v3.symmetric_loss(
      jnp.asarray(q1), jnp.asarray(q2), k1, k2, 0.2)[0], argnums=(0, 1))(jnp.asarray(k1),
                                                                          jnp.asarray(k2))
  assert all(not g.any() for g in grads_k)  # keys are constants (no gradient into them)


def test_symmetric_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  q1, q2, k1, k2 = rng.standard_normal((4, 5, 4))
  assert_vjp_matches_oracle(
      lambda a, b: moco_v3.symmetric_loss(a, b, jnp.asarray(k1, jnp.float32),
                                          jnp.asarray(k2, jnp.float32), 0.2)[0],
      lambda a, b: np_symmetric(a, b, k1, k2, 0.2), [q1, q2], rng)


def embed(cfg, layers, p, s, x_BXYC, patch):
  """Eval-mode g(f(x)) (and h after it when `layers` has the predictor) through lab's backbone
  and heads."""
  y_BD, _ = backbone.features(cfg, {**p['encoder'], 'patch': patch}, s['encoder'], x_BXYC,
                              train=False)
  for name, spec in layers:
    y_BD, _ = mlp_head.head(p[name], s[name], spec, y_BD, train=False)
  return y_BD


def test_loss_fn_wires_predictor_momentum_network_and_frozen_patch(monkeypatch):
  """Eval-mode loss_fn with fixed views equals np_symmetric of q_i = h(g(f(x_i))) from the
  parameters and k_i = g_k(f_k(x_i)) from the momentum network, both with the state's frozen
  patch projection (float32: lab's attention takes no float64)."""
  config, task = tiny_task('method=moco_v3,tiny', SMALL_HEADS)
  cfg, args = config.model, config.objective_args
  assert cfg.name == 'vit' and cfg.pos_embed == 'sincos'
  rng = np.random.default_rng(2)
  params = np_init(task.param_specs, rng)
  target = np_init({k: task.param_specs[k] for k in ('encoder', 'projector')}, rng)
  state = synced_state(task, target)
  x = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
  monkeypatch.setattr(augment, 'byol_views', lambda key, x_XYC, size: (x_XYC, x_XYC[:, ::-1]))
  loss, (metrics, _) = jax.jit(task.loss_fn, static_argnums=4)(params, state,
                                                               {'image': jnp.asarray(x)}, None,
                                                               False)
  vit = True
  proj = moco_v3.projector_layers(vit, args.mlp_hidden, args.dim)
  pred = moco_v3.predictor_layers(vit, args.mlp_hidden, args.dim)
  views = np.stack([x, x[:, :, ::-1]])
  online = jax.jit(jax.vmap(lambda v: embed(cfg, [('projector', proj), ('predictor', pred)],
                                            params, state['online'], v, state['patch'])))
  momentum = jax.jit(jax.vmap(lambda v: embed(cfg, [('projector', proj)], target,
                                              state['target']['state'], v, state['patch'])))
  (q1, q2), (k1, k2) = np.float64(online(views)), np.float64(momentum(views))
  np.testing.assert_allclose(float(loss), np_symmetric(q1, q2, k1, k2, 0.2), rtol=1e-5)
  assert float(metrics['loss']) == float(loss)


def test_frozen_patch_projection_lives_in_the_state():
  """The patch projection is no parameter; it is drawn Xavier-uniform, U(-a, a) with
  a = sqrt(6 / (p^2 C + D)), and the encoder uses it. Unfrozen, it is a parameter again."""
  config, task = tiny_task('method=moco_v3,tiny', SMALL_HEADS)
  cfg = config.model
  assert 'patch' not in task.param_specs['encoder']
  w = np.asarray(task.init_state(jax.random.key(0))['patch']['w'])
  a = math.sqrt(6 / (cfg.patch_size ** 2 * cfg.channels + cfg.d_model))
  assert w.shape == (2, 2, 1, 8) and np.abs(w).max() <= a
  big = np.asarray(moco_v3.frozen_patch(jax.random.key(1), 16, 3, 768)['w'])
  a_big = math.sqrt(6 / (16 * 16 * 3 + 768))
  assert np.abs(big).max() <= a_big and big.std() == pytest.approx(a_big / math.sqrt(3), rel=0.01)
  _, learned = tiny_task('method=moco_v3,tiny', [*SMALL_HEADS, 'objective_args.freeze_patch=False'])
  assert 'patch' in learned.param_specs['encoder']
  assert 'patch' not in learned.init_state(jax.random.key(0))


def test_momentum_follows_the_cosine_schedule():
  """after_step(k): theta_k <- m_k theta_k + (1 - m_k) theta with
  m_k = 1 - (1 - 0.99) (cos(pi k / K) + 1) / 2; the predictor is not followed; at k = K, m = 1."""
  config, task = tiny_task('method=moco_v3,tiny', SMALL_HEADS)
  K = config.train.steps
  rng = np.random.default_rng(3)
  params = np_init(task.param_specs, rng)
  target = np_init({k: task.param_specs[k] for k in ('encoder', 'projector')}, rng)
  state = synced_state(task, target)
  assert set(state['target']['params']) == {'encoder', 'projector'}
  for k in (1, 2, K):
    m = 1 - (1 - 0.99) * (math.cos(math.pi * k / K) + 1) / 2
    new = jax.jit(task.after_step)(params, state, k)['target']['params']
    jax.tree.map(lambda got, t, p: np.testing.assert_allclose(
        got, m * np.float64(t) + (1 - m) * np.float64(p), rtol=1e-5, atol=1e-7),
        new, target, {'encoder': params['encoder'], 'projector': params['projector']})
  jax.tree.map(np.testing.assert_array_equal, new, target)  # m = 1 at the last step


def test_head_layouts_follow_the_authors_code():
  """No Linear has a bias; ViT: projector 3 layers, predictor ends in BN; ResNet: projector 2
  layers, predictor without final BN; final BNs have no affine parameters."""
  proj, pred = moco_v3.projector_layers(True, 64, 16), moco_v3.predictor_layers(True, 64, 16)
  assert [l.width for l in proj] == [64, 64, 16] and [l.width for l in pred] == [64, 16]
  assert [l.bn for l in proj] == [True, True, True] and [l.bn for l in pred] == [True, True]
  assert [l.act for l in proj] == ['relu', 'relu', None] and not proj[-1].bn_affine
  assert not any(l.bias for l in (*proj, *pred)) and not pred[-1].bn_affine
  proj_r, pred_r = moco_v3.projector_layers(False, 64, 16), moco_v3.predictor_layers(False, 64, 16)
  assert len(proj_r) == 2 and proj_r[-1].bn and not pred_r[-1].bn


def test_tiny_vit_run_learns():
  """Digits, the tiny ViT, AdamW: the symmetric loss falls with no NaN (chance: 4 tau log B)."""
  losses = tiny_run('method=moco_v3,tiny', [*SMALL_HEADS, 'train.lr=3e-3',
                                            'train.batch_size=32', 'train.warmup_steps=10'], 150)
  assert np.isfinite(losses).all()
  first, last = losses[:30].mean(), losses[-30:].mean()
  assert last < first - 0.1, (first, last)
