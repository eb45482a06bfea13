"""The classification objective: cross-entropy and accuracy against float64 NumPy (values and
gradients), the zero-initialised classifier's start at log V, the loss of a drawn ViT backbone
against NumPy on its features, and config errors. A real run of it is the first stage of the
LiT test in test_contrastive_task.py."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from jax.test_util import check_grads

from lab import config as config_lib
from lab import run as run_lib
from lab.config import ConfigError
from lab.models import vit
from lab.nn import param_spec as ps
from lab.objectives import classify


def np_cross_entropy(logits_BV, labels_B):
  z = logits_BV - logits_BV.max(1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
  return -np.mean(log_p[np.arange(len(labels_B)), labels_B])


def test_cross_entropy_matches_numpy(x64):
  rng = np.random.default_rng(0)
  logits, labels = 3 * rng.standard_normal((6, 5)), rng.integers(0, 5, 6)
  loss, acc = classify.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, np_cross_entropy(logits, labels), rtol=1e-12)
  assert acc == np.mean(logits.argmax(1) == labels)
  check_grads(lambda z: classify.cross_entropy(z, jnp.asarray(labels))[0], (logits,), order=1,
              modes=['rev'])


def prepared(*overrides):
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/vit_digits.py:tiny')),
      ['model.attention_backend=reference', *overrides])
  return run_lib.prepare(config)


def test_loss_fn_on_a_drawn_backbone():
  config, task, data = prepared()
  batch = data.eval_batches[0]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32),
                        task.param_specs, is_leaf=ps.is_spec)
  loss_fn = jax.jit(functools.partial(task.loss_fn, train=False),
                    compiler_options={'xla_backend_optimization_level': 0})
  start = jax.tree.map(jnp.zeros_like, params['head'])  # the classifier's initialisation
  value, (metrics, state) = loss_fn(dict(params, head=start), {}, batch, None)
  np.testing.assert_allclose(value, np.log(10), rtol=1e-6)
  assert state == {} and metrics['accuracy'] == np.mean(batch['label'] == 0)
  z = np.asarray(vit.forward(config.model, params['backbone'], batch['image']), np.float64)
  logits = z @ np.float64(params['head']['w']) + np.float64(params['head']['b'])
  value, (metrics, _) = loss_fn(params, {}, batch, None)
  np.testing.assert_allclose(value, np_cross_entropy(logits, batch['label']), rtol=1e-5)
  assert metrics['accuracy'] == pytest.approx(np.mean(logits.argmax(1) == batch['label']))


def test_config_errors():
  with pytest.raises(ConfigError, match='model.num_classes=10; a backbone returns pooled'):
    prepared('model.num_classes=10')
  with pytest.raises(ConfigError, match='objective_args.num_classes=1; expected at least 2'):
    prepared('objective_args.num_classes=1')
