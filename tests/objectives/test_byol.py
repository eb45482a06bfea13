"""BYOL: the symmetrised normalised-MSE loss and its gradient against float64 NumPy, the cosine
EMA of the target against eq. 1, and a tiny run of experiments/ssl.py:method=byol,tiny whose
first step is checked exactly (target = tau_1 theta_0 + (1 - tau_1) theta_1)."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.objectives import byol
from lab.parallel import rules as rules_lib
from lab.train import loop
from oracles import assert_vjp_matches_oracle

TINY = str(REPO_ROOT / 'experiments/ssl.py') + ':method=byol,tiny'


def normalized_mse_oracle(q, z):
  """mean_b (2 - 2 q_b . z_b / (|q_b| |z_b|)) (eq. 2)."""
  cos = np.sum(q * z, axis=1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(z, axis=1))
  return np.mean(2 - 2 * cos)


def tau_oracle(k, K, base=0.996):
  return 1 - (1 - base) * (np.cos(np.pi * k / K) + 1) / 2


def test_loss_matches_numpy_and_the_target_gets_no_gradient(x64):
  rng = np.random.default_rng(0)
  q1, q2, z1, z2 = (rng.standard_normal((6, 5)) for _ in range(4))
  want = normalized_mse_oracle(q1, z2) + normalized_mse_oracle(q2, z1)
  got = byol.byol_loss(*map(jnp.asarray, (q1, q2, z1, z2)))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(byol.normalized_mse(jnp.asarray(q1), jnp.asarray(q1)), 0, atol=1e-12)
  g_z = jax.grad(lambda z1, z2: byol.byol_loss(jnp.asarray(q1), jnp.asarray(q2), z1, z2),
                 argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
  assert not any(np.any(np.asarray(g)) for g in g_z)


def test_loss_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  q1, q2, z1, z2 = (rng.standard_normal((4, 3)) for _ in range(4))
  z1_32, z2_32 = jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)
  assert_vjp_matches_oracle(
      lambda q1, q2: byol.byol_loss(q1, q2, z1_32, z2_32)[None],
      lambda q1, q2: np.array([normalized_mse_oracle(q1, z2) + normalized_mse_oracle(q2, z1)]),
      [q1, q2], rng)


def test_after_step_is_the_cosine_ema_of_eq_1():
  """after_step moves the target's encoder and projector (and nothing else) by eq. 1, tau from
  the cosine schedule over train.steps = 50, on any parameter trees (no network is run)."""
  config, task, _ = run.prepare(config_lib.override(config_lib.load(TINY), ['train.steps=50']))
  rng = np.random.default_rng(2)
  draw = lambda: {'encoder': {'w': rng.standard_normal((3, 2))},
                  'projector': [{'w': rng.standard_normal((2, 4)), 'b': rng.standard_normal(4)}]}
  online, target = draw(), draw()
  params = {**online, 'predictor': [{'w': rng.standard_normal((4, 4))}]}
  state = {'target': {'params': target, 'state': {'encoder': {}}}, 'target_ready': True}
  after_step = jax.jit(task.after_step)
  for k in (1, 20, 50):
    tau = tau_oracle(k, 50)
    new = after_step(params, state, jnp.asarray(k))
    assert new['target']['state'] == {'encoder': {}} and bool(new['target_ready'])
    for got, t, o in zip(jax.tree.leaves(new['target']['params']), jax.tree.leaves(target),
                         jax.tree.leaves(online)):
      np.testing.assert_allclose(got, tau * t + (1 - tau) * o, rtol=1e-5, atol=1e-6)
  assert float(tau_oracle(50, 50)) == 1.0


def test_tiny_byol_run_learns_and_starts_the_target_at_theta_0():
  steps = 10
  config = config_lib.override(config_lib.load(TINY), [f'train.steps={steps}', 'train.lr=0.01'])
  config, task, data = run.prepare(config)
  setup = loop.setup(config, task)
  batches = data.make_train_iter()
  online = lambda s: {k: s.params[k] for k in ('encoder', 'projector')}
  with rules_lib.activate(setup.mesh, setup.rules):
    state = setup.init()
    theta_0 = jax.device_get(online(state))
    assert not bool(state.model_state['target_ready'])
    losses = []
    for i in range(steps):
      state, m = setup.train_step(state, setup.global_batch(next(batches)))
      losses.append(float(m['loss']))
      if i == 0:
        tau, theta_1 = tau_oracle(1, steps), jax.device_get(online(state))
        want = jax.tree.map(lambda a, b: tau * a + (1 - tau) * b, theta_0, theta_1)
        got = jax.device_get(state.model_state['target']['params'])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
          np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  assert bool(state.model_state['target_ready'])
  assert np.all(np.isfinite(losses)), losses
  assert 0 <= min(losses) and max(losses) <= 8  # two terms of 2 - 2 cos
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
