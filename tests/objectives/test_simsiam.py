"""SimSiam: the symmetrised negative-cosine loss and its gradients with and without the
stop-gradient against float64 NumPy, and the paper's fig. 2 at toy scale: on the tiny config,
removing the stop-gradient collapses the outputs (their normalised std falls toward 0) while with
it the std stays near 1 / sqrt(d) and the loss falls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.objectives import simsiam
from lab.parallel import rules as rules_lib
from lab.train import loop
from oracles import assert_vjp_matches_oracle

TINY = str(REPO_ROOT / 'experiments/ssl.py') + ':method=simsiam,tiny'


def neg_cos_oracle(p, z):
  """D(p, z) = -mean_b p_b . z_b / (|p_b| |z_b|) (eq. 1)."""
  return -np.mean(np.sum(p * z, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1)))


def loss_oracle(p1, p2, z1, z2):
  return neg_cos_oracle(p1, z2) / 2 + neg_cos_oracle(p2, z1) / 2  # eq. 2


def test_loss_matches_numpy(x64):
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = (rng.standard_normal((7, 5)) for _ in range(4))
  for stop in (True, False):
    got = simsiam.simsiam_loss(*map(jnp.asarray, (p1, p2, z1, z2)), stop_gradient=stop)
    np.testing.assert_allclose(got, loss_oracle(p1, p2, z1, z2), rtol=1e-12)
  np.testing.assert_allclose(simsiam.negative_cosine(jnp.asarray(p1), jnp.asarray(3 * p1)), -1,
                             rtol=1e-12)


@pytest.mark.parametrize('stop', [True, False])
def test_gradients_with_and_without_stop_gradient(stop):
  """d/dp always matches the oracle; d/dz is 0 with the stop-gradient and the oracle's without."""
  rng = np.random.default_rng(1)
  p1, p2, z1, z2 = (rng.standard_normal((4, 3)) for _ in range(4))
  f = lambda p1, p2, z1, z2: simsiam.simsiam_loss(p1, p2, z1, z2, stop_gradient=stop)[None]
  z32 = [jnp.asarray(z, jnp.float32) for z in (z1, z2)]
  assert_vjp_matches_oracle(lambda p1, p2: f(p1, p2, *z32),
                            lambda p1, p2: np.array([loss_oracle(p1, p2, z1, z2)]), [p1, p2], rng)
  p32 = [jnp.asarray(p, jnp.float32) for p in (p1, p2)]
  if stop:
    g = jax.grad(lambda z1, z2: f(*p32, z1, z2)[0], argnums=(0, 1))(*z32)
    assert not any(np.any(np.asarray(x)) for x in g)
  else:
    assert_vjp_matches_oracle(lambda z1, z2: f(*p32, z1, z2),
                              lambda z1, z2: np.array([loss_oracle(p1, p2, z1, z2)]), [z1, z2],
                              rng)


def short_runs(steps: int):
  """{stop_gradient: (losses, z_std per step)} of the tiny config with d = 16 and Adam at a
  constant lr 0.05, both runs from the same initial state (one init compiled, not two)."""
  runs, state_0 = {}, None
  for stop in (True, False):
    config = config_lib.override(config_lib.load(TINY), [
        f'train.steps={steps}', 'train.optimizer=adamw', 'train.lr=0.05',
        'train.schedule=constant', 'objective_args.proj_dim=16', 'objective_args.pred_hidden=4',
        f'objective_args.stop_gradient={stop}'])
    config, task, data = run.prepare(config)
    setup = loop.setup(config, task)
    batches = data.make_train_iter()
    losses, stds = [], []
    with rules_lib.activate(setup.mesh, setup.rules):
      state_0 = setup.init() if state_0 is None else state_0
      state = jax.tree.map(jnp.copy, state_0)  # the step donates its input
      for _ in range(steps):
        state, m = setup.train_step(state, setup.global_batch(next(batches)))
        losses.append(float(m['loss']))
        stds.append(float(m['z_std']))
    runs[stop] = np.array(losses), np.array(stds)
  return runs


@pytest.mark.slow  # two 60-step runs
def test_removing_the_stop_gradient_collapses():
  d, steps = 16, 60
  runs = short_runs(steps)
  (loss_sg, std_sg), (loss_free, std_free) = runs[True], runs[False]
  assert np.all(np.isfinite(loss_sg)) and np.all(np.isfinite(loss_free))
  assert loss_sg[-5:].mean() < loss_sg[:5].mean() - 0.2, loss_sg  # the tiny run learns
  assert loss_free[-5:].mean() < -0.95  # the trivial solution: p = z for every image
  on, off = std_sg[-5:].mean(), std_free[-5:].mean()
  assert on > 0.6 / np.sqrt(d), std_sg
  assert off < 0.25 / np.sqrt(d), std_free
  assert on / off > 4, (on, off)
