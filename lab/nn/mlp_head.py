"""MLP heads of self-supervised methods: projectors and predictors as a list of layers.

Each layer is y = act(BN(x W + b)), every part optional, so one description covers the papers'
heads (widths are arguments; the defaults below are the papers'):
  SimCLR v2 projector   [Linear-BN-ReLU] x (n-1), Linear-BN        (Chen et al. 2020b)
  MoCo v2 projector     Linear-ReLU, Linear                          (Chen et al. 2020c)
  BYOL projector and predictor  Linear(4096)-BN-ReLU, Linear(256)    (Grill et al. 2020, 3.3)
  SimSiam projector     [Linear-BN-ReLU] x 2, Linear-BN; predictor Linear(512)-BN-ReLU, Linear
                                                                    (Chen & He 2021, sec. 4)
  MoCo v3 projector / predictor  ... with a final BN without affine  (Chen, Xie & He 2021)
  DINO head             Linear-GELU, Linear-GELU, Linear(256)        (Caron et al. 2021, 3.1)
Batch-norm statistics are explicit state (lab.nn.batch_norm); a BN without affine parameters
normalises only. A layer: {'w': w_DF, 'b': b_F (bias), 'bn': {scale, bias} (bn_affine)}.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from lab.nn import batch_norm as bn
from lab.nn import param_spec as ps

ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': lambda x: jax.nn.gelu(x, approximate=False),
               None: lambda x: x}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One dense layer of a head: output width, bias, batch norm (with or without affine) and the
  activation after it ('relu', 'gelu' or None)."""
  width: int
  bias: bool = True
  bn: bool = False
  bn_affine: bool = True
  act: str | None = 'relu'

  def __post_init__(self):
    if self.width < 1:
      raise ValueError(f'head layer width={self.width}; expected a positive integer')
    if self.act not in ACTIVATIONS:
      raise ValueError(f'head layer act={self.act!r}; expected one of {tuple(ACTIVATIONS)}')


def layers(widths: Sequence[int], *, bn_hidden: bool, bn_last: bool = False,
           last_affine: bool = True, act: str = 'relu') -> tuple[Layer, ...]:
  """The usual head: hidden layers Linear(-BN)-act, a last Linear(-BN) without activation.
  Linear layers followed by BN have no bias (it would be cancelled by the mean)."""
  *hidden, last = widths
  return (*(Layer(w, bias=not bn_hidden, bn=bn_hidden, act=act) for w in hidden),
          Layer(last, bias=not bn_last, bn=bn_last, bn_affine=last_affine, act=None))


def head_specs(d_in: int, spec: Sequence[Layer]) -> list[dict]:
  """ParamSpecs of a head: LeCun-normal weights (std 1 / sqrt(fan_in)), zero biases, BN affine
  parameters where the layer has them."""
  out, fan_in = [], d_in
  for layer in spec:
    p = {'w': ps.ParamSpec((fan_in, layer.width), ps.normal(1.0 / math.sqrt(fan_in)),
                           ('embed', 'mlp'))}
    if layer.bias:
      p['b'] = ps.ParamSpec((layer.width,), ps.zeros, ('mlp',))
    if layer.bn and layer.bn_affine:
      p['bn'] = bn.batch_norm_specs(layer.width)
    out.append(p)
    fan_in = layer.width
  return out


def init_head_state(spec: Sequence[Layer]) -> list[dict]:
  """Running statistics of every BN layer ({} for the others), aligned with head_specs."""
  return [{'bn': bn.init_batch_norm_state(l.width)} if l.bn else {} for l in spec]


def head(p: list[dict], state: list[dict], spec: Sequence[Layer], x_BD: jax.Array, *,
         train: bool, momentum: float = 0.9, eps: float = 1e-5):
  """(y_BF, new_state): the layers in order, y = act(BN(x W + b))."""
  if len(p) != len(spec) or len(state) != len(spec):
    raise ValueError(f'head of {len(spec)} layers got {len(p)} parameter and {len(state)} state '
                     'entries; expected one of each per layer')
  new_state = []
  for layer, q, s in zip(spec, p, state):
    x_BD = jnp.einsum('BD,DF->BF', x_BD, q['w'].astype(x_BD.dtype))
    if layer.bias:
      x_BD = x_BD + q['b'].astype(x_BD.dtype)
    if layer.bn:
      affine = q.get('bn') or {'scale': jnp.ones((layer.width,), x_BD.dtype),
                               'bias': jnp.zeros((layer.width,), x_BD.dtype)}
      x_BD, bn_state = bn.batch_norm(affine, s['bn'], x_BD, train=train, momentum=momentum,
                                     eps=eps)
      s = {'bn': bn_state}
    new_state.append(s)
    x_BD = ACTIVATIONS[layer.act](x_BD)
  return x_BD, new_state
