"""The residual-MLP denoiser: a float64 NumPy oracle of the whole forward pass, zero output at
init, conditioning, errors, gradients to every parameter, and a few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import denoisers
from denoisers import jit, key, np_condition, silu
from lab.config import ConfigError
from lab.models import mlp_denoiser

B = 6


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(channels=2, width=16, depth=2, num_classes=3,
                                        dropout=0.2, noise_max_period=1000.0) | overrides)


# One config and two jitted functions shared by the tests (tests/denoisers.py says why).
CFG = make_cfg()
forward = denoisers.eval_forward(mlp_denoiser, CFG)
train_step = denoisers.adam_train_step(mlp_denoiser, CFG)


def draw_params(cfg, seed, perturb):
  return denoisers.draw_params(mlp_denoiser.param_specs(cfg), seed, perturb)


def inputs(seed, cfg):
  return denoisers.inputs(seed, (B, cfg.channels), cfg.num_classes)


# ---------------------------------------------------------------- float64 NumPy oracle


def np_layer_norm(x, scale, bias, eps=1e-5):
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def np_forward(cfg, params, x_BC, noise_B, labels_B):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  c = np_condition(p['cond'], np.asarray(noise_B, np.float64), labels_B, cfg.noise_max_period)
  h = np.asarray(x_BC, np.float64) @ p['w_in'] + p['b_in']
  for i in range(cfg.depth):
    q = jax.tree.map(lambda a: a[i], p['blocks'])
    u = np_layer_norm(h, q['norm_scale'], q['norm_bias'])
    h = h + silu(u @ q['w1'] + q['b1'] + silu(c) @ q['we'] + q['be']) @ q['w2'] + q['b2']
  return np_layer_norm(h, p['out_norm_scale'], p['out_norm_bias']) @ p['w_out'] + p['b_out']


@pytest.mark.parametrize('num_classes', [0, 3])
def test_forward_matches_numpy_oracle(num_classes):
  cfg = make_cfg(num_classes=num_classes)
  params = draw_params(cfg, 0, perturb=True)
  x_BC, noise_B, labels_B = inputs(1, cfg)
  if num_classes:
    got = forward(params, x_BC, noise_B, labels_B, key(0))
  else:
    labels_B = None
    got = jit(functools.partial(mlp_denoiser.forward, cfg))(params, x_BC, noise_B)
  want = np_forward(cfg, params, x_BC, noise_B,
                    None if labels_B is None else np.asarray(labels_B))
  denoisers.assert_matches_oracle(got, want, x_BC)


def test_zero_output_at_init_and_init_shapes():
  denoisers.assert_init_shapes(mlp_denoiser.param_specs(CFG))
  x_BC, noise_B, labels_B = inputs(2, CFG)
  params = draw_params(CFG, 1, perturb=False)
  np.testing.assert_array_equal(forward(params, x_BC, noise_B, labels_B, key(0)), 0.0)


def test_bfloat16_params_and_inputs_give_bfloat16():
  denoisers.assert_bfloat16_in_bfloat16_out(mlp_denoiser, CFG, *inputs(0, CFG))


def test_output_depends_on_noise_and_labels_and_none_is_null():
  params = draw_params(CFG, 3, perturb=True)
  x_BC, noise_B, labels_B = inputs(4, CFG)
  y = forward(params, x_BC, noise_B, labels_B, key(0))
  assert np.abs(forward(params, x_BC, noise_B + 1.0, labels_B, key(0)) - y).min() > 1e-4
  assert np.abs(forward(params, x_BC, noise_B, (labels_B + 1) % 4, key(0)) - y).min() > 1e-4
  np.testing.assert_array_equal(forward(params, x_BC, noise_B, None, key(0)),
                                forward(params, x_BC, noise_B, jnp.full(B, 3, jnp.int32), key(0)))


def test_bad_inputs_raise():
  cfg = make_cfg(num_classes=0)
  params = draw_params(cfg, 5, perturb=False)
  x_BC, noise_B, labels_B = inputs(6, CFG)
  with pytest.raises(ValueError, match='num_classes=0'):
    mlp_denoiser.forward(cfg, params, x_BC, noise_B, labels_B)
  with pytest.raises(ValueError, match=r'expected \[batch, 2\]'):
    mlp_denoiser.forward(cfg, params, jnp.zeros((B, 3)), noise_B)
  with pytest.raises(ValueError, match='noise has shape'):
    mlp_denoiser.forward(cfg, params, x_BC, noise_B[:2])


@pytest.mark.parametrize('field,value', [('width', 15), ('depth', 0), ('channels', 0),
                                         ('dropout', 1.0), ('num_classes', -1),
                                         ('noise_max_period', 0.0)])
def test_bad_config_raises(field, value):
  with pytest.raises(ConfigError, match=f'model.{field}={value}'):
    mlp_denoiser.validate(make_cfg(**{field: value}))


def denoising_batch(seed, n=64):
  """Noised 2-D points x0 from a stretched Gaussian (denoisers.noised_batch, t < 1)."""
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((n, 2)) * [1.0, 0.2] + [2.0, -1.0]
  return denoisers.noised_batch(rng, x0, 1.0)


def test_dropout_only_when_training():
  denoisers.assert_dropout_only_when_training(forward, train_step, draw_params(CFG, 7, True),
                                              inputs(8, CFG), denoising_batch(9))


def test_gradients_reach_every_parameter():
  denoisers.assert_gradients_reach_every_parameter(train_step, draw_params(CFG, 10, True),
                                                   denoising_batch(11))


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps at least halve the loss of the zero-output initial network."""
  denoisers.assert_adam_steps_halve_loss(train_step, draw_params(CFG, 12, False),
                                         denoising_batch(13))
