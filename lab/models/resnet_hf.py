"""Hugging Face interop for `lab.models.resnet`: transformers' ResNetModel /
ResNetForImageClassification configs and state dicts into our config fields, params and BN state.

Layout (an optional 'resnet.' prefix; torch convs are [O, I, kh, kw], ours [kh, kw, I, O]):
  embedder.embedder.{convolution, normalization}         = stem {conv, bn}
  encoder.stages.i.layers.j.layer.k.{convolution, normalization} = stages[i][j].conv{k+1}
  encoder.stages.i.layers.j.shortcut.{convolution, normalization} = stages[i][j].proj
  normalization.{weight, bias} = bn {scale, bias}; {running_mean, running_var} = state bn
  {mean, var}; num_batches_tracked is dropped.
  classifier.1.{weight [V, D], bias} = classifier {w^T, b} (ResNetForImageClassification).
HF's torch BatchNorm2d uses torch's momentum 0.1 and eps 1e-5: bn_momentum 0.9 here (our
momentum weighs the old statistics), so train-mode updates match torch's too. HF ResNets with
downsample_in_bottleneck (v1) or downsample_in_first_stage, or hidden sizes that are not
EXPANSION * embedding_size * 2^i, are not this model and are refused.
"""
from __future__ import annotations

import jax
import numpy as np

from lab.models import resnet
from lab.nn import param_spec as ps


def config_from_hf(hf: dict, num_classes: int = 0) -> dict:
  """Our model fields for an HF ResNetConfig.to_dict(); num_classes > 0 adds the classifier."""
  block = hf['layer_type']
  if block not in resnet.EXPANSION:
    raise ValueError(f'HF layer_type={block!r}; expected one of {tuple(resnet.EXPANSION)}')
  for key, want in (('hidden_act', 'relu'), ('downsample_in_first_stage', False),
                    ('downsample_in_bottleneck', False)):
    if hf.get(key, want) != want:
      raise ValueError(f'HF config {key}={hf[key]!r} is not supported; expected {want!r} '
                       '(ResNet v1.5)')
  width = hf['embedding_size']
  want = [resnet.EXPANSION[block] * width * 2 ** i for i in range(len(hf['depths']))]
  if list(hf['hidden_sizes']) != want:
    raise ValueError(f'HF hidden_sizes={list(hf["hidden_sizes"])}; expected {want} '
                     f'(EXPANSION * embedding_size={width} * 2^stage)')
  return dict(stage_depths=tuple(hf['depths']), block=block, width=width, stem='imagenet',
              channels=hf['num_channels'], num_classes=num_classes, bn_momentum=0.9,
              bn_eps=1e-5)


def _hf_unit_prefixes(cfg) -> dict:
  """{our unit path: HF module prefix} for every conv + BN unit."""
  block, depths = resnet.architecture(cfg)
  units = {('stem',): 'embedder.embedder'}
  for i, n in enumerate(depths):
    for j in range(n):
      base = f'encoder.stages.{i}.layers.{j}'
      for k in range(3 if block == 'bottleneck' else 2):
        units[('stages', i, j, f'conv{k + 1}')] = f'{base}.layer.{k}'
      units[('stages', i, j, 'proj')] = f'{base}.shortcut'
  return units


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(cfg, state_dict: dict) -> tuple[dict, dict]:
  """(params, BN state) of our model from an HF ResNet state dict of numpy arrays.

  Every HF tensor must be used (num_batches_tracked aside) and every parameter filled, with
  the shape our param_specs give; anything else is a ValueError naming the key.
  """
  sd = {k.removeprefix('resnet.'): np.asarray(v) for k, v in state_dict.items()
        if not k.endswith('num_batches_tracked')}
  specs = resnet.param_specs(cfg)
  params = jax.tree.map(lambda s: None, specs, is_leaf=ps.is_spec)
  state = jax.tree.map(lambda s: None, resnet.init_state(cfg))
  used = set()

  def take(key):
    if key not in sd:
      raise ValueError(f'HF state dict lacks {key!r}')
    used.add(key)
    return sd[key]

  for path, prefix in _hf_unit_prefixes(cfg).items():
    try:
      unit = _at(params, path)
    except KeyError:  # blocks without a projection shortcut
      continue
    unit['conv']['w'] = take(f'{prefix}.convolution.weight').transpose(2, 3, 1, 0)
    unit['bn'] = {'scale': take(f'{prefix}.normalization.weight'),
                  'bias': take(f'{prefix}.normalization.bias')}
    _at(state, path)['bn'] = {'mean': take(f'{prefix}.normalization.running_mean'),
                              'var': take(f'{prefix}.normalization.running_var')}
  if 'classifier' in specs:
    params['classifier'] = {'w': take('classifier.1.weight').T, 'b': take('classifier.1.bias')}
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f'HF state dict has tensors {unused[:4]} that model config {dict(cfg)} '
                     'does not use')
  for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=ps.is_spec):
    got = _at(params, [k.key if hasattr(k, 'key') else k.idx for k in path])
    if got is None or got.shape != spec.shape:
      raise ValueError(f'param {jax.tree_util.keystr(path)} got shape '
                       f'{None if got is None else got.shape}; expected {spec.shape}')
  return params, state
