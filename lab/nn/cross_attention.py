"""Cross-attention: queries from one sequence, keys and values from another (Vaswani et al. 2017,
"Attention Is All You Need", arXiv:1706.03762, sec. 3.2.3, the encoder-decoder attention), the
sub-layer that BLIP's image-grounded text encoder and decoder insert between self-attention and
the feed-forward network of each block (Li et al. 2022, arXiv:2201.12086, sec. 3.1):

  q_n = x Wq_n + bq_n,  k_n = c Wk_n + bk_n,  v_n = c Wv_n + bv_n
  CA(x, c) = concat_n softmax(q_n k_n^T / sqrt(H)) v_n  Wo + bo          (Vaswani et al. eq. 1)

Every query sees every context token (image tokens carry no padding). Attention itself is
lab.kernels.flash_attention.
Letters: B batch, T queries (text tokens) of width D, S context tokens (image tokens) of width W,
N heads of dim H = D / N.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.kernels import flash_attention
from lab.nn import attention
from lab.nn import param_spec as ps


def cross_attention_specs(d_model: int, d_context: int, n_heads: int) -> dict:
  """Parameters: wq_DNH, bq_NH, wk_WNH, bk_NH, wv_WNH, bv_NH, wo_NHD, bo_D; weights normal with
  Glorot's variance 2 / (fan_in + fan_out) (as lab.nn.transformer_encoder), biases zero."""
  if d_model % n_heads:
    raise ValueError(f'n_heads={n_heads} does not divide d_model={d_model}')
  D, W, N, H = d_model, d_context, n_heads, d_model // n_heads
  square, context = ps.normal(D ** -0.5), ps.normal(math.sqrt(2.0 / (W + D)))
  return {'wq': ps.ParamSpec((D, N, H), square, ('embed', 'heads', 'head_dim')),
          'bq': ps.ParamSpec((N, H), ps.zeros, ('heads', 'head_dim')),
          'wk': ps.ParamSpec((W, N, H), context, ('embed', 'heads', 'head_dim')),
          'bk': ps.ParamSpec((N, H), ps.zeros, ('heads', 'head_dim')),
          'wv': ps.ParamSpec((W, N, H), context, ('embed', 'heads', 'head_dim')),
          'bv': ps.ParamSpec((N, H), ps.zeros, ('heads', 'head_dim')),
          'wo': ps.ParamSpec((N, H, D), square, ('heads', 'head_dim', 'embed')),
          'bo': ps.ParamSpec((D,), ps.zeros, ('embed',))}


def cross_attention(p: dict, x_BTD: jax.Array, c_BSW: jax.Array, *,
                    backend: str = 'auto') -> jax.Array:
  """y_BTD = CA(x, c) of the module docstring: text queries x_BTD attend to context c_BSW."""
  if x_BTD.ndim != 3 or c_BSW.ndim != 3 or x_BTD.shape[0] != c_BSW.shape[0]:
    raise ValueError(f'cross_attention: x of shape {x_BTD.shape} and context of shape '
                     f'{c_BSW.shape}; expected [B, T, D] and [B, S, W] with the same B')
  q_BTNH = jnp.einsum('BTD,DNH->BTNH', x_BTD, p['wq']) + p['bq']
  k_BSNH = jnp.einsum('BSW,WNH->BSNH', c_BSW, p['wk']) + p['bk']
  v_BSNH = jnp.einsum('BSW,WNH->BSNH', c_BSW, p['wv']) + p['bv']
  o_BTNH = flash_attention(q_BTNH, k_BSNH, v_BSNH, causal=False, backend=backend)
  return attention.project_out(p, o_BTNH)
