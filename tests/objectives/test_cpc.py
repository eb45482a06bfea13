"""CPC (lab.objectives.cpc): the patch grid against NumPy slicing, the context network's row
causality by its Jacobian, eqs. 3-4 against a float64 NumPy loop over queries, the patch jitter's
window, config errors, and a tiny run that lowers the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.nn import param_spec as ps
from lab.objectives import cpc
from lab.train import loop


def test_patch_grid_matches_numpy_slices():
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  got = np.asarray(cpc.patch_grid(jnp.asarray(x), 4))
  s, p, o = 5, 10, 1  # 28 // 5 = 5, 2 s, (28 - 25) // 2
  assert cpc.grid_geometry(28, 4) == (s, p, o) and got.shape == (2, 4, 4, p, p, 1)
  for i in range(4):
    for j in range(4):
      np.testing.assert_array_equal(got[:, i, j], x[:, o + s * i:o + s * i + p,
                                                    o + s * j:o + s * j + p])


def test_context_at_row_i_depends_on_rows_up_to_i_only():
  d, rng = 6, np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.5, jnp.float32),
                        cpc.context_specs(d, 2), is_leaf=ps.is_spec)
  z = jnp.asarray(rng.normal(size=(1, 5, 3, d)), jnp.float32)
  jac = jax.jacobian(lambda z: cpc.context(params, z))(z)  # [1, I, J, C, 1, I, J, D]
  dependence_II = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))
  for i in range(5):
    assert np.all(dependence_II[i, i + 1:] == 0), (i, dependence_II[i])
    assert np.all(dependence_II[i, :i + 1] > 0), (i, dependence_II[i])


def np_cpc_loss(z, c, w):
  """Eq. 4 per query (b, i, j) and step k, float64: -log softmax over all B I J patches z' of
  z'^T W_k c_{b,i,j}, the positive z_{b,i+k,j}; the mean over queries, then over k."""
  z, c, w = (np.asarray(a, np.float64) for a in (z, c, w))
  B, I, J, D = z.shape
  flat = z.reshape(-1, D)
  per_k, acc_k = [], []
  for k in range(1, w.shape[0] + 1):
    losses, hits = [], []
    for b in range(B):
      for i in range(I - k):
        for j in range(J):
          scores = flat @ (c[b, i, j] @ w[k - 1])
          target = (b * I + i + k) * J + j
          m = scores.max()
          losses.append(m + np.log(np.exp(scores - m).sum()) - scores[target])
          hits.append(scores.argmax() == target)
    per_k.append(np.mean(losses))
    acc_k.append(np.mean(hits))
  return np.mean(per_k), np.mean(acc_k)


def test_loss_matches_numpy_eq_4_and_has_the_right_gradient():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)
  c = rng.normal(size=(3, 4, 2, 7)).astype(np.float32)
  w = (rng.normal(size=(2, 7, 5)) * 0.3).astype(np.float32)
  loss, metrics = cpc.cpc_loss(jnp.asarray(z), jnp.asarray(c), jnp.asarray(w))
  want_loss, want_acc = np_cpc_loss(z, c, w)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['accuracy']), want_acc, rtol=1e-6)
  grad = jax.grad(lambda w: cpc.cpc_loss(jnp.asarray(z), jnp.asarray(c), w)[0])(jnp.asarray(w))
  eps, e = 1e-4, np.zeros_like(w, np.float64)
  e[1, 3, 2] = eps
  numeric = (np_cpc_loss(z, c, w + e)[0] - np_cpc_loss(z, c, w - e)[0]) / (2 * eps)
  np.testing.assert_allclose(float(grad[1, 3, 2]), numeric, rtol=1e-3, atol=1e-6)
  with pytest.raises(ValueError, match='K < I'):
    cpc.cpc_loss(jnp.asarray(z), jnp.asarray(c), jnp.zeros((4, 7, 5)))


def test_jitter_keeps_a_shifted_window_on_background():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 1, 3, 8, 8, 1)), jnp.float32)  # p = 8: r = 1
  y = np.asarray(cpc.jitter_patches(jax.random.key(0), x))
  x = np.asarray(x)
  border = np.ones((8, 8), bool)
  border[1:7, 1:7] = False
  for b in range(2):
    for j in range(3):
      assert np.all(y[b, 0, j][border] == cpc.BACKGROUND)
      inner = y[b, 0, j, 1:7, 1:7, 0]
      windows = [x[b, 0, j, du:du + 6, dw:dw + 6, 0] for du in range(3) for dw in range(3)]
      assert any(np.array_equal(inner, w) for w in windows)
  small = jnp.ones((1, 1, 1, 7, 7, 1))
  np.testing.assert_array_equal(cpc.jitter_patches(jax.random.key(0), small), small)


def tiny(overrides=()):
  config = config_lib.override(config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:method=cpc,tiny'),
                               list(overrides))
  return run.prepare(config)


def test_a_grid_that_does_not_fit_the_images_is_a_config_error():
  with pytest.raises(ConfigError, match='objective_args.grid=9 on 8 x 8 images'):
    tiny(['objective_args.grid=9'])


def test_a_tiny_run_lowers_the_loss_on_one_batch():
  """Fitting one batch of digits (AdamW, 20 steps, a schedule as long as the run): the loss
  falls well below its start, with no NaN."""
  config, task, data = tiny(['train.steps=20', 'train.lr=3e-3', 'train.warmup_steps=0',
                             'train.batch_size=16'])
  setup = loop.setup(config, task)
  state = setup.init()
  batch = setup.global_batch(next(iter(data.make_train_iter())))
  losses = []
  for _ in range(20):
    state, metrics = setup.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
