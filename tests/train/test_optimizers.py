"""Schedules against their formulas; weight decay only on matrices."""
import math

import ml_collections
import numpy as np
import pytest

from lab.config import ConfigError
from lab.train import optimizers


def _cfg(**kw):
  base = dict(steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule='cosine',
              decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.99, eps=1e-8,
              weight_decay=0.1, clip_norm=1.0)
  return ml_collections.ConfigDict(base | kw)


def test_cosine_is_nanogpt_schedule():
  f = optimizers.schedule(_cfg())
  for step in [0, 1, 50, 99, 100, 101, 400, 999, 1000, 1500]:
    if step < 100:
      want = 1e-3 * step / 100
    elif step <= 1000:
      ratio = (step - 100) / 900
      want = 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)
    else:
      want = 1e-4
    assert float(f(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


def test_wsd_warms_holds_and_decays():
  f = optimizers.schedule(_cfg(schedule='wsd'))
  assert float(f(50)) == pytest.approx(5e-4)
  assert float(f(500)) == pytest.approx(1e-3) and float(f(800)) == pytest.approx(1e-3)
  assert float(f(900)) == pytest.approx(1e-3 - 0.5 * (1e-3 - 1e-4), rel=1e-5)
  assert float(f(1000)) == pytest.approx(1e-4, rel=1e-5)
  with pytest.raises(ConfigError, match='wsd_decay_fraction'):
    optimizers.schedule(_cfg(schedule='wsd', wsd_decay_fraction=0.95))


def test_weight_decay_skips_vectors():
  import jax.numpy as jnp
  opt = optimizers.make(_cfg(lr=1.0, warmup_steps=0, schedule='constant', weight_decay=0.5,
                             clip_norm=0.0))
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,))}
  zeros = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros((2,))}
  updates, _ = opt.update(zeros, opt.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.5 * np.ones((2, 2)))
  np.testing.assert_allclose(updates['b'], np.zeros(2))


def test_lars_first_step_is_the_trust_ratio_formula():
  """LARS (You et al. 2017, eq. 6 with decay): update = -lr eta ||w|| / ||g + wd w|| (g + wd w)
  for matrices; vectors (biases, norm scales) get neither decay nor trust ratio (SimCLR)."""
  import jax.numpy as jnp
  opt = optimizers.make(_cfg(lr=0.5, warmup_steps=0, schedule='constant', weight_decay=0.1,
                             clip_norm=0.0, optimizer='lars'))
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((3, 4))), 'b': jnp.asarray(rng.standard_normal(4))}
  grads = {'w': jnp.asarray(rng.standard_normal((3, 4))), 'b': jnp.asarray(rng.standard_normal(4))}
  updates, _ = opt.update(grads, opt.init(params), params)
  w, g = np.asarray(params['w'], np.float64), np.asarray(grads['w'], np.float64)
  d = g + 0.1 * w
  np.testing.assert_allclose(updates['w'], -0.5 * 1e-3 * np.linalg.norm(w) / np.linalg.norm(d) * d,
                             rtol=1e-5)
  np.testing.assert_allclose(updates['b'], -0.5 * np.asarray(grads['b']), rtol=1e-6)
  with pytest.raises(ConfigError, match="optimizer='adam'"):
    optimizers.make(_cfg(optimizer='adam'))
