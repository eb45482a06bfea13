"""ViT: config checks, parameter shapes, the patch embedding against torch's stride-p convolution,
class token and positions (learned, sin-cos, resized) against NumPy, cls / gap / map pooling
against float64 NumPy (map with gradients), train-mode rng rules, the 'interpret' kernels against
'reference', and a few Adam steps on scikit-learn digits that lower the held-out loss.
The whole network is checked end to end against transformers in test_vit_hf.py."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from scipy.special import erf

from lab.config import ConfigError
from lab.data.images import load_arrays
from lab.models import vit
from lab.nn import param_spec as ps
from lab.nn import patches
from lab.nn import transformer_encoder as te
from oracles import assert_vjp_matches_oracle

B = 3
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def key(i):
  return jax.random.key(i, impl='rbg')  # threefry's bits add seconds to each CPU compile


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=8, patch_size=2, channels=3, d_model=16, n_layers=2, n_heads=2, mlp_dim=24,
      pooling='cls', class_token=True, pos_embed='learned', num_classes=0,
      attention_backend='reference', mlp_activation='gelu', norm_eps=1e-6, dropout=0.0,
      drop_path=0.0) | overrides)


def draw_params(cfg, seed):
  """float32-representable float64 params: norm scales 1 + N(0, 0.2^2), the rest N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  def draw(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + 0.3 * rng.standard_normal(s.shape)).astype(np.float32).astype(np.float64)
  return jax.tree_util.tree_map_with_path(draw, vit.param_specs(cfg), is_leaf=ps.is_spec)


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def images(seed, X=8, Y=8, C=3):
  return np.random.default_rng(seed).standard_normal((B, X, Y, C)).astype(np.float32)


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_map_pool(p, h_BSD, eps):
  """big_vision MAPHead: probe attends to all tokens (biased projections), u + MLP(LN(u))."""
  a = p['attn']
  q = np.einsum('d,dnh->nh', p['probe'], a['wq']) + a['bq']
  k = np.einsum('bsd,dnh->bsnh', h_BSD, a['wk']) + a['bk']
  v = np.einsum('bsd,dnh->bsnh', h_BSD, a['wv']) + a['bv']
  s = np.einsum('nh,bsnh->bns', q, k) / np.sqrt(q.shape[-1])
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  u = np.einsum('bns,bsnh->bnh', w, v)
  u = np.einsum('bnh,nhd->bd', u, a['wo']) + a['bo']
  m = p['mlp']
  hid = np_layer_norm(u, p['norm'], eps) @ m['w_in'] + m['b_in']
  return u + (0.5 * hid * (1 + erf(hid / np.sqrt(2)))) @ m['w_out'] + m['b_out']


# ---------------------------------------------------------------- config and parameters


@pytest.mark.parametrize('overrides, match', [
    (dict(patch_size=3), 'patch_size=3 does not divide model.image_size=8'),
    (dict(n_heads=3), 'n_heads=3 does not divide model.d_model=16'),
    (dict(pooling='max'), "pooling='max'"),
    (dict(pooling='cls', class_token=False), 'needs model.class_token=True'),
    (dict(pos_embed='rope'), "pos_embed='rope'"),
    (dict(pos_embed='sincos', d_model=18, n_heads=2), 'multiple of 4'),
    (dict(mlp_activation='relu'), "mlp_activation='relu'"),
    (dict(drop_path=1.0), 'drop_path=1.0'),
    (dict(attention_backend='cuda'), "attention_backend='cuda'"),
    (dict(n_layers=0), 'n_layers=0')])
def test_validate_rejects(overrides, match):
  with pytest.raises(ConfigError, match=match):
    vit.param_specs(make_cfg(**overrides))


def test_validate_names_missing_fields():
  cfg = make_cfg()
  del cfg['drop_path']
  with pytest.raises(ConfigError, match=r"lacks fields \['drop_path'\]"):
    vit.validate(cfg)


def test_param_specs_follow_the_options():
  specs = vit.param_specs(make_cfg(pooling='map', num_classes=7))
  assert specs['pos_embed'].shape == (1 + 16, 16)
  assert specs['patch']['w'].shape == (2, 2, 3, 16)
  assert specs['patch']['w'].axes == (None, None, 'conv_in', 'conv_out')
  assert specs['head']['w'].shape == (16, 7) and specs['cls'].shape == (16,)
  assert specs['map']['attn']['wq'].shape == (16, 2, 8)
  specs = vit.param_specs(make_cfg(pooling='gap', class_token=False, pos_embed='sincos'))
  assert not {'cls', 'pos_embed', 'map', 'head'} & set(specs)
  assert vit.feature_dim(make_cfg()) == 16 and vit.init_state(make_cfg()) == {}


# ---------------------------------------------------------------- embeddings


def test_patch_embedding_is_a_stride_p_convolution_plus_positions():
  cfg = make_cfg()
  p = draw_params(cfg, 0)
  x = images(0)
  got = jit(lambda p, x: vit.patch_tokens(cfg, p, x))(f32(p), x)
  w_OCXY = torch.from_numpy(p['patch']['w']).permute(3, 2, 0, 1)
  conv = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2),
                                    w_OCXY, torch.from_numpy(p['patch']['b']), stride=2)
  want = conv.flatten(2).transpose(1, 2).numpy() + p['pos_embed'][1:]
  assert got.shape == (B, 16, 16)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_class_token_and_its_position():
  x = np.random.default_rng(1).standard_normal((B, 16, 16))
  for pos_embed in ('learned', 'sincos'):
    cfg = make_cfg(pos_embed=pos_embed)
    p = draw_params(cfg, 1)
    got = vit.with_cls(cfg, f32(p), jnp.asarray(x, jnp.float32))
    cls = p['cls'] + (p['pos_embed'][0] if pos_embed == 'learned' else 0.0)
    np.testing.assert_allclose(got[:, 0], np.broadcast_to(cls, (B, 16)), rtol=1e-6)
    np.testing.assert_allclose(got[:, 1:], x, rtol=1e-6)
  with pytest.raises(ValueError, match='class_token=True'):
    cfg = make_cfg(class_token=False, pooling='gap')
    vit.with_cls(cfg, f32(draw_params(cfg, 1)), jnp.asarray(x, jnp.float32))


def test_sincos_positions_follow_the_input_grid():
  cfg = make_cfg(pos_embed='sincos', class_token=False, pooling='gap')
  p = f32(draw_params(cfg, 2))
  zeros = {**p, 'patch': jax.tree.map(jnp.zeros_like, p['patch'])}
  got = vit.patch_tokens(cfg, zeros, jnp.asarray(images(2, 12, 6)))
  np.testing.assert_allclose(got[0], patches.pos_embed(6, 3, 16), atol=1e-6)


def test_learned_positions_are_resized_for_another_resolution():
  cfg = make_cfg()
  p = f32(draw_params(cfg, 3))
  zeros = {**p, 'patch': jax.tree.map(jnp.zeros_like, p['patch'])}
  got = vit.patch_tokens(cfg, zeros, jnp.asarray(images(3, 12, 6)))
  want = patches.interpolate_pos_embed(p['pos_embed'], (4, 4), (6, 3), 1)[1:]
  np.testing.assert_allclose(got[1], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape, match', [((B, 8, 8, 1), 'expected \\[batch, X, Y, 3\\]'),
                                          ((B, 8, 7, 3), 'divisible by model.patch_size=2')])
def test_bad_images_raise(shape, match):
  cfg = make_cfg()
  with pytest.raises(ValueError, match=match):
    vit.forward(cfg, f32(draw_params(cfg, 0)), jnp.zeros(shape))


# ---------------------------------------------------------------- encoder, pooling, head


@pytest.mark.parametrize('pooling, class_token', [('cls', True), ('gap', True), ('gap', False),
                                                  ('map', False)])
def test_pooling_matches_numpy(pooling, class_token):
  cfg = make_cfg(pooling=pooling, class_token=class_token, norm_eps=1e-2)
  p = draw_params(cfg, 4)
  h = np.random.default_rng(4).standard_normal((B, 16 + class_token, 16))
  got = jit(lambda p, h: vit.pool(cfg, p, h))(f32(p), jnp.asarray(h, jnp.float32))
  want = {'cls': lambda: h[:, 0], 'gap': lambda: h[:, int(class_token):].mean(1),
          'map': lambda: np_map_pool(p['map'], h, 1e-2)}[pooling]()
  assert got.shape == (B, 16)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_map_pooling_gradients_match_oracle():
  cfg = make_cfg(pooling='map', class_token=False)
  p = draw_params(cfg, 5)
  h = np.random.default_rng(5).standard_normal((2, 5, 16))
  with_probe = lambda m, probe: {**m, 'probe': probe}
  assert_vjp_matches_oracle(
      lambda h, probe: vit.map_pool(cfg, with_probe(f32(p['map']), probe), h),
      lambda h, probe: np_map_pool(with_probe(p['map'], probe), h, 1e-6),
      (h, p['map']['probe']), np.random.default_rng(6))


def test_encode_is_the_stack_then_final_norm_and_forward_adds_the_head():
  cfg = make_cfg(num_classes=4, norm_eps=1e-3)
  p = draw_params(cfg, 6)
  x = images(6)
  fwd = jit(lambda p, x: (
      vit.forward(cfg, p, x), vit.forward_with_state(cfg, p, {}, x),
      te.encoder(p['encoder'], vit.with_cls(cfg, p, vit.patch_tokens(cfg, p, x)),
                 vit.encoder_options(cfg))))
  logits, (out, state), z = fwd(f32(p), x)
  want = np_layer_norm(np.asarray(z, np.float64), p['final_norm'], 1e-3)[:, 0] @ p['head']['w']
  assert logits.shape == (B, 4)
  np.testing.assert_allclose(logits, want + p['head']['b'], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out, logits)
  assert state == {}


def test_train_mode_needs_an_rng_and_uses_it():
  cfg = make_cfg(dropout=0.2, drop_path=0.2)
  p, x = f32(draw_params(cfg, 7)), jnp.asarray(images(7))
  with pytest.raises(ValueError, match='needs an rng'):
    vit.forward(cfg, p, x, train=True)
  run = jit(lambda p, x, rng: (vit.forward(cfg, p, x, train=True, rng=rng),
                               vit.forward(cfg, p, x, train=False, rng=rng)))
  train_a, eval_a = run(p, x, key(0))
  train_b, eval_b = run(p, x, key(1))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(train_a - eval_a).max() > 1e-2 and np.abs(train_a - train_b).max() > 1e-2


def test_interpret_kernels_equal_reference():
  """17 tokens cross the interpreter's 16-token blocks; map pooling runs one query."""
  fields = dict(n_layers=1, pooling='map', mlp_activation='quick_gelu', num_classes=3)
  p, x = f32(draw_params(make_cfg(**fields), 8)), jnp.asarray(images(8))
  out = {backend: jit(functools.partial(vit.forward, make_cfg(**fields,
                                                              attention_backend=backend)))(p, x)
         for backend in ('reference', 'interpret')}
  np.testing.assert_allclose(out['interpret'], out['reference'], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training


def test_adam_on_digits_lowers_the_held_out_loss():
  cfg = make_cfg(image_size=8, patch_size=2, channels=1, d_model=32, n_layers=2, n_heads=2,
                 mlp_dim=64, pooling='gap', class_token=False, num_classes=10,
                 attention_backend='xla')
  x_train, y_train = load_arrays('digits', 'train')
  x_test, y_test = (jnp.asarray(a[:256]) for a in load_arrays('digits', 'test'))
  params = ps.init(vit.param_specs(cfg), key(0))
  opt = optax.adam(1e-2)

  def loss_fn(params, x, y, train):
    logits = vit.forward(cfg, params, x, train=train)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jit
  def step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y, True)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jit(lambda params: loss_fn(params, x_test, y_test, False))
  before = float(evaluate(params))
  opt_state = opt.init(params)
  order = np.random.default_rng(0).permutation(len(y_train))
  for i in range(40):
    idx = order[i * 35:(i + 1) * 35]
    params, opt_state = step(params, opt_state, x_train[idx], y_train[idx])
  after = float(evaluate(params))
  assert abs(before - np.log(10)) < 1e-5  # the zero-initialised head predicts uniformly
  assert after < 0.65 * before, (before, after)
