"""SimCLR (lab.objectives.simclr): loss_fn against a float64 NumPy re-derivation of NT-Xent
(eq. 1) over both views pushed through the encoder as one 2B batch (global BN, whose statistics
the state then holds), its gradient by finite differences, the projector layouts (v1 and the
SimCLR v2 BN variant), the LARS recipe, config errors and a tiny training run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.config import ConfigError
from lab.data import augment
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives import simclr
from test_moco import np_init, tiny_run, tiny_task


def np_nt_xent(z_2BD, tau):
  """SimCLR eq. 1: l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) with cosine
  similarities s, j = i's other view (rows b and B + b), averaged over all 2B views."""
  z = z_2BD / np.sqrt((z_2BD ** 2).sum(-1, keepdims=True))
  n = len(z)
  total = 0.0
  for i in range(n):
    j = (i + n // 2) % n
    logits = np.array([z[i] @ z[k] / tau for k in range(n) if k != i])
    pos = z[i] @ z[j] / tau
    m = logits.max()
    total += -(pos - m - np.log(np.exp(logits - m).sum()))
  return total / n


def project(config, spec, params, state, x_BXYC, train):
  """(g(f(x)) as float64 NumPy, new state) through lab's backbone and head."""
  h, enc = backbone.features(config.model, params['encoder'], state['encoder'], x_BXYC,
                             train=train)
  z, head = mlp_head.head(params['projector'], state['projector'], spec, h, train=train)
  return np.asarray(z, np.float64), {'encoder': enc, 'projector': head}


@pytest.mark.parametrize('projector', ['v1', 'v2'])
def test_loss_is_nt_xent_over_one_batch_of_both_views(projector, x64, monkeypatch):
  config, task = tiny_task('method=simclr,tiny', [f'objective_args.projector={projector}'])
  rng = np.random.default_rng(0)
  params = np_init(task.param_specs, rng, np.float64)
  state = task.init_state(jax.random.key(0))
  x = rng.uniform(-1, 1, (16, 8, 8, 1))
  monkeypatch.setattr(augment, 'simclr_views',
                      lambda key, x_XYC, size, strength, p_blur: (x_XYC, x_XYC[::-1]))
  loss, (metrics, new_state) = jax.jit(task.loss_fn, static_argnums=4)(
      params, state, {'image': jnp.asarray(x)}, None, True)
  spec = simclr.projector_layers(projector, backbone.feature_dim(config.model), 128)
  views_2B = np.concatenate([x, x[:, ::-1]])
  z, want_state = project(config, spec, params, state, views_2B, True)
  np.testing.assert_allclose(float(loss), np_nt_xent(z, 0.5), rtol=1e-10)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state, want_state)
  assert 0.0 <= float(metrics['accuracy']) <= 1.0
  # Per-view batch norm (each view its own batch) is a different loss: the test tells them apart.
  z1, _ = project(config, spec, params, state, x, True)
  z2, _ = project(config, spec, params, state, x[:, ::-1], True)
  assert abs(np_nt_xent(np.concatenate([z1, z2]), 0.5) - float(loss)) > 1e-4


def test_loss_gradient_matches_finite_differences(x64):
  """d loss / d params of the whole loss_fn (augmentation from a fixed key, BN in train mode),
  reverse mode against central differences along random directions."""
  _, task = tiny_task('method=simclr,tiny', ['objective_args.projector=v2'])
  rng = np.random.default_rng(1)
  params = np_init(task.param_specs, rng, np.float64)
  state = task.init_state(jax.random.key(0))
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (16, 8, 8, 1)))}
  loss = jax.jit(lambda p: task.loss_fn(p, state, batch, jax.random.key(2), True)[0])
  check_grads(loss, (params,), order=1, modes=('rev',), eps=1e-6, atol=1e-6, rtol=1e-6)


def test_projector_layouts_and_recipe():
  v1 = simclr.projector_layers('v1', 64, 128)
  assert [(l.width, l.bias, l.bn, l.act) for l in v1] == [(64, True, False, 'relu'),
                                                          (128, True, False, None)]
  v2 = simclr.projector_layers('v2', 64, 128)
  assert [(l.width, l.bn, l.act) for l in v2] == [(64, True, 'relu'), (64, True, 'relu'),
                                                  (128, True, None)]
  train = simclr.experiment_defaults('simclr')['train']
  assert train['optimizer'] == 'lars' and train['lr'] == pytest.approx(0.3 * 128 / 256)
  assert train['weight_decay'] == 1e-6 and train['schedule'] == 'cosine'


@pytest.mark.parametrize('override, match', [
    ('objective_args.projector=v3', "projector='v3'"),
    ('objective_args.p_blur=1.5', 'p_blur=1.5; expected a probability'),
    ('objective_args.temperature=-0.1', 'temperature=-0.1; expected > 0'),
])
def test_config_errors(override, match):
  with pytest.raises(ConfigError, match=match):
    tiny_task('method=simclr,tiny', [override])


def test_tiny_run_learns():
  """Digits, a width-16 ResNet, AdamW at 3e-3 (LARS's trust ratio moves the weights too little in
  150 steps to show): NT-Xent falls from chance, log(2B - 1), with no NaN."""
  losses = tiny_run('method=simclr,tiny', ['train.optimizer=adamw', 'train.lr=3e-3',
                                           'train.weight_decay=0.0', 'train.batch_size=32',
                                           'train.warmup_steps=10', 'model.width=16'], 150)
  assert np.isfinite(losses).all()
  first, last = losses[:30].mean(), losses[-30:].mean()
  assert first > np.log(63) - 0.2 and last < first - 0.2, (first, last)
