"""The ADM U-Net: a float64 NumPy oracle of the whole forward pass that builds the network the way
ADM's code does, attention through the Pallas kernel (interpret) against the reference, zero
output at init, conditioning, image-size and config errors, gradients to every parameter, and a
few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import denoisers
from denoisers import jit, key, np_condition, np_self_attention, silu
from lab.config import ConfigError
from lab.models import unet
from lab.nn import param_spec as ps

B = 3


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=8, channels=2, base_channels=8, channel_mults=(1, 2), blocks_per_level=1,
      attention_resolutions=(4,), heads=2, norm_groups=4, num_classes=3, dropout=0.2,
      attention_backend='reference', noise_max_period=1000.0) | overrides)


# One config and two jitted functions shared by the tests (tests/denoisers.py says why).
CFG = make_cfg()
forward = denoisers.eval_forward(unet, CFG)
train_step = denoisers.adam_train_step(unet, CFG)


def draw_params(cfg, seed, perturb):
  return denoisers.draw_params(unet.param_specs(cfg), seed, perturb)


def inputs(seed, cfg):
  S = cfg.image_size
  return denoisers.inputs(seed, (B, S, S, cfg.channels), cfg.num_classes)


# ---------------------------------------------------------------- float64 NumPy oracle


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
  return x + np_self_attention(p, h).reshape(x.shape)


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
  denoisers.assert_matches_oracle(forward(params, x, noise_B, labels_B, key(0)),
                                  np_forward(CFG, params, x, noise_B, np.asarray(labels_B)), x)


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
  denoisers.assert_init_shapes(unet.param_specs(CFG))
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
  denoisers.assert_bfloat16_in_bfloat16_out(unet, CFG, *inputs(0, CFG))


def test_output_depends_on_noise_and_labels():
  denoisers.assert_each_output_depends_on_noise_and_label(
      forward, draw_params(CFG, 4, perturb=True), *inputs(5, CFG), CFG.num_classes)


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
  """Noised smooth two-channel 8x8 images (denoisers.smooth_images, noised_batch, t < 1.5)."""
  rng = np.random.default_rng(seed)
  return denoisers.noised_batch(rng, denoisers.smooth_images(rng, n, 8, 2), 1.5)


def test_dropout_only_when_training():
  denoisers.assert_dropout_only_when_training(forward, train_step, draw_params(CFG, 8, True),
                                              inputs(9, CFG), denoising_batch(10))


def test_gradients_reach_every_parameter():
  denoisers.assert_gradients_reach_every_parameter(train_step, draw_params(CFG, 11, True),
                                                   denoising_batch(12))


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps at least halve the loss of the zero-output initial network."""
  denoisers.assert_adam_steps_halve_loss(train_step, draw_params(CFG, 13, False),
                                         denoising_batch(14))
