"""DiT: a float64 NumPy oracle of the whole forward pass, patchify layout, the 2-D sin-cos
positions against diffusers, adaLN-Zero identity at init, conditioning, errors, gradients to every
parameter, and a few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lab.config import ConfigError
from lab.models import dit
from lab.nn import param_spec as ps

B = 3


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=8, channels=3, patch_size=2, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0,
      num_classes=5, dropout=0.2, attention_backend='reference', noise_max_period=1000.0)
      | overrides)


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
  return dit.forward(CFG, params, x, noise_B, labels_B, rng=rng, train=False)


@jit
def train_step(params, opt_state, x_t, noise_B, eps, rng):
  """-> (new params, new opt_state, loss, grads) for the MSE loss of predicting eps."""
  loss_fn = lambda p: jnp.mean(
      (dit.forward(CFG, p, x_t, noise_B, None, rng=rng, train=True) - eps) ** 2)
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
  return jax.tree.map(draw, dit.param_specs(cfg), is_leaf=ps.is_spec)


def inputs(seed, cfg):
  rng = np.random.default_rng(seed)
  S = cfg.image_size
  return (jnp.asarray(rng.standard_normal((B, S, S, cfg.channels)), jnp.float32),
          jnp.asarray(rng.uniform(-2.0, 999.0, B), jnp.float32),
          jnp.asarray(rng.integers(0, cfg.num_classes + 1, B), jnp.int32))


# ---------------------------------------------------------------- float64 NumPy oracle


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


def np_patchify(x_BXYC, p):
  """Patch (i, j) -> row i * (Y/p) + j holding x[i p:(i+1) p, j p:(j+1) p, :] in row-major order."""
  B, X, Y, _ = x_BXYC.shape
  return np.stack([x_BXYC[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(B, -1)
                   for i in range(X // p) for j in range(Y // p)], axis=1)


def np_unpatchify(x_BPC, p, X, Y):
  B = x_BPC.shape[0]
  out = np.zeros((B, X, Y, x_BPC.shape[-1] // (p * p)))
  for i in range(X // p):
    for j in range(Y // p):
      out[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = x_BPC[:, i * (Y // p) + j].reshape(B, p, p,
                                                                                      -1)
  return out


def np_pos_embed(gx, gy, d):
  """MAE / DiT: patch (i, j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 1e4^(-4k/d)."""
  w = 10_000.0 ** (-np.arange(d // 4) / (d / 4))
  return np.stack([np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
                   for i in range(gx) for j in range(gy)])


def np_modulate(x, shift, scale):
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + scale[:, None]) + \
      shift[:, None]


def np_block(q, x, c, n_heads):
  """Peebles & Xie 2023, fig. 3: adaLN-Zero block, softmax attention, GELU (tanh) MLP."""
  D = x.shape[-1]
  b1, s1, a1, b2, s2, a2 = np.split(silu(c) @ q['ada_w'] + q['ada_b'], 6, axis=-1)
  h = np_modulate(x, b1, s1)
  a = q['attn']
  qh, kh, vh = (np.einsum('btd,dnh->btnh', h, a[w]) + a[b] for w, b in
                (('wq', 'bq'), ('wk', 'bk'), ('wv', 'bv')))
  s = np.einsum('btnh,bsnh->bnts', qh, kh) / np.sqrt(D // n_heads)
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', prob, vh)
  x = x + a1[:, None] * (np.einsum('btnh,nhd->btd', o, a['wo']) + a['bo'])
  m = q['mlp']
  u = np_modulate(x, b2, s2) @ m['w_in'] + m['b_in']
  u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  return x + a2[:, None] * (u @ m['w_out'] + m['b_out'])


def np_forward(cfg, params, x_BXYC, noise_B, labels_B):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  P, S = cfg.patch_size, cfg.image_size
  c = np_condition(p['cond'], np.asarray(noise_B, np.float64), labels_B, cfg.noise_max_period)
  x = np_patchify(np.asarray(x_BXYC, np.float64), P) @ p['patch_w'] + p['patch_b']
  x = x + np_pos_embed(S // P, S // P, cfg.d_model)
  for i in range(cfg.n_layers):
    x = np_block(jax.tree.map(lambda a: a[i], p['blocks']), x, c, cfg.n_heads)
  f = p['final']
  shift, scale = np.split(silu(c) @ f['ada_w'] + f['ada_b'], 2, axis=-1)
  return np_unpatchify(np_modulate(x, shift, scale) @ f['w'] + f['b'], P, S, S)


def test_forward_matches_numpy_oracle():
  params = draw_params(CFG, 0, perturb=True)
  x, noise_B, labels_B = inputs(1, CFG)
  got = forward(params, x, noise_B, labels_B, key(0))
  assert got.shape == x.shape and got.dtype == jnp.float32
  want = np_forward(CFG, params, x, noise_B, np.asarray(labels_B))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_patchify_layout_and_inverse():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
  patches = dit.patchify(jnp.asarray(x), 2)
  np.testing.assert_array_equal(patches, np_patchify(x, 2))
  np.testing.assert_array_equal(dit.unpatchify(patches, 2, 6, 4), x)
  y = rng.standard_normal((2, 6, 12)).astype(np.float32)
  np.testing.assert_array_equal(dit.patchify(dit.unpatchify(jnp.asarray(y), 2, 6, 4), 2), y)
  np.testing.assert_array_equal(dit.unpatchify(jnp.asarray(y), 2, 6, 4), np_unpatchify(y, 2, 6, 4))


def test_pos_embed_matches_diffusers_and_formula():
  torch = pytest.importorskip('torch')
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  want = get_2d_sincos_pos_embed(32, 5, base_size=5, output_type='pt')
  np.testing.assert_allclose(dit.pos_embed(5, 5, 32), torch.as_tensor(want).numpy(), atol=1e-6)
  np.testing.assert_allclose(dit.pos_embed(3, 4, 8), np_pos_embed(3, 4, 8), atol=1e-6)


def test_blocks_are_identity_and_output_zero_at_init():
  params = draw_params(CFG, 3, perturb=False)
  x, noise_B, labels_B = inputs(4, CFG)
  x_BTD = jnp.asarray(np.random.default_rng(5).standard_normal((B, 16, 16)), jnp.float32)
  c_BD = jnp.asarray(np.random.default_rng(6).standard_normal((B, 16)), jnp.float32)
  block0 = jax.tree.map(lambda a: a[0], params['blocks'])
  np.testing.assert_array_equal(jit(functools.partial(dit.block, CFG))(block0, x_BTD, c_BD),
                                x_BTD)
  np.testing.assert_array_equal(forward(params, x, noise_B, labels_B, key(0)), 0.0)


def test_init_shapes():
  specs = dit.param_specs(CFG)
  shapes = jax.eval_shape(lambda k: ps.init(specs, k), jax.random.key(0))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
      jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), ps.shapes(specs))


def test_bfloat16_params_and_inputs_give_bfloat16():
  """As the train step runs it (params cast to the compute dtype); traced, not compiled."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        ps.shapes(dit.param_specs(CFG)))
  x, noise_B, labels_B = inputs(0, CFG)
  out = jax.eval_shape(functools.partial(dit.forward, CFG), shapes, x.astype(jnp.bfloat16),
                       noise_B, labels_B)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16


def test_output_depends_on_noise_and_labels():
  params = draw_params(CFG, 7, perturb=True)
  x, noise_B, labels_B = inputs(8, CFG)
  y = forward(params, x, noise_B, labels_B, key(0))
  changed = lambda y2: np.abs(y2 - y).reshape(B, -1).max(axis=1)  # per example
  assert changed(forward(params, x, noise_B + 1.0, labels_B, key(0))).min() > 1e-3
  assert changed(forward(params, x, noise_B, (labels_B + 1) % 6, key(0))).min() > 1e-3


def test_bad_inputs_raise():
  cfg = make_cfg(num_classes=0)
  params = draw_params(cfg, 9, perturb=False)
  x, noise_B, labels_B = inputs(10, make_cfg())
  with pytest.raises(ValueError, match='num_classes=0'):
    dit.forward(cfg, params, x, noise_B, labels_B)
  with pytest.raises(ValueError, match=r'expected \[batch, 8, 8, 3\]'):
    dit.forward(cfg, params, jnp.zeros((B, 10, 10, 3)), noise_B)
  with pytest.raises(ValueError, match='noise has shape'):
    dit.forward(cfg, params, x, noise_B[:, None])


@pytest.mark.parametrize('overrides,match', [
    (dict(patch_size=3), 'patch_size=3 does not divide model.image_size=8'),
    (dict(n_heads=3), 'n_heads=3 does not divide model.d_model=16'),
    (dict(d_model=18, n_heads=1), 'd_model=18; expected a multiple of 4'),
    (dict(n_layers=0), 'n_layers=0'),
    (dict(attention_backend='flash'), "attention_backend='flash'"),
    (dict(dropout=-0.1), 'dropout=-0.1'),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    dit.validate(make_cfg(**overrides))


def denoising_batch(seed, n=16):
  """x_t = cos(t) x0 + sin(t) eps for smooth three-channel 8x8 images x0; c_noise = 1000 t."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(-1, 1, 8)
  phase = 3 * rng.uniform(0.5, 1.5, (n, 1, 1, 1)) * grid[:, None, None] + grid[None, :, None]
  x0 = np.concatenate([np.sin(phase), np.cos(phase), np.sin(2 * phase)], axis=-1)
  eps = rng.standard_normal((n, 8, 8, 3))
  t = rng.uniform(0.0, 1.5, n)
  x_t = np.cos(t)[:, None, None, None] * x0 + np.sin(t)[:, None, None, None] * eps
  return [jnp.asarray(a, jnp.float32) for a in (x_t, 1000 * t, eps)]


def test_dropout_only_when_training():
  params = draw_params(CFG, 11, perturb=True)
  x, noise_B, labels_B = inputs(12, CFG)
  np.testing.assert_array_equal(forward(params, x, noise_B, labels_B, key(1)),
                                forward(params, x, noise_B, labels_B, key(2)))
  batch, state = denoising_batch(13), ADAM.init(params)
  loss1 = train_step(params, state, *batch, key(1))[2]
  loss2 = train_step(params, state, *batch, key(2))[2]
  assert abs(float(loss1) - float(loss2)) > 1e-4 * float(loss1)


def test_gradients_reach_every_parameter():
  params = draw_params(CFG, 14, perturb=True)
  grads = train_step(params, ADAM.init(params), *denoising_batch(15), key(0))[3]
  dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not dead, f'parameters with zero gradient: {dead}'


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps on a fixed batch at least halve the loss of the zero-output initial network."""
  params = draw_params(CFG, 16, perturb=False)
  batch, state = denoising_batch(17), ADAM.init(params)
  losses = []
  for step in range(30):
    params, state, loss, _ = train_step(params, state, *batch, key(step))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
