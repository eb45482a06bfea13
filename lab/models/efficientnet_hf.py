"""Hugging Face interop for `lab.models.efficientnet`: transformers' EfficientNetModel /
EfficientNetForImageClassification configs and state dicts into our config fields, params and
BN state.

Layout (an optional 'efficientnet.' prefix; torch convs are [O, I, kh, kw], ours [kh, kw, I, O],
so a depthwise [C, 1, k, k] becomes [k, k, 1, C]):
  embeddings.{convolution, batchnorm}                      = stem {conv, bn}
  encoder.blocks.n.expansion.{expand_conv, expand_bn}      = blocks[n].expand
  encoder.blocks.n.depthwise_conv.{depthwise_conv, depthwise_norm} = blocks[n].depthwise
  encoder.blocks.n.squeeze_excite.{reduce, expand}         = blocks[n].se.{reduce, expand}
  encoder.blocks.n.projection.{project_conv, project_bn}   = blocks[n].project
  encoder.{top_conv, top_bn}                               = top
  classifier.{weight [V, D], bias}                         = classifier {w^T, b}
BN {weight, bias} = {scale, bias}, {running_mean, running_var} = state {mean, var}.

Differences from the paper / official code that HF has and this conversion checks or notes:
  * HF pads the stem by (0, 1) and stride-2 depthwise convs by (k//2 - 1, k//2), or by k//2 on
    both sides for the blocks listed in depthwise_padding; that is TF 'SAME' (ours) only when
    each such conv sees an even size (odd for the listed blocks). config_from_hf checks this at
    the HF config's image_size and refuses configs where it fails.
  * HF adds the identity skip only in blocks after the first of a stage; the official code
    adds it whenever stride is 1 and C_in = C_out. They agree unless a stage's first block has
    stride 1 and C_in = C_out, which config_from_hf refuses.
  * HF hands batch_norm_momentum (0.99, TF's convention) to torch's BatchNorm2d, which reads it
    as the weight of the NEW batch (the expansion BN keeps torch's default 0.1), so its
    train-mode statistics differ from TF's. We keep 0.99 as TF's meaning: bn_momentum = 0.99.
    Eval-mode outputs, which these checkpoints are for, are unaffected.
  * HF's drop_connect is elementwise dropout on the branch; ours is per-example stochastic
    depth as in the official code. Both are the identity in eval mode.
"""
from __future__ import annotations

import jax
import numpy as np

from lab.models import efficientnet
from lab.models import efficientnet_scaling as scaling
from lab.nn import param_spec as ps


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding (before, after) of one spatial dim."""
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _check_padding(hf: dict, cfg: dict) -> None:
  """ValueError unless HF's fixed paddings equal TF 'SAME' at hf['image_size']."""
  size = hf['image_size'] if isinstance(hf['image_size'], int) else hf['image_size'][0]
  if _same_pads(size, 3, 2) != (0, 1):
    raise ValueError(f'HF image_size={size}: the stem pads (0, 1), TF SAME pads '
                     f'{_same_pads(size, 3, 2)}; expected an even image size')
  size = -(-size // 2)
  for n, b in enumerate(efficientnet.blocks(cfg)):
    if b.stride == 2:
      hf_pads = (b.kernel // 2,) * 2 if n in hf['depthwise_padding'] else (
          b.kernel // 2 - 1, b.kernel // 2)
      if hf_pads != _same_pads(size, b.kernel, 2):
        raise ValueError(f'HF depthwise_padding={list(hf["depthwise_padding"])}: block {n} '
                         f'pads {hf_pads} at size {size}, TF SAME pads '
                         f'{_same_pads(size, b.kernel, 2)}; expected block {n} '
                         f'{"out of" if n in hf["depthwise_padding"] else "in"} the list')
    size = -(-size // b.stride)


def config_from_hf(hf: dict, num_classes: int = 0) -> dict:
  """Our model fields for an HF EfficientNetConfig.to_dict(); num_classes > 0 adds the
  classifier (with HF's dropout_rate before it)."""
  for key, want in (('hidden_act', ('swish', 'silu')), ('pooling_type', ('mean',))):
    if hf[key] not in want:
      raise ValueError(f'HF config {key}={hf[key]!r} is not supported; expected one of {want}')
  stages = tuple(scaling.Stage(*row) for row in zip(
      hf['kernel_sizes'], hf['strides'], hf['expand_ratios'], hf['in_channels'],
      hf['out_channels'], hf['num_block_repeats']))
  cfg = dict(width_coefficient=float(hf['width_coefficient']),
             depth_coefficient=float(hf['depth_coefficient']), stages=stages,
             stem_channels=scaling.STEM_CHANNELS, head_channels=scaling.HEAD_CHANNELS,
             depth_divisor=hf['depth_divisor'], se_ratio=hf['squeeze_expansion_ratio'],
             drop_connect_rate=float(hf['drop_connect_rate']), dropout=float(hf['dropout_rate']),
             num_classes=num_classes, channels=hf['num_channels'],
             bn_momentum=float(hf['batch_norm_momentum']), bn_eps=float(hf['batch_norm_eps']))
  efficientnet.validate(cfg)
  if hf['hidden_dim'] != efficientnet.feature_dim(cfg):
    raise ValueError(f'HF hidden_dim={hf["hidden_dim"]}; expected round_filters(1280) = '
                     f'{efficientnet.feature_dim(cfg)}, the width of HF\'s own top conv')
  for i, s in enumerate(scaling.scaled_stages(cfg['width_coefficient'], 1.0, stages,
                                              cfg['depth_divisor'])):
    if s.stride == 1 and s.c_in == s.c_out:
      raise ValueError(f'HF stage {i} starts with stride 1 and {s.c_in} = {s.c_out} channels: '
                       'HF omits the identity skip there that the paper adds; expected a '
                       'change of width or stride in every stage\'s first block')
  _check_padding(hf, cfg)
  return cfg


def _units(cfg) -> dict:
  """{our unit path: (HF conv prefix, HF BN prefix)} for every conv + BN unit."""
  units = {('stem',): ('embeddings.convolution', 'embeddings.batchnorm'),
           ('top',): ('encoder.top_conv', 'encoder.top_bn')}
  for n, b in enumerate(efficientnet.blocks(cfg)):
    base = f'encoder.blocks.{n}'
    if b.expand_ratio != 1:
      units[('blocks', n, 'expand')] = (f'{base}.expansion.expand_conv',
                                        f'{base}.expansion.expand_bn')
    units[('blocks', n, 'depthwise')] = (f'{base}.depthwise_conv.depthwise_conv',
                                         f'{base}.depthwise_conv.depthwise_norm')
    units[('blocks', n, 'project')] = (f'{base}.projection.project_conv',
                                       f'{base}.projection.project_bn')
  return units


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(cfg, state_dict: dict) -> tuple[dict, dict]:
  """(params, BN state) of our model from an HF EfficientNet state dict of numpy arrays.

  Every HF tensor must be used (num_batches_tracked aside) and every parameter filled, with
  the shape our param_specs give; anything else is a ValueError naming the key.
  """
  sd = {k.removeprefix('efficientnet.'): np.asarray(v) for k, v in state_dict.items()
        if not k.endswith('num_batches_tracked')}
  specs = efficientnet.param_specs(cfg)
  params = jax.tree.map(lambda s: None, specs, is_leaf=ps.is_spec)
  state = jax.tree.map(lambda s: None, efficientnet.init_state(cfg))
  used = set()

  def take(key):
    if key not in sd:
      raise ValueError(f'HF state dict lacks {key!r}')
    used.add(key)
    return sd[key]

  for path, (conv_prefix, bn_prefix) in _units(cfg).items():
    unit = _at(params, path)
    unit['conv']['w'] = take(f'{conv_prefix}.weight').transpose(2, 3, 1, 0)
    unit['bn'] = {'scale': take(f'{bn_prefix}.weight'), 'bias': take(f'{bn_prefix}.bias')}
    _at(state, path)['bn'] = {'mean': take(f'{bn_prefix}.running_mean'),
                              'var': take(f'{bn_prefix}.running_var')}
  for n, p in enumerate(params['blocks']):
    for name in ('reduce', 'expand'):
      prefix = f'encoder.blocks.{n}.squeeze_excite.{name}'
      p['se'][name] = {'w': take(f'{prefix}.weight').transpose(2, 3, 1, 0),
                       'b': take(f'{prefix}.bias')}
  if 'classifier' in specs:
    params['classifier'] = {'w': take('classifier.weight').T, 'b': take('classifier.bias')}
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f'HF state dict has tensors {unused[:4]} that the model config does not '
                     'use')
  for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=ps.is_spec):
    got = _at(params, [k.key if hasattr(k, 'key') else k.idx for k in path])
    if got is None or got.shape != spec.shape:
      raise ValueError(f'param {jax.tree_util.keystr(path)} got shape '
                       f'{None if got is None else got.shape}; expected {spec.shape}')
  return params, state
