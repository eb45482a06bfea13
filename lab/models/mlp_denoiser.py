"""Residual-MLP denoiser for low-dimensional data x_BC (2-D toy distributions: C = 2).

  h = x W_in + b_in
  depth x:  h = h + W2 dropout(SiLU(LN(h) W1 + b1 + SiLU(c) We + be)) + b2
  y = LN(h) W_out + b_out,   W_out, b_out zero-initialised (an untrained network outputs zeros)
with pre-norm residual blocks (Xiong et al. 2020) and the conditioning c_BD added inside each
block as ADM adds its embedding (Ho et al. 2020, appendix B). c_BD = MLP(sinusoidal(noise_B))
(+ label embedding), both of width D (lab.nn.timestep_embedding). Blocks are stacked on a
leading `layers` axis and run with `lax.scan`.

Config fields (`cfg` is `config.model`): channels (C), width (D, even), depth; optional:
num_classes (0: unconditional; the label value num_classes is the null label), dropout (0.0),
noise_max_period (10000.0); their defaults and checks live in lab.models.denoiser_options.
"""
from __future__ import annotations

import jax

from lab.config import require
from lab.models.denoiser_options import option, validate_common
from lab.nn import norms
from lab.nn import param_spec as ps
from lab.nn import timestep_embedding as temb
from lab.nn.dropout import dropout

def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network."""
  for key in ('channels', 'width', 'depth'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  require(cfg.width % 2 == 0, f'model.width={cfg.width}; expected an even number (it is the '
          'sinusoidal noise-embedding width)')
  validate_common(cfg, attention=False)


def param_specs(cfg) -> dict:
  """ParamSpecs; LeCun normal weights, zero biases, zero output layer."""
  validate(cfg)
  C, D = cfg.channels, cfg.width
  dense = lambda n_in, n_out: ps.ParamSpec((n_in, n_out), ps.normal(n_in ** -0.5),
                                           (None, 'embed'))
  vector = lambda init: ps.ParamSpec((D,), init, ('embed',))
  block = {'norm_scale': vector(ps.ones), 'norm_bias': vector(ps.zeros),
           'w1': dense(D, D), 'b1': vector(ps.zeros), 'we': dense(D, D), 'be': vector(ps.zeros),
           'w2': dense(D, D), 'b2': vector(ps.zeros)}
  return {'w_in': dense(C, D), 'b_in': vector(ps.zeros),
          'cond': temb.condition_specs(option(cfg, 'num_classes'), D, D),
          'blocks': jax.tree.map(lambda s: ps.stack(s, cfg.depth), block, is_leaf=ps.is_spec),
          'out_norm_scale': vector(ps.ones), 'out_norm_bias': vector(ps.zeros),
          'w_out': ps.ParamSpec((D, C), ps.zeros, ('embed', None)),
          'b_out': ps.ParamSpec((C,), ps.zeros, (None,))}


def block(cfg, p: dict, h_BD: jax.Array, c_BD: jax.Array, rng=None) -> jax.Array:
  """h + W2 dropout(SiLU(LN(h) W1 + b1 + SiLU(c) We + be)) + b2; rng: dropout key or None."""
  u_BD = norms.layer_norm(h_BD, p['norm_scale'], p['norm_bias'])
  u_BD = jax.nn.silu(u_BD @ p['w1'] + p['b1'] + jax.nn.silu(c_BD) @ p['we'] + p['be'])
  return h_BD + dropout(u_BD, option(cfg, 'dropout'), rng) @ p['w2'] + p['b2']


def forward(cfg, params, x_BC: jax.Array, noise_B: jax.Array, labels_B=None, *, rng=None,
            train: bool = False) -> jax.Array:
  """The denoiser output y_BC. noise_B: real noise conditioning c_noise, one per example.
  labels_B: int class labels in [0, num_classes] (num_classes = null) or None (all null;
  required None when unconditional). rng drives dropout when train."""
  if x_BC.ndim != 2 or x_BC.shape[1] != cfg.channels:
    raise ValueError(f'x has shape {x_BC.shape}; expected [batch, {cfg.channels}] '
                     '(model.channels)')
  if noise_B.shape != x_BC.shape[:1]:
    raise ValueError(f'noise has shape {noise_B.shape}; expected [{x_BC.shape[0]}], one level '
                     'per example')
  c_BD = temb.condition(params['cond'], noise_B, labels_B, option(cfg, 'num_classes'),
                        option(cfg, 'noise_max_period'))
  h_BD = x_BC @ params['w_in'] + params['b_in']
  rngs = jax.random.split(rng, cfg.depth) if train and rng is not None else None
  h_BD, _ = jax.lax.scan(lambda h, xs: (block(cfg, xs[0], h, c_BD, xs[1]), None), h_BD,
                         (params['blocks'], rngs))
  h_BD = norms.layer_norm(h_BD, params['out_norm_scale'], params['out_norm_bias'])
  return h_BD @ params['w_out'] + params['b_out']
