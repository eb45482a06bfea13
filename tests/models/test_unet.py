"""The ADM U-Net: a float64 NumPy oracle of the whole forward pass that builds the network the way
ADM's code does, attention through the Pallas kernel (interpret) against the reference, zero
output at init, conditioning, image-size and config errors, gradients to every parameter, and a
few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lab.config import ConfigError
from lab.models import unet
from lab.nn import param_spec as ps

B = 3


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=8, channels=2, base_channels=8, channel_mults=(1, 2), blocks_per_level=1,
      attention_resolutions=(4,), heads=2, norm_groups=4, num_classes=3, dropout=0.2,
      attention_backend='reference', noise_max_period=1000.0) | overrides)


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
  return unet.forward(CFG, params, x, noise_B, labels_B, rng=rng, train=False)


@jit
def train_step(params, opt_state, x_t, noise_B, eps, rng):
  """-> (new params, new opt_state, loss, grads) for the MSE loss of predicting eps."""
  loss_fn = lambda p: jnp.mean(
      (unet.forward(CFG, p, x_t, noise_B, None, rng=rng, train=True) - eps) ** 2)
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
  return jax.tree.map(draw, unet.param_specs(cfg), is_leaf=ps.is_spec)


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


def np_conv(p, x, stride=1):
  """Cross-correlation with zero padding k // 2 (PyTorch's Conv2d(padding=k//2)), then stride."""
  k, X, Y = p['w'].shape[0], x.shape[1], x.shape[2]
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  y = sum(xp[:, i:i + X, j:j + Y] @ p['w'][i, j] for i in range(k) for j in range(k))
  return (y + p['b'])[:, ::stride, ::stride]


def np_gn(p, x, groups, eps=1e-5):
  g = x.reshape(*x.shape[:3], groups, -1)
  mu, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
  return ((g - mu) / np.sqrt(var + eps)).reshape(x.shape) * p['scale'] + p['bias']


def np_res(p, x, c, groups):
  h = np_conv(p['conv1'], silu(np_gn(p['norm1'], x, groups)))
  scale, shift = np.split(silu(c) @ p['emb_w'] + p['emb_b'], 2, axis=-1)
  h = np_gn(p['norm2'], h, groups) * (1 + scale[:, None, None]) + shift[:, None, None]
  h = np_conv(p['conv2'], silu(h))
  return (np_conv(p['skip'], x) if 'skip' in p else x) + h


def np_attn(p, x, groups):
  B, X, Y, C = x.shape
  h = np_gn(p['norm'], x, groups).reshape(B, X * Y, C)
  q, k, v = (np.einsum('btc,cnh->btnh', h, p[w]) + p[b] for w, b in
             (('wq', 'bq'), ('wk', 'bk'), ('wv', 'bv')))
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  prob = np.exp(s - s.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', prob, v)
  return x + (np.einsum('btnh,nhc->btc', o, p['wo']) + p['bo']).reshape(x.shape)


def np_forward(cfg, params, x, noise_B, labels_B):
  """ADM's UNetModel.forward, its module lists rebuilt from cfg as ADM's __init__ builds them."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  G, attn_at = cfg.norm_groups, cfg.attention_resolutions
  c = np_condition(p['cond'], np.asarray(noise_B, np.float64), labels_B, cfg.noise_max_period)
  down, up = iter(p['down']), iter(p['up'])
  h = np_conv(p['in_conv'], np.asarray(x, np.float64))
  hs, res = [h], cfg.image_size
  for level in range(len(cfg.channel_mults)):
    for _ in range(cfg.blocks_per_level):
      q = next(down)
      h = np_res(q['res'], h, c, G)
      h = np_attn(q['attn'], h, G) if res in attn_at else h
      hs.append(h)
    if level != len(cfg.channel_mults) - 1:
      h = np_conv(next(down)['down'], h, stride=2)
      res //= 2
      hs.append(h)
  h = np_res(p['mid']['res1'], h, c, G)
  h = np_attn(p['mid']['attn'], h, G) if res in attn_at else h
  h = np_res(p['mid']['res2'], h, c, G)
  for level in reversed(range(len(cfg.channel_mults))):
    for i in range(cfg.blocks_per_level + 1):
      q = next(up)
      h = np_res(q['res'], np.concatenate([h, hs.pop()], axis=-1), c, G)
      h = np_attn(q['attn'], h, G) if res in attn_at else h
      if level and i == cfg.blocks_per_level:
        h = np_conv(q['up'], h.repeat(2, axis=1).repeat(2, axis=2))
        res *= 2
  assert next(down, None) is None and next(up, None) is None and not hs
  return np_conv(p['out_conv'], silu(np_gn(p['out_norm'], h, G)))


def test_forward_matches_numpy_oracle():
  params = draw_params(CFG, 0, perturb=True)
  x, noise_B, labels_B = inputs(1, CFG)
  got = forward(params, x, noise_B, labels_B, key(0))
  assert got.shape == x.shape and got.dtype == jnp.float32
  want = np_forward(CFG, params, x, noise_B, np.asarray(labels_B))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_attention_through_the_kernel_matches_reference():
  """The Pallas kernel (interpreted) on 8 x 8 = 64 positions, several of its 16-row tiles."""
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), jnp.float32),
                   unet.param_specs(CFG)['mid']['attn'], is_leaf=ps.is_spec)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
  block = lambda backend: jit(functools.partial(
      unet.attention_block, make_cfg(attention_backend=backend)))(p, x)
  got = block('interpret')
  np.testing.assert_allclose(got, block('reference'), rtol=1e-5, atol=1e-5)
  want = np_attn(jax.tree.map(lambda a: np.asarray(a, np.float64), p), np.asarray(x, np.float64),
                 CFG.norm_groups)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('backend,kernels', [('interpret', 4), ('reference', 0)])
def test_forward_attends_through_the_configured_backend(backend, kernels):
  """Every attention block of the network (4 here) is a pallas_call exactly when asked for."""
  cfg = make_cfg(attention_backend=backend)
  jaxpr = jax.make_jaxpr(functools.partial(unet.forward, cfg))(
      draw_params(cfg, 0, perturb=True), *inputs(0, cfg))
  assert str(jaxpr).count('pallas_call') == kernels


def test_output_zero_at_init_and_init_shapes():
  specs = unet.param_specs(CFG)
  shapes = jax.eval_shape(lambda k: ps.init(specs, k), jax.random.key(0))
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == \
      jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), ps.shapes(specs))
  x, noise_B, labels_B = inputs(2, CFG)
  params = draw_params(CFG, 3, perturb=False)
  np.testing.assert_array_equal(forward(params, x, noise_B, labels_B, key(0)), 0.0)


def test_residual_branches_start_at_zero():
  """ADM zero-initialises each branch's last conv / projection: at init every block is the
  identity (or its 1x1 skip conv)."""
  params = draw_params(CFG, 6, perturb=False)
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 4, 4, 16)), jnp.float32)
  c_BE = jnp.asarray(rng.standard_normal((2, 32)), jnp.float32)
  res = jit(functools.partial(unet.res_block, CFG))
  np.testing.assert_array_equal(res(params['mid']['res1'], x, c_BE), x)
  np.testing.assert_array_equal(
      jit(functools.partial(unet.attention_block, CFG))(params['mid']['attn'], x), x)
  down_res = params['down'][2]['res']  # 8 -> 16 channels: the branch adds zero to the skip conv
  y = res(down_res, x[..., :8], c_BE)
  np.testing.assert_allclose(y, np_conv(jax.tree.map(np.asarray, down_res['skip']),
                                        np.asarray(x[..., :8], np.float64)), rtol=1e-5, atol=1e-5)


def test_bfloat16_params_and_inputs_give_bfloat16():
  """As the train step runs it (params cast to the compute dtype); traced, not compiled."""
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                        ps.shapes(unet.param_specs(CFG)))
  x, noise_B, labels_B = inputs(0, CFG)
  out = jax.eval_shape(functools.partial(unet.forward, CFG), shapes, x.astype(jnp.bfloat16),
                       noise_B, labels_B)
  assert out.shape == x.shape and out.dtype == jnp.bfloat16


def test_output_depends_on_noise_and_labels():
  params = draw_params(CFG, 4, perturb=True)
  x, noise_B, labels_B = inputs(5, CFG)
  y = forward(params, x, noise_B, labels_B, key(0))
  changed = lambda y2: np.abs(y2 - y).reshape(B, -1).max(axis=1)  # per example
  assert changed(forward(params, x, noise_B + 1.0, labels_B, key(0))).min() > 1e-3
  assert changed(forward(params, x, noise_B, (labels_B + 1) % 4, key(0))).min() > 1e-3


@pytest.mark.parametrize('size,mults,attn', [(28, (1, 2, 2), (14, 7)), (8, (1, 2, 2, 4), (2,)),
                                             (12, (1,), (12,))])
def test_image_sizes_and_levels(size, mults, attn):
  """MNIST-sized and scikit-learn-digits-sized configs trace to the input's shape."""
  cfg = make_cfg(image_size=size, channel_mults=mults, attention_resolutions=attn, channels=1,
                 blocks_per_level=2)
  out = jax.eval_shape(functools.partial(unet.forward, cfg),
                       ps.shapes(unet.param_specs(cfg)),
                       jax.ShapeDtypeStruct((2, size, size, 1), jnp.float32),
                       jax.ShapeDtypeStruct((2,), jnp.float32),
                       jax.ShapeDtypeStruct((2,), jnp.int32))
  assert out.shape == (2, size, size, 1) and out.dtype == jnp.float32


def test_bad_inputs_raise():
  cfg = make_cfg(num_classes=0)
  params = draw_params(cfg, 6, perturb=False)
  x, noise_B, labels_B = inputs(7, CFG)
  with pytest.raises(ValueError, match='num_classes=0'):
    unet.forward(cfg, params, x, noise_B, labels_B)
  with pytest.raises(ValueError, match=r'expected \[batch, 8, 8, 2\]'):
    unet.forward(cfg, params, jnp.zeros((B, 16, 16, 2)), noise_B)
  with pytest.raises(ValueError, match='noise has shape'):
    unet.forward(cfg, params, x, noise_B[:2])


@pytest.mark.parametrize('overrides,match', [
    (dict(image_size=28, channel_mults=(1, 2, 2, 2)), 'image_size=28; expected a multiple of'),
    (dict(attention_resolutions=(2,)), r'attention_resolutions has 2; expected sizes among'),
    (dict(heads=3), 'heads=3 does not divide the 16 channels at resolution 4'),
    (dict(norm_groups=3), 'norm_groups=3 does not divide model.base_channels=8'),
    (dict(base_channels=9, norm_groups=1), 'base_channels=9; expected an even'),
    (dict(channel_mults=()), r'channel_mults=\(\)'),
    (dict(attention_backend='flash'), "attention_backend='flash'"),
    (dict(dropout=1.0), 'dropout=1.0'),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    unet.validate(make_cfg(**overrides))


def denoising_batch(seed, n=16):
  """x_t = cos(t) x0 + sin(t) eps for smooth two-channel 8x8 images x0; c_noise = 1000 t."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(-1, 1, 8)
  phase = 3 * rng.uniform(0.5, 1.5, (n, 1, 1, 1)) * grid[:, None, None] + grid[None, :, None]
  x0 = np.concatenate([np.sin(phase), np.cos(phase)], axis=-1)
  eps = rng.standard_normal((n, 8, 8, 2))
  t = rng.uniform(0.0, 1.5, n)
  x_t = np.cos(t)[:, None, None, None] * x0 + np.sin(t)[:, None, None, None] * eps
  return [jnp.asarray(a, jnp.float32) for a in (x_t, 1000 * t, eps)]


def test_dropout_only_when_training():
  params = draw_params(CFG, 8, perturb=True)
  x, noise_B, labels_B = inputs(9, CFG)
  np.testing.assert_array_equal(forward(params, x, noise_B, labels_B, key(1)),
                                forward(params, x, noise_B, labels_B, key(2)))
  batch, state = denoising_batch(10), ADAM.init(params)
  loss1 = train_step(params, state, *batch, key(1))[2]
  loss2 = train_step(params, state, *batch, key(2))[2]
  assert abs(float(loss1) - float(loss2)) > 1e-4 * float(loss1)


def test_gradients_reach_every_parameter():
  params = draw_params(CFG, 11, perturb=True)
  grads = train_step(params, ADAM.init(params), *denoising_batch(12), key(0))[3]
  dead = [jax.tree_util.keystr(k) for k, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(g)]
  assert not dead, f'parameters with zero gradient: {dead}'


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps on a fixed batch at least halve the loss of the zero-output initial network."""
  params = draw_params(CFG, 13, perturb=False)
  batch, state = denoising_batch(14), ADAM.init(params)
  losses = []
  for step in range(30):
    params, state, loss, _ = train_step(params, state, *batch, key(step))
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], losses
