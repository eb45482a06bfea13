"""ResNet (He, Zhang, Ren & Sun 2015, "Deep Residual Learning for Image Recognition",
arXiv:1512.03385), version 1.5, over channels-last images x_BXYC, batch norm as explicit state.

  stem -> stages of residual blocks -> global average pool -> linear classifier (optional)
Letters beyond the usual: O the output channels of a block, D the last stage's width.
Stem 'imagenet' (Table 1, conv1 + pool): conv 7x7/2 (pad 3), BN, ReLU, max pool 3x3/2 (pad 1).
Stem 'cifar' (sec. 4.2): conv 3x3/1 (pad 1), BN, ReLU, no pool.
Stage i has width w_i = width 2^i; its first block has stride 2 when i > 0 (Table 1). With
cbr_s(x) = ReLU(BN(conv_s(x))) and cb(x) = BN(conv(x)):
  basic block (fig. 5 left):       y = ReLU(cb3(cbr3_s(x)) + sc(x)),  C_out = w_i
  bottleneck (fig. 5 right, v1.5): y = ReLU(cb1(cbr3_s(cbr1(x))) + sc(x)),  C_out = 4 w_i
v1.5 puts the stride s on the 3x3 conv of the bottleneck, as torchvision and Hugging Face do;
the paper's v1 put it on the first 1x1. The shortcut sc is the identity when the shape is kept,
else the projection cb1_s(x) (option B, sec. 3.3). Depths (Table 1): 18 basic (2, 2, 2, 2),
34 basic (3, 4, 6, 3), 50 / 101 / 152 bottleneck (3, 4, 6, 3) / (3, 4, 23, 3) / (3, 8, 36, 3).
Convs have no bias, 'same' padding k // 2 on both sides (as torch) and He normal init
std = sqrt(2 / (k^2 C_out)) (He et al. 2015, arXiv:1502.01852, fan-out mode as torchvision).
zero_init_residual starts the last BN scale of every residual branch at 0 (Goyal et al. 2017,
arXiv:1706.02677, sec. 5.1), so each block starts as ReLU(sc(x)). Batch norm follows
lab.nn.batch_norm (momentum weighs the old statistics: torch's 0.1 is 0.9 here; with the batch
sharded, statistics are global). Block outputs are constrained to ('batch', ., ., 'act_embed').

Config fields (`cfg` is `config.model`): depth (18, 34, 50, 101, 152), or stage_depths (a tuple,
one entry per stage) with block ('basic' | 'bottleneck'); optional: width (64), stem
('imagenet' | 'cifar'), channels (3, of the input), num_classes (0: no classifier, forward
returns the pooled features), zero_init_residual (False), bn_momentum (0.9), bn_eps (1e-5).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import require
from lab.nn import batch_norm as bn
from lab.nn import conv
from lab.nn import param_spec as ps
from lab.parallel.rules import constrain

DEPTHS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
          50: ('bottleneck', (3, 4, 6, 3)), 101: ('bottleneck', (3, 4, 23, 3)),
          152: ('bottleneck', (3, 8, 36, 3))}
EXPANSION = {'basic': 1, 'bottleneck': 4}
STEMS = ('imagenet', 'cifar')
DEFAULTS = dict(depth=0, stage_depths=(), block='', width=64, stem='imagenet', channels=3,
                num_classes=0, zero_init_residual=False, bn_momentum=0.9, bn_eps=1e-5)


def option(cfg, name: str):
  """cfg[name], or its default when the config leaves it out."""
  return cfg.get(name, DEFAULTS[name])


def architecture(cfg) -> tuple[str, tuple[int, ...]]:
  """(block type, blocks per stage) from model.depth or model.stage_depths + model.block."""
  depth, stages = option(cfg, 'depth'), tuple(option(cfg, 'stage_depths'))
  return DEPTHS[depth] if depth else (option(cfg, 'block'), stages)


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network."""
  depth, stages, block = option(cfg, 'depth'), option(cfg, 'stage_depths'), option(cfg, 'block')
  require(bool(depth) != bool(stages), f'model.depth={depth}, model.stage_depths={stages}; '
          'expected exactly one of them')
  if depth:
    require(depth in DEPTHS, f'model.depth={depth}; expected one of {sorted(DEPTHS)}')
    require(block in ('', DEPTHS[depth][0]), f'model.block={block!r} contradicts model.depth='
            f'{depth} (a {DEPTHS[depth][0]} ResNet); leave it out or set {DEPTHS[depth][0]!r}')
  else:
    require(all(d > 0 for d in stages), f'model.stage_depths={stages}; expected positive ints')
    require(block in EXPANSION, f'model.block={block!r}; expected one of {tuple(EXPANSION)}')
  for key in ('width', 'channels'):
    require(option(cfg, key) > 0, f'model.{key}={option(cfg, key)}; expected a positive integer')
  require(option(cfg, 'stem') in STEMS, f'model.stem={option(cfg, "stem")!r}; expected one of '
          f'{STEMS}')
  require(option(cfg, 'num_classes') >= 0,
          f'model.num_classes={option(cfg, "num_classes")}; expected >= 0')
  require(0.0 <= option(cfg, 'bn_momentum') <= 1.0,
          f'model.bn_momentum={option(cfg, "bn_momentum")}; expected a value in [0, 1]')
  require(option(cfg, 'bn_eps') > 0, f'model.bn_eps={option(cfg, "bn_eps")}; expected > 0')


def feature_dim(cfg) -> int:
  """D of the pooled features: EXPANSION[block] * width * 2^(stages - 1)."""
  block, stages = architecture(cfg)
  return EXPANSION[block] * option(cfg, 'width') * 2 ** (len(stages) - 1)


def _conv_bn_specs(k: int, c_in: int, c_out: int, zero_scale: bool = False) -> dict:
  std = math.sqrt(2.0 / (k * k * c_out))
  return {'conv': conv.conv_specs(k, c_in, c_out, bias=False, std=std),
          'bn': bn.batch_norm_specs(c_out, zero_scale=zero_scale)}


def block_specs(block: str, c_in: int, w: int, stride: int, zero: bool = False) -> dict:
  """Parameters of one residual block: conv1, conv2[, conv3][, proj] (module docstring);
  zero starts the branch's last BN scale at 0."""
  c_out = EXPANSION[block] * w
  if block == 'basic':
    specs = {'conv1': _conv_bn_specs(3, c_in, w), 'conv2': _conv_bn_specs(3, w, w, zero)}
  else:
    specs = {'conv1': _conv_bn_specs(1, c_in, w), 'conv2': _conv_bn_specs(3, w, w),
             'conv3': _conv_bn_specs(1, w, c_out, zero)}
  if stride != 1 or c_in != c_out:
    specs['proj'] = _conv_bn_specs(1, c_in, c_out)
  return specs


def param_specs(cfg) -> dict:
  """ParamSpecs: 'stem', 'stages' (a list per stage of block dicts with conv1, conv2[, conv3]
  [, proj], each {'conv': {'w'}, 'bn': {'scale', 'bias'}}) and, with classes, 'classifier'."""
  validate(cfg)
  block, depths = architecture(cfg)
  width, zero = option(cfg, 'width'), option(cfg, 'zero_init_residual')
  stem_k = 7 if option(cfg, 'stem') == 'imagenet' else 3
  specs = {'stem': _conv_bn_specs(stem_k, option(cfg, 'channels'), width), 'stages': []}
  c_in = width
  for i, n in enumerate(depths):
    w = width * 2 ** i
    specs['stages'].append([block_specs(block, c_in if j == 0 else EXPANSION[block] * w, w,
                                        2 if i > 0 and j == 0 else 1, zero) for j in range(n)])
    c_in = EXPANSION[block] * w
  if option(cfg, 'num_classes'):
    D, V = c_in, option(cfg, 'num_classes')
    specs['classifier'] = {'w': ps.ParamSpec((D, V), ps.normal(D ** -0.5), ('embed', 'vocab')),
                           'b': ps.ParamSpec((V,), ps.zeros, ('vocab',))}
  return specs


def init_state(cfg) -> dict:
  """Running BN statistics (mean 0, var 1) at the paths of the BN parameters."""
  return bn.init_state_tree(param_specs(cfg))


def conv_bn(p: dict, s: dict, x_BXYC, *, stride: int, bn_args: dict):
  """(BN(conv_s(x)), new state) with torch's symmetric padding k // 2."""
  k = p['conv']['w'].shape[0]
  y_BXYC = conv.conv2d(p['conv'], x_BXYC, stride=stride, padding=k // 2)
  y_BXYC, s_bn = bn.batch_norm(p['bn'], s['bn'], y_BXYC, **bn_args)
  return y_BXYC, {'bn': s_bn}


def residual_block(p: dict, s: dict, x_BXYC, *, stride: int, train: bool, momentum: float = 0.9,
                   eps: float = 1e-5):
  """(y_BXYO, new state) of one basic (p has conv1, conv2) or bottleneck (conv1..conv3) block
  of the module docstring; the stride sits on the 3x3 conv; p['proj'] is the projection."""
  bn_args = dict(train=train, momentum=momentum, eps=eps)
  names = [n for n in ('conv1', 'conv2', 'conv3') if n in p]
  strided = 'conv1' if len(names) == 2 else 'conv2'  # the first 3x3 conv of the branch
  new_s, h = {}, x_BXYC
  for i, name in enumerate(names):
    h, new_s[name] = conv_bn(p[name], s[name], h, stride=stride if name == strided else 1,
                             bn_args=bn_args)
    if i < len(names) - 1:
      h = jax.nn.relu(h)
  skip = x_BXYC
  if 'proj' in p:
    skip, new_s['proj'] = conv_bn(p['proj'], s['proj'], x_BXYC, stride=stride, bn_args=bn_args)
  return jax.nn.relu(h + skip), new_s


def max_pool(x_BXYC, window: int = 3, stride: int = 2, pad: int = 1):
  """Max over window x window patches at the given stride, padded by -inf (torch MaxPool2d)."""
  return jax.lax.reduce_window(x_BXYC, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def feature_map(cfg, params, state, x_BXYC: jax.Array, *, train: bool):
  """(h_BXYD, new_state): the last stage's output before pooling (HF's last_hidden_state)."""
  if x_BXYC.ndim != 4 or x_BXYC.shape[-1] != option(cfg, 'channels'):
    raise ValueError(f'images have shape {x_BXYC.shape}; expected [batch, x, y, '
                     f'{option(cfg, "channels")}] (model.channels, channels-last)')
  bn_args = dict(train=train, momentum=option(cfg, 'bn_momentum'), eps=option(cfg, 'bn_eps'))
  imagenet = option(cfg, 'stem') == 'imagenet'
  h, stem_state = conv_bn(params['stem'], state['stem'], x_BXYC, stride=2 if imagenet else 1,
                          bn_args=bn_args)
  h = jax.nn.relu(h)
  if imagenet:
    h = max_pool(h)
  new_state = {'stem': stem_state, 'stages': []}
  for i, (p_stage, s_stage) in enumerate(zip(params['stages'], state['stages'])):
    new_state['stages'].append([])
    for j, (p, s) in enumerate(zip(p_stage, s_stage)):
      h, s_new = residual_block(p, s, h, stride=2 if i > 0 and j == 0 else 1, **bn_args)
      h = constrain(h, ('batch', None, None, 'act_embed'))
      new_state['stages'][-1].append(s_new)
  return h, new_state


def forward(cfg, params, state, x_BXYC: jax.Array, *, train: bool, rng=None):
  """(out, new_state): logits_BV when model.num_classes, else the pooled features_BD, D =
  feature_dim(cfg). rng is unused (ResNet has no stochastic layer); it is part of the backbone
  interface shared with lab.models.efficientnet."""
  del rng
  h_BXYD, new_state = feature_map(cfg, params, state, x_BXYC, train=train)
  features_BD = h_BXYD.mean(axis=(1, 2))
  if not option(cfg, 'num_classes'):
    return features_BD, new_state
  return features_BD @ params['classifier']['w'] + params['classifier']['b'], new_state
