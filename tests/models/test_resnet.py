"""ResNet v1.5: shapes and parameter counts of ResNet-18/34/50 (torchvision's published counts),
basic and bottleneck blocks and a whole small network against a float64 NumPy re-implementation
of He et al. 2015 (stride on the 3x3 conv), gradients, zero-init residuals, and a few SGD steps on
scikit-learn's digits."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from lab.config import ConfigError
from lab.data import images
from lab.models import resnet
from lab.nn import batch_norm as bn
from lab.nn import param_spec as ps


def _cfg(**fields):
  return ml_collections.FrozenConfigDict(fields)


def np_conv(x_BXYC, w_XYCO, stride, pad):
  """Cross-correlation with zero padding `pad` on both sides (torch's Conv2d)."""
  x = np.pad(x_BXYC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w_XYCO.shape[0]
  X, Y = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  return sum(x[:, i:i + stride * X:stride, j:j + stride * Y:stride] @ w_XYCO[i, j]
             for i in range(k) for j in range(k))


def np_bn(x, p, s, train, momentum=0.9, eps=1e-5):
  """Ioffe & Szegedy Alg. 1 (train) / Alg. 2 (eval); running var with m / (m - 1)."""
  if not train:
    return p['bn']['scale'] * (x - s['mean']) / np.sqrt(s['var'] + eps) + p['bn']['bias'], s
  m = x.size // x.shape[-1]
  mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  new = {'mean': momentum * s['mean'] + (1 - momentum) * mu,
         'var': momentum * s['var'] + (1 - momentum) * var * m / (m - 1)}
  return p['bn']['scale'] * (x - mu) / np.sqrt(var + eps) + p['bn']['bias'], new


def np_unit(p, s, x, stride, train):
  k = p['conv']['w'].shape[0]
  y, new = np_bn(np_conv(x, p['conv']['w'], stride, k // 2), p, s['bn'], train)
  return y, {'bn': new}


def np_block(p, s, x, stride, train):
  """He et al. fig. 5; the stride on the first 3x3 conv: conv1 (basic) or conv2 (bottleneck)."""
  names = [n for n in ('conv1', 'conv2', 'conv3') if n in p]
  strided = 'conv1' if len(names) == 2 else 'conv2'
  h, new = x, {}
  for i, n in enumerate(names):
    h, new[n] = np_unit(p[n], s[n], h, stride if n == strided else 1, train)
    h = np.maximum(h, 0) if i < len(names) - 1 else h
  skip = x
  if 'proj' in p:
    skip, new['proj'] = np_unit(p['proj'], s['proj'], x, stride, train)
  return np.maximum(h + skip, 0), new


def np_resnet(cfg, params, state, x, train):
  """The whole network: stem, stages, global average pool, classifier."""
  imagenet = cfg.get('stem', 'imagenet') == 'imagenet'
  h, new_stem = np_unit(params['stem'], state['stem'], x, 2 if imagenet else 1, train)
  h = np.maximum(h, 0)
  if imagenet:
    h = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    X, Y = (h.shape[1] - 3) // 2 + 1, (h.shape[2] - 3) // 2 + 1
    h = np.max([h[:, i:i + 2 * X:2, j:j + 2 * Y:2] for i in range(3) for j in range(3)], 0)
  stages = []
  for i, (p_stage, s_stage) in enumerate(zip(params['stages'], state['stages'])):
    stages.append([])
    for j, (p, s) in enumerate(zip(p_stage, s_stage)):
      h, new = np_block(p, s, h, 2 if i > 0 and j == 0 else 1, train)
      stages[-1].append(new)
  out = h.mean((1, 2)) @ params['classifier']['w'] + params['classifier']['b']
  return out, {'stem': new_stem, 'stages': stages}


def _randomise(tree, rng):
  """Every parameter (ParamSpec or array leaf) drawn afresh in float32: convs at He scale, BN
  scales ~ 1 +- 0.3, biases and means ~ N(0, 0.3), variances in [0.5, 2]."""
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


def _block_params(block, c_in, w, stride, seed):
  rng = np.random.default_rng(seed)
  specs = resnet.block_specs(block, c_in, w, stride)
  return _randomise(specs, rng), _randomise(bn.init_state_tree(specs), rng), rng


def _fresh_params(cfg, rng):
  """Parameters as the model initialises them, except that the random weights are drawn by
  NumPy at He scale (jax.random's compile time would dominate these tiny tests): constant
  initializers (BN scales and biases, classifier bias) are the model's own."""
  return jax.tree.map(lambda s: s.init(None, s.shape, s.dtype) if s.init in (ps.zeros, ps.ones)
                      else _randomise(s, rng), resnet.param_specs(cfg), is_leaf=ps.is_spec)


_block = jax.jit(resnet.residual_block, static_argnames=('stride', 'train'))
_forward = jax.jit(resnet.forward, static_argnums=0, static_argnames='train')


@pytest.mark.parametrize('depth,feature,count', [(18, 512, 11_689_512), (34, 512, 21_797_672),
                                                 (50, 2048, 25_557_032)])
def test_imagenet_shapes_and_param_counts(depth, feature, count):
  """torchvision's resnet18/34/50 parameter counts (1000 classes); 224 -> 7x7 feature maps."""
  cfg = _cfg(depth=depth, num_classes=1000)
  specs = resnet.param_specs(cfg)
  assert ps.count(specs) == count and resnet.feature_dim(cfg) == feature
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  shapes, state = ps.shapes(specs), resnet.init_state(cfg)
  h = jax.eval_shape(lambda p, s, x: resnet.feature_map(cfg, p, s, x, train=True)[0], shapes,
                     state, x)
  logits, new_state = jax.eval_shape(
      lambda p, s, x: resnet.forward(cfg, p, s, x, train=True), shapes, state, x)
  assert h.shape == (2, 7, 7, feature) and logits.shape == (2, 1000)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  no_head = _cfg(depth=depth)
  feats, _ = jax.eval_shape(lambda p, s, x: resnet.forward(no_head, p, s, x, train=False),
                            ps.shapes(resnet.param_specs(no_head)), state, x)
  assert feats.shape == (2, feature)


def test_v1_5_stride_sits_on_the_3x3_conv():
  """ResNet-50's downsampling blocks: conv1 is 1x1 and keeps the size, conv2 (3x3) halves it."""
  cfg = _cfg(depth=50)
  specs = resnet.param_specs(cfg)
  for i, stage in enumerate(specs['stages']):
    first = stage[0]
    assert first['conv1']['conv']['w'].shape[:2] == (1, 1)
    assert first['conv2']['conv']['w'].shape[:2] == (3, 3)
    assert 'proj' in first and all('proj' not in b for b in stage[1:])
  p, s, rng = _block_params('bottleneck', 8, 4, 2, 0)
  x = rng.standard_normal((2, 6, 6, 8))
  y, _ = _block(p, s, jnp.asarray(x, jnp.float32), stride=2, train=False)
  want_v15, _ = np_block(_as_np(p), _as_np(s), x, 2, False)
  np.testing.assert_allclose(y, want_v15, rtol=1e-5, atol=1e-5)
  # v1 (stride on the first 1x1) gives other numbers: the test above can tell them apart.
  pn, sn = _as_np(p), _as_np(s)
  h, _ = np_unit(pn['conv1'], sn['conv1'], x, 2, False)
  h, _ = np_unit(pn['conv2'], sn['conv2'], np.maximum(h, 0), 1, False)
  h, _ = np_unit(pn['conv3'], sn['conv3'], np.maximum(h, 0), 1, False)
  want_v1 = np.maximum(h + np_unit(pn['proj'], sn['proj'], x, 2, False)[0], 0)
  assert np.abs(want_v1 - want_v15).max() > 0.1


@pytest.mark.parametrize('block,c_in,w,stride,train', [
    ('basic', 4, 4, 1, True), ('basic', 4, 6, 2, True), ('basic', 4, 6, 2, False),
    ('bottleneck', 12, 3, 1, True), ('bottleneck', 8, 4, 1, True), ('bottleneck', 8, 4, 2, True),
    ('bottleneck', 8, 4, 2, False)])
def test_block_matches_float64_oracle(block, c_in, w, stride, train):
  p, s, rng = _block_params(block, c_in, w, stride, seed=c_in + stride)
  x = rng.standard_normal((3, 7, 7, c_in))
  y, new = _block(p, s, jnp.asarray(x, jnp.float32), stride=stride, train=train)
  want_y, want_new = np_block(_as_np(p), _as_np(s), x, stride, train)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  assert ('proj' in p) == (stride != 1 or c_in != resnet.EXPANSION[block] * w)
  for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(want_new)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_block_float64_gradients(x64):
  """A strided bottleneck with projection in train mode (every op a basic block has, too)."""
  p, s, rng = _block_params('bottleneck', 4, 2, 2, seed=3)
  p, s = _as_np(p), _as_np(s)
  x = rng.standard_normal((2, 4, 4, 4))
  f = lambda p, x: resnet.residual_block(p, s, x, stride=2, train=True)[0]
  check_grads(jax.jit(f), (p, x), order=1, modes=['rev'])


@pytest.mark.parametrize('stem', ['imagenet', 'cifar'])
def test_small_network_matches_float64_oracle(stem):
  cfg = _cfg(stage_depths=(2, 1), block='basic', width=4, stem=stem, channels=2, num_classes=3)
  rng = np.random.default_rng(1)
  params = _randomise(resnet.param_specs(cfg), rng)
  state = _randomise(resnet.init_state(cfg), rng)
  x = rng.standard_normal((3, 12, 12, 2))
  for train in (True, False):
    got, new = _forward(cfg, params, state, jnp.asarray(x, jnp.float32), train=train)
    want, want_new = np_resnet(cfg, _as_np(params), _as_np(state), x, train)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(new) == jax.tree.structure(want_new)
    for g, w in zip(jax.tree.leaves(new), jax.tree.leaves(want_new)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('block,last', [('basic', 'conv2'), ('bottleneck', 'conv3')])
def test_zero_init_residual_makes_blocks_start_as_relu_of_shortcut(block, last):
  """Goyal et al.: the last BN scale of every branch starts at 0 (others at 1), so a block with
  an identity shortcut starts as ReLU(x), whatever its conv weights."""
  init = lambda cfg: _fresh_params(cfg, np.random.default_rng(0))
  fields = dict(stage_depths=(2, 1), block=block, width=4, stem='cifar')
  params = init(_cfg(zero_init_residual=True, **fields))
  for p in (b for stage in params['stages'] for b in stage):
    np.testing.assert_array_equal(p[last]['bn']['scale'], 0.0)
    np.testing.assert_array_equal(p['conv1']['bn']['scale'], 1.0)
  state = resnet.init_state(_cfg(**fields))
  c = 4 * resnet.EXPANSION[block]
  x = np.random.default_rng(0).standard_normal((2, 6, 6, c))
  y, _ = _block(params['stages'][0][1], state['stages'][0][1], jnp.asarray(x, jnp.float32),
                stride=1, train=True)
  np.testing.assert_allclose(y, np.maximum(x, 0), rtol=1e-6)
  assert init(_cfg(**fields))['stages'][0][1][last]['bn']['scale'].min() == 1.0


@pytest.mark.parametrize('fields,match', [
    (dict(depth=20), 'model.depth=20'),
    (dict(depth=50, stage_depths=(1,), block='basic'), 'exactly one'),
    (dict(stage_depths=(1, 2), block='wide'), "model.block='wide'"),
    (dict(depth=18, block='bottleneck'), 'contradicts'),
    (dict(depth=18, stem='tiny'), "model.stem='tiny'"),
    (dict(depth=18, bn_momentum=1.5), 'bn_momentum=1.5')])
def test_bad_configs_raise_one_line(fields, match):
  with pytest.raises(ConfigError, match=match):
    resnet.param_specs(_cfg(**fields))


def test_wrong_image_channels_raise():
  cfg = _cfg(stage_depths=(1,), block='basic', width=4, stem='cifar')
  params = _randomise(resnet.param_specs(cfg), np.random.default_rng(0))
  with pytest.raises(ValueError, match='expected \\[batch, x, y, 3\\]'):
    resnet.forward(cfg, params, resnet.init_state(cfg), jnp.zeros((1, 8, 8, 1)), train=False)


def test_sgd_on_digits_lowers_the_loss():
  """A tiny CIFAR-stem ResNet, 150 SGD steps with momentum on 8x8 digits (batch 64): the
  training loss falls below a tenth of its start (about 2.6) and eval mode, which uses the
  running statistics, classifies held-out digits (chance: 10%)."""
  cfg = _cfg(stage_depths=(1, 1), block='basic', width=8, stem='cifar', channels=1,
             num_classes=10)
  x_train, y_train = images.load_arrays('digits', 'train')
  x_test, y_test = images.load_arrays('digits', 'test')
  params, state = _fresh_params(cfg, np.random.default_rng(0)), resnet.init_state(cfg)
  opt = optax.sgd(0.1, momentum=0.9)
  opt_state = opt.init(params)

  def loss_fn(params, state, x, y):
    logits, new_state = resnet.forward(cfg, params, state, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

  @jax.jit
  def step(params, state, opt_state, x, y):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), state, opt_state, loss

  order = np.random.default_rng(0).permutation(len(y_train))
  losses = []
  for i in range(150):
    idx = order[(i * 64) % 1472:][:64]
    params, state, opt_state, loss = step(params, state, opt_state, x_train[idx], y_train[idx])
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.1 * losses[0], losses
  logits, _ = _forward(cfg, params, state, x_test, train=False)
  assert (np.asarray(logits).argmax(-1) == y_test).mean() > 0.9
