"""EfficientNet: compound scaling against the released B0..B7 shapes (official implementation /
Keras applications), parameter counts, MBConv and squeeze-and-excitation against a float64
NumPy re-implementation of Tan & Le 2019 (TF 'SAME' padding), gradients, and stochastic depth."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.config import ConfigError
from lab.models import efficientnet as en
from lab.models import efficientnet_scaling as scaling
from lab.nn import batch_norm as bn
from lab.nn import param_spec as ps

# Released shapes: stem, the 7 stage widths, head width, blocks per stage (efficientnet/keras).
PUBLISHED = {
    'b0': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (1, 2, 2, 3, 3, 4, 1)),
    'b1': (32, (16, 24, 40, 80, 112, 192, 320), 1280, (2, 3, 3, 4, 4, 5, 2)),
    'b2': (32, (16, 24, 48, 88, 120, 208, 352), 1408, (2, 3, 3, 4, 4, 5, 2)),
    'b3': (40, (24, 32, 48, 96, 136, 232, 384), 1536, (2, 3, 3, 5, 5, 6, 2)),
    'b4': (48, (24, 32, 56, 112, 160, 272, 448), 1792, (2, 4, 4, 6, 6, 8, 2)),
    'b5': (48, (24, 40, 64, 128, 176, 304, 512), 2048, (3, 5, 5, 7, 7, 9, 3)),
    'b6': (56, (32, 40, 72, 144, 200, 344, 576), 2304, (3, 6, 6, 8, 8, 11, 3)),
    'b7': (64, (32, 48, 80, 160, 224, 384, 640), 2560, (4, 7, 7, 10, 10, 13, 4)),
}
RESOLUTIONS = {'b0': 224, 'b1': 240, 'b2': 260, 'b3': 300, 'b4': 380, 'b5': 456, 'b6': 528,
               'b7': 600}


def _cfg(**fields):
  return ml_collections.FrozenConfigDict(fields)


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_scaled_shapes_match_released_variants(name):
  stem, widths, head, repeats = PUBLISHED[name]
  v = scaling.VARIANTS[name]
  stages = scaling.scaled_stages(v.width, v.depth)
  assert tuple(s.c_out for s in stages) == widths
  assert tuple(s.repeats for s in stages) == repeats
  assert stages[0].c_in == stem == scaling.round_filters(32, v.width)
  cfg = _cfg(**scaling.model_fields(name))
  assert en.feature_dim(cfg) == head and v.resolution == RESOLUTIONS[name]
  assert len(en.blocks(cfg)) == sum(repeats)
  assert [b.c_in for b in en.blocks(cfg)][1:] == [b.c_out for b in en.blocks(cfg)][:-1]


def test_round_filters_never_rounds_down_by_more_than_ten_percent():
  assert scaling.round_filters(16, 1.2) == 24  # 19.2 -> 16 would lose 17%: bumped to 24
  assert scaling.round_filters(112, 1.2) == 136  # 134.4 -> 136 (nearest multiple of 8)
  assert scaling.round_filters(3, 1.0) == 8  # never below the divisor
  rng = np.random.default_rng(0)
  for c, w in zip(rng.integers(8, 700, 200), rng.uniform(0.5, 3.0, 200)):
    r = scaling.round_filters(int(c), float(w))
    assert r % 8 == 0 and r >= 0.9 * c * w and r <= c * w + 8


def test_compound_rule():
  """Eq. 3: d, w, r = alpha^phi, beta^phi, gamma^phi with alpha beta^2 gamma^2 ~ 2 (FLOPs
  of a conv net grow as d w^2 r^2, so by about 2^phi)."""
  assert abs(scaling.ALPHA * scaling.BETA ** 2 * scaling.GAMMA ** 2 - 2.0) < 0.1
  for phi in (0, 1, 2.5):
    d, w, r = scaling.compound_coefficients(phi)
    np.testing.assert_allclose((d, w, r), (1.2 ** phi, 1.1 ** phi, 224 * 1.15 ** phi))
    np.testing.assert_allclose(d * w ** 2 * (r / 224) ** 2, 1.9203 ** phi, rtol=1e-4)


@pytest.mark.parametrize('name,count', [('b0', 5_288_548), ('b7', 66_347_960)])
def test_param_counts_match_released(name, count):
  """Trainable parameters of Keras' EfficientNetB0 / B7 (1000 classes)."""
  cfg = _cfg(num_classes=1000, **scaling.model_fields(name))
  assert ps.count(en.param_specs(cfg)) == count
  assert ps.count(en.param_specs(_cfg(**scaling.model_fields(name)))) == count - (
      en.feature_dim(cfg) + 1) * 1000


# --- float64 NumPy oracle -------------------------------------------------------------------

def np_same_conv(x, w_XYCO, stride, groups=1):
  """TF 'SAME' cross-correlation: out = ceil(size / stride), padding total // 2 before."""
  k = w_XYCO.shape[0]
  pads = []
  for size in x.shape[1:3]:
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    pads.append((total // 2, total - total // 2))
  x = np.pad(x, ((0, 0), *pads, (0, 0)))
  X, Y = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  patches = [(i, j, x[:, i:i + stride * X:stride, j:j + stride * Y:stride])
             for i in range(k) for j in range(k)]
  if groups == 1:
    return sum(p @ w_XYCO[i, j] for i, j, p in patches)
  return sum(p * w_XYCO[i, j, 0] for i, j, p in patches)  # depthwise: one filter per channel


def np_bn(x, p, s, train, momentum=0.99, eps=1e-3):
  if not train:
    return p['scale'] * (x - s['mean']) / np.sqrt(s['var'] + eps) + p['bias']
  mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  return p['scale'] * (x - mu) / np.sqrt(var + eps) + p['bias']


def swish(x):
  return x / (1 + np.exp(-x))


def np_se(p, h):
  """Hu et al. 2018: h * sigmoid(W_e swish(W_r mean(h) + b_r) + b_e)."""
  z = h.mean((1, 2))
  r = swish(z @ p['reduce']['w'][0, 0] + p['reduce']['b'])
  return h / (1 + np.exp(-(r @ p['expand']['w'][0, 0] + p['expand']['b'])))[:, None, None]


def np_mbconv(p, s, x, b, train):
  """Tan & Le 2019 MBConv: expand, depthwise, SE, project, identity skip (no drop)."""
  h = x
  if 'expand' in p:
    h = swish(np_bn(np_same_conv(h, p['expand']['conv']['w'], 1), p['expand']['bn'],
                    s['expand']['bn'], train))
  h = swish(np_bn(np_same_conv(h, p['depthwise']['conv']['w'], b.stride, groups=h.shape[-1]),
                  p['depthwise']['bn'], s['depthwise']['bn'], train))
  h = np_se(p['se'], h)
  h = np_bn(np_same_conv(h, p['project']['conv']['w'], 1), p['project']['bn'],
            s['project']['bn'], train)
  return x + h if b.stride == 1 and b.c_in == b.c_out else h


def _random(tree, rng):
  """Fresh float32 values for every ParamSpec / array: He-scaled convs, BN scales ~ 1 +- 0.3,
  biases and means ~ N(0, 0.3), variances in [0.5, 2]."""
  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      v = rng.uniform(0.5, 2.0, a.shape)
    elif name.endswith("['scale']"):
      v = 1 + 0.3 * rng.standard_normal(a.shape)
    elif len(a.shape) == 4:
      v = rng.standard_normal(a.shape) * np.sqrt(2 / np.prod(a.shape[:3]))
    else:
      v = 0.3 * rng.standard_normal(a.shape)
    return jnp.asarray(v, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, tree, is_leaf=ps.is_spec)


def _as_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _block_setup(b, seed):
  rng = np.random.default_rng(seed)
  specs = en.mbconv_specs(b, 0.25)
  return _random(specs, rng), _random(bn.init_state_tree(specs), rng), rng


_mbconv = jax.jit(en.mbconv, static_argnums=3, static_argnames='train')

# (block, size, train): stride-2 blocks see odd and even sizes, where TF SAME pads differently.
CASES = [(en.Block(3, 1, 1, 8, 8, 0.0), 7, True), (en.Block(5, 1, 4, 6, 6, 0.0), 8, False),
         (en.Block(5, 2, 6, 8, 12, 0.0), 7, True), (en.Block(5, 2, 6, 8, 12, 0.0), 8, False),
         (en.Block(3, 2, 6, 6, 6, 0.0), 8, True), (en.Block(3, 2, 6, 6, 6, 0.0), 7, False)]


@pytest.mark.parametrize('b,size,train', CASES, ids=str)
def test_mbconv_matches_float64_oracle(b, size, train):
  p, s, rng = _block_setup(b, seed=b.kernel + b.stride + b.c_out)
  x = rng.standard_normal((3, size, size, b.c_in))
  y, new = _mbconv(p, s, jnp.asarray(x, jnp.float32), b, train=train)
  np.testing.assert_allclose(y, np_mbconv(_as_np(p), _as_np(s), x, b, train), rtol=1e-5,
                             atol=1e-5)
  assert y.shape == (3, -(-size // b.stride), -(-size // b.stride), b.c_out)
  assert jax.tree.structure(new) == jax.tree.structure(s)


def test_squeeze_excite_width_counts_block_input_channels():
  """se_ratio 0.25 of the block INPUT: C_in 16, expand 6 gives 96 -> 4 -> 96, not 96 -> 24."""
  specs = en.mbconv_specs(en.Block(3, 1, 6, 16, 16, 0.0), 0.25)
  assert specs['se']['reduce']['w'].shape == (1, 1, 96, 4)
  assert specs['se']['expand']['w'].shape == (1, 1, 4, 96)
  assert en.mbconv_specs(en.Block(3, 1, 1, 2, 2, 0.0), 0.25)['se']['reduce']['w'].shape[-1] == 1
  rng = np.random.default_rng(0)
  p = _random(specs['se'], rng)
  h = rng.standard_normal((2, 3, 3, 96))
  np.testing.assert_allclose(en.squeeze_excite(p, jnp.asarray(h, jnp.float32)),
                             np_se(_as_np(p), h), rtol=1e-5, atol=1e-6)


def test_mbconv_float64_gradients(x64):
  """Train mode: through expansion, depthwise conv, SE, projection and the batch statistics."""
  b = en.Block(3, 1, 2, 4, 4, 0.0)
  p, s, rng = _block_setup(b, seed=1)
  p, s = _as_np(p), _as_np(s)
  x = rng.standard_normal((2, 4, 4, 4))
  f = lambda p, x: en.mbconv(p, s, x, b, train=True)[0]
  check_grads(jax.jit(f), (p, x), order=1, modes=['rev'])


# --- stochastic depth ----------------------------------------------------------------------

def test_drop_path_drops_whole_examples_at_the_rate_and_rescales():
  rate, B = 0.3, 4000
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (B, 2, 2, 3)), jnp.float32)
  y = np.asarray(en.drop_path(x, rate, jax.random.key(1)))
  dropped = np.all(y == 0, axis=(1, 2, 3))
  kept = ~dropped
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  assert not np.any(y[kept] == 0)  # no example is dropped in part
  assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / B)
  np.testing.assert_array_equal(en.drop_path(x, rate, None), x)
  np.testing.assert_array_equal(en.drop_path(x, 0.0, jax.random.key(1)), x)


def test_mbconv_train_drops_the_branch_per_example():
  """y - x is 0 or branch / (1 - rate) per example, the branch being what rng=None gives (eval
  mode ignores rng: test_forward_eval_is_deterministic_and_train_needs_rng)."""
  b = en.Block(3, 1, 2, 4, 4, 0.5)
  p, s, rng = _block_setup(b, seed=2)
  x = jnp.asarray(rng.standard_normal((64, 4, 4, 4)), jnp.float32)
  y_full, _ = _mbconv(p, s, x, b, train=True)
  y, _ = _mbconv(p, s, x, b, train=True, rng=jax.random.key(3))
  branch, delta = np.asarray(y_full - x), np.asarray(y - x)
  dropped = np.all(np.abs(delta) < 1e-6, axis=(1, 2, 3))
  np.testing.assert_allclose(delta[~dropped], branch[~dropped] / 0.5, rtol=1e-4, atol=1e-5)
  assert 16 < dropped.sum() < 48


def test_drop_rate_grows_linearly_with_block_index():
  plan = en.blocks(_cfg())
  np.testing.assert_allclose([b.drop_rate for b in plan], [0.2 * i / 16 for i in range(16)])
  assert [b.skip for b in plan] == [b.stride == 1 and b.c_in == b.c_out for b in plan]
  assert sum(b.skip for b in plan) == 9


_forward = jax.jit(en.forward, static_argnums=0, static_argnames='train')
_TINY = dict(width_coefficient=0.25, num_classes=3, dropout=0.3,
             stages=((3, 1, 1, 32, 16, 1), (5, 2, 6, 16, 40, 2)))  # widths 8, 16; head 320


def test_forward_eval_is_deterministic_and_train_needs_rng():
  cfg = _cfg(**_TINY)
  rng = np.random.default_rng(0)
  params, state = _random(en.param_specs(cfg), rng), _random(en.init_state(cfg), rng)
  x = jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32)
  a, state_a = _forward(cfg, params, state, x, train=False, rng=jax.random.key(0))
  b, _ = _forward(cfg, params, state, x, train=False, rng=jax.random.key(1))
  assert a.shape == (4, 3)
  np.testing.assert_array_equal(a, b)
  for got, before in zip(jax.tree.leaves(state_a), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, before)
  c, new_state = _forward(cfg, params, state, x, train=True, rng=jax.random.key(0))
  d, _ = _forward(cfg, params, state, x, train=True, rng=jax.random.key(1))
  assert np.abs(np.asarray(c) - np.asarray(d)).max() > 1e-3
  assert all(np.abs(np.asarray(g) - np.asarray(s)).max() > 0 for g, s in
             zip(jax.tree.leaves(new_state), jax.tree.leaves(state)))
  with pytest.raises(ValueError, match='rng=None'):
    en.forward(cfg, params, state, x, train=True)
  no_head = _cfg(**{**_TINY, 'num_classes': 0})
  features, _ = jax.eval_shape(lambda p, x: en.forward(no_head, p, state, x, train=False),
                               {k: v for k, v in params.items() if k != 'classifier'}, x)
  assert features.shape == (4, en.feature_dim(cfg)) == (4, 320)


@pytest.mark.parametrize('fields,match', [
    (dict(stages=((3, 1, 1, 32, 16, 1), (3, 2, 6, 24, 40, 1))), 'stages\\[1\\] has c_in=24'),
    (dict(stages=((4, 1, 1, 32, 16, 1),)), 'odd kernel'),
    (dict(se_ratio=0.0), 'se_ratio=0.0'),
    (dict(drop_connect_rate=1.0), 'drop_connect_rate=1.0'),
    (dict(width_coefficient=0.0), 'width_coefficient=0.0')])
def test_bad_configs_raise_one_line(fields, match):
  with pytest.raises(ConfigError, match=match):
    en.param_specs(_cfg(**fields))


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match="'b8'"):
    scaling.model_fields('b8')
