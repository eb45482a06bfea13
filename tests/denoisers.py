"""Helpers shared by the denoiser tests (U-Net, DiT, residual MLP): fast compilation, init-like
params, random inputs and denoising batches, float64 NumPy oracles of the pieces the networks
share, and the checks every denoiser passes.

Compiling is most of these tests' time, so each test file shares one config and two jitted
functions: the forward pass in eval mode (`eval_forward`), and an Adam step on the denoising loss
in train mode (`adam_train_step`: dropout on, labels=None: all null, as classifier-free
guidance's unconditional branch). Dropout keys are 'rbg' keys: threefry's bit generation adds
seconds to the CPU compile. `jit` skips LLVM's optimisations, which halves the compile time of
these tiny programs.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lab.nn import param_spec as ps

ADAM = optax.adam(1e-2)

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def key(i):
  return jax.random.key(i, impl='rbg')


def eval_forward(model, cfg):
  """Jitted (params, x, noise_B, labels_B, rng) -> model.forward in eval mode."""
  return jit(lambda params, x, noise_B, labels_B, rng: model.forward(
      cfg, params, x, noise_B, labels_B, rng=rng, train=False))


def adam_train_step(model, cfg):
  """Jitted (params, opt_state, x_t, noise_B, eps, rng) -> (new params, new opt_state, loss,
  grads) of an ADAM step on the MSE loss of predicting eps, in train mode with null labels."""
  def step(params, opt_state, x_t, noise_B, eps, rng):
    loss_fn = lambda p: jnp.mean(
        (model.forward(cfg, p, x_t, noise_B, None, rng=rng, train=True) - eps) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = ADAM.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads
  return jit(step)


def draw_params(specs, seed, perturb):
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
  return jax.tree.map(draw, specs, is_leaf=ps.is_spec)


def inputs(seed, x_shape, num_classes):
  """(x ~ N(0, 1) of x_shape, noise_B ~ U(-2, 999), labels_B in [0, num_classes], null included),
  float32 / int32, B = x_shape[0]."""
  rng = np.random.default_rng(seed)
  B = x_shape[0]
  return (jnp.asarray(rng.standard_normal(x_shape), jnp.float32),
          jnp.asarray(rng.uniform(-2.0, 999.0, B), jnp.float32),
          jnp.asarray(rng.integers(0, num_classes + 1, B), jnp.int32))


def smooth_images(rng, n, size, channels):
  """x0_BXYC: n smooth size x size images of 1 to 3 channels, sin(phase), cos(phase),
  sin(2 phase), where phase = a x + y over [-1, 1]^2 with a ~ U(1.5, 4.5) per image."""
  grid = np.linspace(-1, 1, size)
  phase = 3 * rng.uniform(0.5, 1.5, (n, 1, 1, 1)) * grid[:, None, None] + grid[None, :, None]
  return np.concatenate([np.sin(phase), np.cos(phase), np.sin(2 * phase)][:channels], axis=-1)


def noised_batch(rng, x0, t_max):
  """[x_t, c_noise, eps] in float32: x_t = cos(t) x0 + sin(t) eps, eps ~ N(0, 1) and
  t ~ U(0, t_max) per example (drawn from rng in that order), c_noise = 1000 t."""
  eps = rng.standard_normal(x0.shape)
  t = rng.uniform(0.0, t_max, len(x0))
  t_B1 = t.reshape(-1, *[1] * (x0.ndim - 1))
  x_t = np.cos(t_B1) * x0 + np.sin(t_B1) * eps
  return [jnp.asarray(a, jnp.float32) for a in (x_t, 1000 * t, eps)]


# ---------------------------------------------------------------- float64 NumPy oracles


def silu(x):
  return x / (1.0 + np.exp(-x))


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


def np_self_attention(p, h_BTD):
  """Multi-head softmax self-attention with biases (Vaswani et al. 2017, eq. 1), no mask:
  projections wq/bq, wk/bk, wv/bv to heads and wo/bo back to D."""
  q, k, v = (np.einsum('btd,dnh->btnh', h_BTD, p[w]) + p[b] for w, b in
             (('wq', 'bq'), ('wk', 'bk'), ('wv', 'bv')))
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', prob, v)
  return np.einsum('btnh,nhd->btd', o, p['wo']) + p['bo']


# ---------------------------------------------------------------- checks every denoiser passes


def assert_matches_oracle(got, want, x):
  """got is float32 of x's shape and within 2e-4 (relative, and of want's largest magnitude) of
  the float64 oracle's want."""
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def assert_each_output_depends_on_noise_and_label(forward, params, x, noise_B, labels_B,
                                                  num_classes):
  """Shifting every noise level by 1, or every label to the next one (mod num_classes + 1),
  changes every example's output by more than 1e-3 somewhere."""
  y = forward(params, x, noise_B, labels_B, key(0))
  changed = lambda y2: np.abs(y2 - y).reshape(len(y), -1).max(axis=1)  # per example
  assert changed(forward(params, x, noise_B + 1.0, labels_B, key(0))).min() > 1e-3
  next_labels_B = (labels_B + 1) % (num_classes + 1)
  assert changed(forward(params, x, noise_B, next_labels_B, key(0))).min() > 1e-3


def assert_init_shapes(specs):
  """ps.init (traced) makes exactly the shapes and dtypes the specs declare."""
  shapes = jax.eval_shape(lambda k: ps.init(specs, k), jax.random.key(0))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
      jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), ps.shapes(specs))


def assert_bfloat16_in_bfloat16_out(model, cfg, x, noise_B, labels_B):
  """As the train step runs it (params cast to the compute dtype); traced, not compiled."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        ps.shapes(model.param_specs(cfg)))
  out = jax.eval_shape(functools.partial(model.forward, cfg), shapes, x.astype(jnp.bfloat16),
                       noise_B, labels_B)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16


def assert_dropout_only_when_training(forward, train_step, params, inputs, batch):
  """Eval mode ignores the key; the train-mode loss changes with it."""
  np.testing.assert_array_equal(forward(params, *inputs, key(1)), forward(params, *inputs, key(2)))
  state = ADAM.init(params)
  loss1 = train_step(params, state, *batch, key(1))[2]
  loss2 = train_step(params, state, *batch, key(2))[2]
  assert abs(float(loss1) - float(loss2)) > 1e-4 * float(loss1)


def assert_gradients_reach_every_parameter(train_step, params, batch):
  grads = train_step(params, ADAM.init(params), *batch, key(0))[3]
  dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not dead, f'parameters with zero gradient: {dead}'


def assert_adam_steps_halve_loss(train_step, params, batch, steps=30):
  """`steps` Adam steps on a fixed batch at least halve the loss of the initial network."""
  state, losses = ADAM.init(params), []
  for step in range(steps):
    params, state, loss, _ = train_step(params, state, *batch, key(step))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
