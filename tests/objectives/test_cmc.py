"""CMC (lab.objectives.cmc): the spatial view split, the symmetric two-view loss (eqs. 2-3)
against float64 NumPy, two separate encoders (each view's gradient reaches only its own), the
concatenated features, config errors, and a tiny run that lowers the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.models import backbone
from lab.objectives import cmc
from lab.train import loop


def test_split_views_are_the_top_and_bottom_halves():
  x = jnp.arange(2 * 7 * 3 * 1, dtype=jnp.float32).reshape(2, 7, 3, 1)
  top, bottom = cmc.split_views(x)
  np.testing.assert_array_equal(top, x[:, :3])
  np.testing.assert_array_equal(bottom, x[:, 4:])
  with pytest.raises(ValueError, match=r'images of shape \(2, 1, 3, 1\)'):
    cmc.split_views(x[:, :1])


def np_contrast(a, b, tau):
  """-1/B sum_i log [exp(a_i . b_i / tau) / sum_j exp(a_i . b_j / tau)], float64."""
  logits = a @ b.T / tau
  m = logits.max(1, keepdims=True)
  log_z = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
  return np.mean(log_z - np.diag(logits))


def test_loss_is_the_sum_of_both_directions_of_eq_2():
  rng = np.random.default_rng(0)
  norm = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  z1, z2 = norm(rng.normal(size=(6, 4))), norm(rng.normal(size=(6, 4)))
  loss, metrics = cmc.cmc_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.2)
  np.testing.assert_allclose(float(loss), np_contrast(z1, z2, 0.2) + np_contrast(z2, z1, 0.2),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics['accuracy_12']),
                             np.mean((z1 @ z2.T).argmax(1) == np.arange(6)))


def tiny(overrides=()):
  config = config_lib.override(config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:method=cmc,tiny'),
                               list(overrides))
  return run.prepare(config)


def test_each_view_has_its_own_encoder_and_features_concatenate_both():
  """features = [f_1(top); f_2(bottom)]: changing the bottom rows moves only the second half, and
  the first half is the top encoder alone on the top rows."""
  config, task, data = tiny()
  state = loop.setup(config, task).init()
  x = jnp.asarray(next(iter(data.make_train_iter()))['image'])
  z = task.features(state.params, state.model_state, x)
  d = backbone.feature_dim(config.model)
  assert z.shape == (x.shape[0], 2 * d)
  z_moved = task.features(state.params, state.model_state, x.at[:, 4:].multiply(-1.0))
  np.testing.assert_array_equal(z_moved[:, :d], z[:, :d])
  assert not np.allclose(z_moved[:, d:], z[:, d:], atol=1e-4)
  top_only, _ = backbone.features(config.model, state.params['top']['encoder'],
                                  state.model_state['top'], x[:, :4], train=False)
  np.testing.assert_allclose(z[:, :d], top_only, rtol=1e-5, atol=1e-6)
  bottom_with_top_encoder, _ = backbone.features(config.model, state.params['top']['encoder'],
                                                 state.model_state['top'], x[:, 4:], train=False)
  assert not np.allclose(z[:, d:], bottom_with_top_encoder, atol=1e-4)


def test_config_errors_name_the_value():
  with pytest.raises(ConfigError, match='objective_args.temperature=0.0; expected > 0'):
    tiny(['objective_args.temperature=0.0'])
  with pytest.raises(ConfigError, match="model.name='vit'; CMC encodes half images"):
    run.prepare(config_lib.load(f'{REPO_ROOT}/experiments/ssl.py:method=cmc,tiny,encoder=vit'))


def test_a_tiny_run_lowers_the_loss_on_one_batch():
  """One batch of digits, fresh crops every step (so the loss is noisy), a width-16 encoder:
  after 20 AdamW steps the loss is well below its start, with no NaN."""
  config, task, data = tiny(['train.steps=20', 'train.lr=1e-2', 'train.warmup_steps=0',
                             'model.width=16'])
  setup = loop.setup(config, task)
  state = setup.init()
  batch = setup.global_batch(next(iter(data.make_train_iter())))
  losses = []
  for _ in range(20):
    state, metrics = setup.train_step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
