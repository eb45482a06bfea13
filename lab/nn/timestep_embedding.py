"""Conditioning vectors of the denoisers: the noise level (sinusoidal features + MLP) and the class
label (an embedding table with a null row for classifier-free guidance).

The noise level is any real number c_noise (a timestep in [0, 1000), 0.25 ln sigma, ...). Its
features are the Transformer positional encoding (Vaswani et al. 2017, sec. 3.5) at a real
position, as DDPM (Ho et al. 2020, appendix B) embeds timesteps; the layout is ADM's and DiT's:
  f_k = max_period^(-k / h),  k = 0 .. h - 1,  h = dim / 2,
  emb(t) = [cos(t f_0) .. cos(t f_{h-1}), sin(t f_0) .. sin(t f_{h-1})],
then emb -> Linear -> SiLU -> Linear (ADM's `time_embed`, DiT's `TimestepEmbedder`).
"""
import math

import jax
import jax.numpy as jnp

from lab.nn import param_spec as ps


def sinusoidal(noise_B: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """emb_BF (F = dim, even) of the formula above, in float32 (float64 stays float64)."""
  if dim < 2 or dim % 2:
    raise ValueError(f'sinusoidal embedding dim={dim}; expected a positive even number')
  if noise_B.ndim != 1:
    raise ValueError(f'noise has shape {noise_B.shape}; expected one level per example [batch]')
  t_B = noise_B.astype(jnp.promote_types(noise_B.dtype, jnp.float32))
  freqs_h = jnp.exp(-math.log(max_period) * jnp.arange(dim // 2, dtype=t_B.dtype) / (dim // 2))
  args_Bh = t_B[:, None] * freqs_h
  return jnp.concatenate([jnp.cos(args_Bh), jnp.sin(args_Bh)], axis=-1)


def mlp_specs(freq_dim: int, width: int) -> dict:
  """Parameters of Linear(freq_dim -> width) -> SiLU -> Linear(width -> width), LeCun normal."""
  F, D = freq_dim, width
  return {'w1': ps.ParamSpec((F, D), ps.normal(F ** -0.5), (None, 'embed')),
          'b1': ps.ParamSpec((D,), ps.zeros, ('embed',)),
          'w2': ps.ParamSpec((D, D), ps.normal(D ** -0.5), (None, 'embed')),
          'b2': ps.ParamSpec((D,), ps.zeros, ('embed',))}


def embed_noise(p: dict, noise_B: jax.Array, max_period: float) -> jax.Array:
  """emb_BD = SiLU(sinusoidal(noise_B) W1 + b1) W2 + b2; the feature dim is W1's first dim."""
  emb_BF = sinusoidal(noise_B, p['w1'].shape[0], max_period).astype(p['w1'].dtype)
  h_BD = jax.nn.silu(emb_BF @ p['w1'] + p['b1'])
  return h_BD @ p['w2'] + p['b2']


def label_specs(num_classes: int, width: int, std: float = 0.02) -> ps.ParamSpec:
  """The label table_VD with num_classes + 1 rows; row num_classes is the null label."""
  return ps.ParamSpec((num_classes + 1, width), ps.normal(std), (None, 'embed'))


def embed_labels(table_VD: jax.Array, labels_B: jax.Array | None, batch: int) -> jax.Array:
  """emb_BD = table[labels_B]; labels_B=None means every example gets the null label (the last
  row). Labels are int in [0, num_classes]; the value num_classes is the null label."""
  null = table_VD.shape[0] - 1
  if labels_B is None:
    return jnp.broadcast_to(table_VD[null], (batch, table_VD.shape[1]))
  if labels_B.shape != (batch,) or not jnp.issubdtype(labels_B.dtype, jnp.integer):
    raise ValueError(f'labels have shape {labels_B.shape} and dtype {labels_B.dtype}; expected '
                     f'int [{batch}] with values in [0, {null}] ({null} = no label)')
  return table_VD[labels_B]


def condition(p: dict, noise_B: jax.Array, labels_B: jax.Array | None, num_classes: int,
              max_period: float) -> jax.Array:
  """c_BD = embed_noise(noise_B) (+ embed_labels(labels_B) when num_classes > 0), the vector that
  ADM and DiT (c = t + y) condition every block on. p holds 'noise' (mlp_specs) and, for
  class-conditional models, 'labels' (label_specs)."""
  emb_BD = embed_noise(p['noise'], noise_B, max_period)
  if num_classes == 0:
    if labels_B is not None:
      raise ValueError('labels were given to an unconditional model (model.num_classes=0); '
                       'expected labels=None')
    return emb_BD
  return emb_BD + embed_labels(p['labels'], labels_B, noise_B.shape[0]).astype(emb_BD.dtype)


def condition_specs(num_classes: int, freq_dim: int, width: int) -> dict:
  """Parameters of `condition`."""
  specs = {'noise': mlp_specs(freq_dim, width)}
  if num_classes:
    specs['labels'] = label_specs(num_classes, width)
  return specs
