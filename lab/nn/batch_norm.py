"""Batch normalisation (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", arXiv:1502.03167) with explicit running stats.

Train mode (Alg. 1), over every axis but the last, i.e. the m = B X Y values of one channel:
  mu = 1/m sum_i x_i,   sigma^2 = 1/m sum_i (x_i - mu)^2,
  y = scale (x - mu) / sqrt(sigma^2 + eps) + bias,
and the running statistics move towards the batch ones (gradients do not flow into them):
  mean <- momentum mean + (1 - momentum) mu
  var  <- momentum var  + (1 - momentum) m / (m - 1) sigma^2.
Conventions, chosen on purpose:
  * momentum weighs the OLD statistics (flax / Keras / TF convention): torch's momentum=0.1 is
    momentum=0.9 here, TF EfficientNet's 0.99 is 0.99.
  * the running variance takes the unbiased m / (m - 1) sigma^2, as Alg. 2 step 10 of the paper
    and torch.nn.BatchNorm2d do (flax and Keras keep the biased sigma^2).
Eval mode (Alg. 2 step 11) normalises by the running statistics instead.

Statistics are computed in float32 at least (float64 stays float64); the running statistics keep
the dtype they were given. Under `jax.jit` with the batch sharded over mesh axes (e.g. 'data'),
the means over the batch axis are global means (XLA inserts the all-reduce), so this is
synchronised batch norm: every device normalises by the statistics of the whole global batch.

State layout: `init_state_tree(specs)` builds, for a model's ParamSpec tree, the pytree of
running statistics of every entry named 'bn' (made by `batch_norm_specs`), at the same path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.nn import param_spec as ps


def batch_norm_specs(c: int, *, zero_scale: bool = False) -> dict:
  """Parameters scale_C (gamma, ones, or zeros with zero_scale) and bias_C (beta, zeros)."""
  return {'scale': ps.ParamSpec((c,), ps.zeros if zero_scale else ps.ones, ('conv_out',)),
          'bias': ps.ParamSpec((c,), ps.zeros, ('conv_out',))}


def init_batch_norm_state(c: int) -> dict:
  """Running statistics before any update: mean_C = 0, var_C = 1 (float32)."""
  return {'mean': jnp.zeros((c,), jnp.float32), 'var': jnp.ones((c,), jnp.float32)}


def init_state_tree(specs):
  """The running statistics of every 'bn' entry of a ParamSpec tree, at the same path.

  Dicts keep only the keys with a 'bn' somewhere below; lists keep every element (an element
  without one becomes {}) so that indices line up with the parameters.
  """
  if isinstance(specs, dict):
    if 'bn' in specs and set(specs['bn']) == {'scale', 'bias'}:
      rest = init_state_tree({k: v for k, v in specs.items() if k != 'bn'})
      return {'bn': init_batch_norm_state(specs['bn']['scale'].shape[0]), **rest}
    subtrees = {k: init_state_tree(v) for k, v in specs.items()}
    return {k: v for k, v in subtrees.items() if v}
  if isinstance(specs, (list, tuple)):
    subtrees = [init_state_tree(v) for v in specs]
    return subtrees if any(subtrees) else []
  return {}


def batch_norm(p: dict, state: dict, x_BXYC: jax.Array, *, train: bool, momentum: float,
               eps: float) -> tuple[jax.Array, dict]:
  """(y_BXYC, new_state) of the module docstring; y has x's shape and dtype.

  p: {'scale': [C], 'bias': [C]}; state: {'mean': [C], 'var': [C]}. Every axis of x but the last
  is reduced, so x_BC and x_BTC work too. train=False returns `state` unchanged.
  """
  C = x_BXYC.shape[-1]
  if p['scale'].shape != (C,) or state['mean'].shape != (C,):
    raise ValueError(f'batch_norm input has {C} channels but scale has shape {p["scale"].shape} '
                     f'and mean {state["mean"].shape}; expected ({C},)')
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f'batch_norm momentum={momentum}; expected a value in [0, 1]')
  if eps <= 0.0:
    raise ValueError(f'batch_norm eps={eps}; expected > 0')
  x = x_BXYC.astype(jnp.promote_types(x_BXYC.dtype, jnp.float32))
  if train:
    axes = tuple(range(x.ndim - 1))
    m = x.size // C
    if m < 2:
      raise ValueError(f'batch_norm train=True over input of shape {x_BXYC.shape} has m={m} '
                       'value per channel; expected at least 2 (the variance needs them)')
    mean_C = x.mean(axes)
    var_C = jnp.square(x - mean_C).mean(axes)
    old_mean, old_var = state['mean'], state['var']
    new_mean = momentum * old_mean + (1.0 - momentum) * jax.lax.stop_gradient(mean_C)
    new_var = momentum * old_var + (1.0 - momentum) * jax.lax.stop_gradient(var_C) * m / (m - 1)
    new_state = {'mean': new_mean.astype(old_mean.dtype), 'var': new_var.astype(old_var.dtype)}
  else:
    mean_C, var_C = state['mean'].astype(x.dtype), state['var'].astype(x.dtype)
    new_state = state
  y = (x - mean_C) * jax.lax.rsqrt(var_C + eps) * p['scale'].astype(x.dtype)
  return (y + p['bias'].astype(x.dtype)).astype(x_BXYC.dtype), new_state
