"""The residual-MLP denoiser: a float64 NumPy oracle of the whole forward pass, zero output at
init, conditioning, errors, gradients to every parameter, and a few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lab.config import ConfigError
from lab.models import mlp_denoiser
from lab.nn import param_spec as ps

B = 6


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(channels=2, width=16, depth=2, num_classes=3,
                                        dropout=0.2, noise_max_period=1000.0) | overrides)


# Compiling is most of these tests' time, so they share one config and two jitted functions:
# the forward pass in eval mode, and an Adam step on the denoising loss in train mode (dropout on,
# labels=None: all null, as classifier-free guidance's unconditional branch). Dropout keys are
# 'rbg' keys: threefry's bit generation adds seconds to the CPU compile. `jit` skips LLVM's
# optimisations, which halves the compile time of these tiny programs.
CFG = make_cfg()
ADAM = optax.adam(1e-2)


jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def key(i):
  return jax.random.key(i, impl='rbg')


@jit
def forward(params, x, noise_B, labels_B, rng):
  return mlp_denoiser.forward(CFG, params, x, noise_B, labels_B, rng=rng, train=False)


@jit
def train_step(params, opt_state, x_t, noise_B, eps, rng):
  """-> (new params, new opt_state, loss, grads) for the MSE loss of predicting eps."""
  loss_fn = lambda p: jnp.mean(
      (mlp_denoiser.forward(CFG, p, x_t, noise_B, None, rng=rng, train=True) - eps) ** 2)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = ADAM.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, grads


def draw_params(cfg, seed, perturb):
  """Init-like params without compiling ps.init (slow on CPU with many leaves): each spec's
  initializer is probed on a tiny shape; a constant one (zeros, ones) fills its leaf with that
  constant (plus N(0, 0.3^2) when perturb), any other leaf gets N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  def draw(s):
    probe = np.asarray(s.init(key(0), (1, 4) if s.axes[0] == 'layers' else (4,),
                              jnp.float32))
    value = 0.3 * rng.standard_normal(s.shape)
    if np.all(probe == probe.flat[0]):
      value = probe.flat[0] + (value if perturb else np.zeros(s.shape))
    return jnp.asarray(value, jnp.float32)
  return jax.tree.map(draw, mlp_denoiser.param_specs(cfg), is_leaf=ps.is_spec)


def inputs(seed, cfg):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((B, cfg.channels)), jnp.float32),
          jnp.asarray(rng.uniform(-2.0, 999.0, B), jnp.float32),
          jnp.asarray(rng.integers(0, cfg.num_classes + 1, B), jnp.int32))


# ---------------------------------------------------------------- float64 NumPy oracle


def silu(x):
  return x / (1.0 + np.exp(-x))


def np_layer_norm(x, scale, bias, eps=1e-5):
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def np_condition(p, noise_B, labels_B, max_period):
  """MLP of [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/h), plus the label row (null: last)."""
  h = p['noise']['w1'].shape[0] // 2
  args = noise_B[:, None] * max_period ** (-np.arange(h) / h)
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  c = silu(emb @ p['noise']['w1'] + p['noise']['b1']) @ p['noise']['w2'] + p['noise']['b2']
  if 'labels' in p:
    table = p['labels']
    c = c + table[np.full(len(noise_B), len(table) - 1) if labels_B is None else labels_B]
  return c


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
  assert got.shape == x_BC.shape and got.dtype == jnp.float32
  want = np_forward(cfg, params, x_BC, noise_B,
                    None if labels_B is None else np.asarray(labels_B))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_zero_output_at_init_and_init_shapes():
  specs = mlp_denoiser.param_specs(CFG)
  shapes = jax.eval_shape(lambda k: ps.init(specs, k), jax.random.key(0))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
      jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), ps.shapes(specs))
  x_BC, noise_B, labels_B = inputs(2, CFG)
  params = draw_params(CFG, 1, perturb=False)
  np.testing.assert_array_equal(forward(params, x_BC, noise_B, labels_B, key(0)), 0.0)


def test_bfloat16_params_and_inputs_give_bfloat16():
  """As the train step runs it (params cast to the compute dtype); traced, not compiled."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        ps.shapes(mlp_denoiser.param_specs(CFG)))
  x, noise_B, labels_B = inputs(0, CFG)
  out = jax.eval_shape(functools.partial(mlp_denoiser.forward, CFG), shapes, x.astype(jnp.bfloat16),
                       noise_B, labels_B)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16


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
  """x_t = cos(t) x0 + sin(t) eps for 2-D points x0 from a stretched Gaussian; c_noise = 1000 t."""
  rng = np.random.default_rng(seed)
  x0 = rng.standard_normal((n, 2)) * [1.0, 0.2] + [2.0, -1.0]
  eps = rng.standard_normal((n, 2))
  t = rng.uniform(0.0, 1.0, n)
  x_t = np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * eps
  return [jnp.asarray(a, jnp.float32) for a in (x_t, 1000 * t, eps)]


def test_dropout_only_when_training():
  params = draw_params(CFG, 7, perturb=True)
  x_BC, noise_B, labels_B = inputs(8, CFG)
  np.testing.assert_array_equal(forward(params, x_BC, noise_B, labels_B, key(1)),
                                forward(params, x_BC, noise_B, labels_B, key(2)))
  batch, state = denoising_batch(9), ADAM.init(params)
  loss1 = train_step(params, state, *batch, key(1))[2]
  loss2 = train_step(params, state, *batch, key(2))[2]
  assert abs(float(loss1) - float(loss2)) > 1e-4 * float(loss1)


def test_gradients_reach_every_parameter():
  params = draw_params(CFG, 10, perturb=True)
  grads = train_step(params, ADAM.init(params), *denoising_batch(11), key(0))[3]
  dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not dead, f'parameters with zero gradient: {dead}'


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps on a fixed batch at least halve the loss of the zero-output initial network."""
  params = draw_params(CFG, 12, perturb=False)
  batch, state = denoising_batch(13), ADAM.init(params)
  losses = []
  for step in range(30):
    params, state, loss, _ = train_step(params, state, *batch, key(step))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
