"""EfficientNet (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", arXiv:1905.11946) over channels-last images x_BXYC, batch norm as explicit state.

  stem conv 3x3/2, BN, swish -> MBConv blocks (Table 1, scaled by efficientnet_scaling)
  -> conv 1x1 to the head width, BN, swish -> global average pool
  -> dropout + linear classifier (optional)
Letters beyond the usual: O the output channels of a block, D the head width (feature_dim).
MBConv block (Sandler et al. 2018, arXiv:1801.04381, with squeeze-and-excitation, Hu et al.
2018, arXiv:1709.01507), C_e = expand_ratio C_in:
  h = swish(BN(conv1x1(x)))                       expansion to C_e (skipped when expand_ratio 1)
  h = swish(BN(dwconv_kxk,s(h)))                  depthwise, one k x k filter per channel
  h = h * sigmoid(W_e swish(W_r mean_XY(h) + b_r) + b_e)   SE, W_r: C_e -> max(1, C_in se_ratio)
  h = BN(conv1x1(h))                              projection to C_out, no activation
  y = x + drop_path(h)  when stride 1 and C_in = C_out (identity skip), else y = h.
swish(x) = x sigmoid(x). The SE width counts the block INPUT channels (se_ratio 0.25), as in the
official code. drop_path (stochastic depth, Huang et al. 2016, arXiv:1603.09382) zeroes the whole
branch of an example with probability rate and scales kept ones by 1 / (1 - rate); block i of n
has rate drop_connect_rate i / n (the official schedule, growing linearly from 0).
Padding is TF 'SAME' (for stride 2: one pixel more after than before on even sizes), as the
official TensorFlow implementation pads. Convs have no bias except SE's; init is He normal in
fan-out mode, std = sqrt(2 / (k^2 C_out)), with C_out = 1 for depthwise kernels, as officially.
Batch norm follows lab.nn.batch_norm (momentum weighs the old statistics, official 0.99; with
the batch sharded, statistics are global). Block outputs are constrained to ('batch', ., .,
'act_embed').

Config fields (`cfg` is `config.model`), all optional: width_coefficient (1.0),
depth_coefficient (1.0) (efficientnet_scaling.model_fields('b3') gives a released variant's),
stages (efficientnet_scaling.B0_STAGES: (kernel, stride, expand_ratio, c_in, c_out, repeats)
rows before scaling), stem_channels (32), head_channels (1280), depth_divisor (8), se_ratio
(0.25), drop_connect_rate (0.2), dropout (0.0, before the classifier), num_classes (0: no
classifier, forward returns pooled features), channels (3), bn_momentum (0.99), bn_eps (1e-3).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import efficientnet_scaling as scaling
from lab.nn import batch_norm as bn
from lab.nn import conv
from lab.nn import param_spec as ps
from lab.nn.dropout import dropout as dropout_fn
from lab.parallel.rules import constrain

DEFAULTS = dict(width_coefficient=1.0, depth_coefficient=1.0, stages=scaling.B0_STAGES,
                stem_channels=scaling.STEM_CHANNELS, head_channels=scaling.HEAD_CHANNELS,
                depth_divisor=scaling.DIVISOR, se_ratio=0.25,
                drop_connect_rate=scaling.DROP_CONNECT_RATE, dropout=0.0, num_classes=0,
                channels=3, bn_momentum=0.99, bn_eps=1e-3)


def option(cfg, name: str):
  """cfg[name], or its default when the config leaves it out."""
  return cfg.get(name, DEFAULTS[name])


class Block(NamedTuple):
  """One MBConv block after scaling; it has an identity skip when stride 1 and c_in == c_out."""
  kernel: int
  stride: int
  expand_ratio: int
  c_in: int
  c_out: int
  drop_rate: float

  @property
  def skip(self) -> bool:
    return self.stride == 1 and self.c_in == self.c_out


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network."""
  for key in ('width_coefficient', 'depth_coefficient', 'stem_channels', 'head_channels',
              'depth_divisor', 'channels'):
    require(option(cfg, key) > 0, f'model.{key}={option(cfg, key)}; expected > 0')
  stages = tuple(scaling.Stage(*s) for s in option(cfg, 'stages'))
  require(len(stages) > 0, 'model.stages is empty; expected at least one MBConv stage')
  c_prev = option(cfg, 'stem_channels')
  for i, s in enumerate(stages):
    require(s.kernel > 0 and s.kernel % 2 == 1 and s.stride in (1, 2) and s.expand_ratio >= 1
            and s.repeats >= 1 and s.c_out > 0, f'model.stages[{i}]={tuple(s)}; expected an odd '
            'kernel, stride 1 or 2, expand_ratio >= 1, repeats >= 1, c_out > 0')
    require(s.c_in == c_prev, f'model.stages[{i}] has c_in={s.c_in}; expected {c_prev}, the '
            'previous stage\'s c_out (or model.stem_channels)')
    c_prev = s.c_out
  require(0.0 < option(cfg, 'se_ratio') <= 1.0,
          f'model.se_ratio={option(cfg, "se_ratio")}; expected a value in (0, 1]')
  for key in ('drop_connect_rate', 'dropout'):
    require(0.0 <= option(cfg, key) < 1.0, f'model.{key}={option(cfg, key)}; expected [0, 1)')
  require(option(cfg, 'num_classes') >= 0,
          f'model.num_classes={option(cfg, "num_classes")}; expected >= 0')
  require(0.0 <= option(cfg, 'bn_momentum') <= 1.0,
          f'model.bn_momentum={option(cfg, "bn_momentum")}; expected a value in [0, 1]')
  require(option(cfg, 'bn_eps') > 0, f'model.bn_eps={option(cfg, "bn_eps")}; expected > 0')


def _round(cfg, c: int) -> int:
  return scaling.round_filters(c, option(cfg, 'width_coefficient'), option(cfg, 'depth_divisor'))


def blocks(cfg) -> list[Block]:
  """Every MBConv block in order, after width and depth scaling, with its drop-path rate."""
  stages = scaling.scaled_stages(option(cfg, 'width_coefficient'),
                                 option(cfg, 'depth_coefficient'), option(cfg, 'stages'),
                                 option(cfg, 'depth_divisor'))
  plan = [(s.kernel, s.stride if j == 0 else 1, s.expand_ratio, s.c_in if j == 0 else s.c_out,
           s.c_out) for s in stages for j in range(s.repeats)]
  rate = option(cfg, 'drop_connect_rate')
  return [Block(*row, drop_rate=rate * i / len(plan)) for i, row in enumerate(plan)]


def feature_dim(cfg) -> int:
  """D of the pooled features: the rounded head width."""
  return _round(cfg, option(cfg, 'head_channels'))


def _conv_specs(k: int, c_in: int, c_out: int, *, fan_out: int | None = None,
                bias: bool = False) -> dict:
  return conv.conv_specs(k, c_in, c_out, bias=bias,
                         std=math.sqrt(2.0 / (k * k * (fan_out or c_out))))


def _conv_bn_specs(k: int, c_in: int, c_out: int) -> dict:
  return {'conv': _conv_specs(k, c_in, c_out), 'bn': bn.batch_norm_specs(c_out)}


def mbconv_specs(b: Block, se_ratio: float) -> dict:
  """Parameters of one MBConv block: [expand], depthwise, se {reduce, expand}, project."""
  c_e, c_se = b.c_in * b.expand_ratio, max(1, int(b.c_in * se_ratio))
  specs = {'expand': _conv_bn_specs(1, b.c_in, c_e)} if b.expand_ratio != 1 else {}
  return {**specs,
          'depthwise': {'conv': _conv_specs(b.kernel, 1, c_e, fan_out=1),
                        'bn': bn.batch_norm_specs(c_e)},
          'se': {'reduce': _conv_specs(1, c_e, c_se, bias=True),
                 'expand': _conv_specs(1, c_se, c_e, bias=True)},
          'project': _conv_bn_specs(1, c_e, b.c_out)}


def param_specs(cfg) -> dict:
  """ParamSpecs: 'stem', 'blocks' (a list of mbconv_specs), 'top' (the head conv), and with
  classes 'classifier'; every conv + BN is {'conv': {'w'}, 'bn': {'scale', 'bias'}}."""
  validate(cfg)
  plan = blocks(cfg)
  D = feature_dim(cfg)
  specs = {'stem': _conv_bn_specs(3, option(cfg, 'channels'), _round(cfg, option(cfg,
                                                                           'stem_channels'))),
           'blocks': [mbconv_specs(b, option(cfg, 'se_ratio')) for b in plan],
           'top': _conv_bn_specs(1, plan[-1].c_out, D)}
  if option(cfg, 'num_classes'):
    V = option(cfg, 'num_classes')
    specs['classifier'] = {'w': ps.ParamSpec((D, V), ps.normal(D ** -0.5), ('embed', 'vocab')),
                           'b': ps.ParamSpec((V,), ps.zeros, ('vocab',))}
  return specs


def init_state(cfg) -> dict:
  """Running BN statistics (mean 0, var 1) at the paths of the BN parameters."""
  return bn.init_state_tree(param_specs(cfg))


def _conv_bn(p: dict, s: dict, x_BXYC, *, stride: int = 1, groups: int = 1, bn_args: dict):
  y_BXYC = conv.conv2d(p['conv'], x_BXYC, stride=stride, padding='SAME', groups=groups)
  y_BXYC, s_bn = bn.batch_norm(p['bn'], s['bn'], y_BXYC, **bn_args)
  return y_BXYC, {'bn': s_bn}


def squeeze_excite(p: dict, h_BXYC: jax.Array) -> jax.Array:
  """h * sigmoid(W_e swish(W_r mean_XY(h) + b_r) + b_e) (Hu et al. 2018, eqs. 2-4)."""
  z_B11C = h_BXYC.mean(axis=(1, 2), keepdims=True)
  gate_B11C = jax.nn.sigmoid(conv.conv2d(p['expand'], jax.nn.silu(conv.conv2d(p['reduce'],
                                                                             z_B11C))))
  return h_BXYC * gate_B11C


def drop_path(x_BXYC: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth per example: x keep_B / (1 - rate), keep_B ~ Bernoulli(1 - rate); x itself
  when rng is None or rate == 0 (evaluation)."""
  if rng is None or rate == 0.0:
    return x_BXYC
  keep_B = jax.random.bernoulli(rng, 1.0 - rate, (x_BXYC.shape[0],))
  return jnp.where(keep_B[:, None, None, None], x_BXYC / (1.0 - rate), 0.0).astype(x_BXYC.dtype)


def mbconv(p: dict, s: dict, x_BXYC: jax.Array, b: Block, *, train: bool, rng=None,
           momentum: float = 0.99, eps: float = 1e-3):
  """(y_BXYO, new state) of one MBConv block (module docstring); rng drives drop_path when
  train (None: no drop)."""
  bn_args = dict(train=train, momentum=momentum, eps=eps)
  new_s, h = {}, x_BXYC
  if 'expand' in p:
    h, new_s['expand'] = _conv_bn(p['expand'], s['expand'], h, bn_args=bn_args)
    h = jax.nn.silu(h)
  h, new_s['depthwise'] = _conv_bn(p['depthwise'], s['depthwise'], h, stride=b.stride,
                                   groups=h.shape[-1], bn_args=bn_args)
  h = squeeze_excite(p['se'], jax.nn.silu(h))
  h, new_s['project'] = _conv_bn(p['project'], s['project'], h, bn_args=bn_args)
  if b.skip:
    h = x_BXYC + drop_path(h, b.drop_rate, rng if train else None)
  return h, new_s


def _needs_rng(cfg) -> bool:
  return (option(cfg, 'drop_connect_rate') > 0 and any(b.skip for b in blocks(cfg))) or (
      option(cfg, 'dropout') > 0 and option(cfg, 'num_classes') > 0)


def feature_map(cfg, params, state, x_BXYC: jax.Array, *, train: bool, rng=None):
  """(h_BXYD, new_state): the head conv's output before pooling (HF's last_hidden_state)."""
  if x_BXYC.ndim != 4 or x_BXYC.shape[-1] != option(cfg, 'channels'):
    raise ValueError(f'images have shape {x_BXYC.shape}; expected [batch, x, y, '
                     f'{option(cfg, "channels")}] (model.channels, channels-last)')
  if train and rng is None and _needs_rng(cfg):
    raise ValueError('efficientnet forward with train=True and rng=None; expected a key for '
                     'stochastic depth / dropout (or set their rates to 0)')
  bn_args = dict(train=train, momentum=option(cfg, 'bn_momentum'), eps=option(cfg, 'bn_eps'))
  h, stem_state = _conv_bn(params['stem'], state['stem'], x_BXYC, stride=2, bn_args=bn_args)
  h = jax.nn.silu(h)
  new_state = {'stem': stem_state, 'blocks': []}
  for i, (b, p, s) in enumerate(zip(blocks(cfg), params['blocks'], state['blocks'])):
    key = jax.random.fold_in(rng, i) if train and rng is not None else None
    h, s_new = mbconv(p, s, h, b, rng=key, **bn_args)
    h = constrain(h, ('batch', None, None, 'act_embed'))
    new_state['blocks'].append(s_new)
  h, new_state['top'] = _conv_bn(params['top'], state['top'], h, bn_args=bn_args)
  return jax.nn.silu(h), new_state


def forward(cfg, params, state, x_BXYC: jax.Array, *, train: bool, rng=None):
  """(out, new_state): logits_BV when model.num_classes, else the pooled features_BD, D =
  feature_dim(cfg). With train, rng drives stochastic depth and the classifier's dropout."""
  h_BXYD, new_state = feature_map(cfg, params, state, x_BXYC, train=train, rng=rng)
  features_BD = h_BXYD.mean(axis=(1, 2))
  if not option(cfg, 'num_classes'):
    return features_BD, new_state
  key = jax.random.fold_in(rng, len(params['blocks'])) if train and rng is not None else None
  features_BD = dropout_fn(features_BD, option(cfg, 'dropout'), key)
  return features_BD @ params['classifier']['w'] + params['classifier']['b'], new_state
