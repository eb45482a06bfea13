"""Multi-head attention with grouped kv heads (GQA, Ainslie et al. 2023): projections and output.

Attention itself is `lab.kernels.flash_attention`; this file only holds the parameters and the
einsum projections around it, so every backend drops in behind one call.
"""
import jax
import jax.numpy as jnp

from lab.nn import param_spec as ps


def attention_specs(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool,
                    std: float, out_std: float) -> dict:
  """Parameters: wq_DNH, wk_DKH, wv_DKH, wo_NHD (+ biases bq_NH, bk_KH, bv_KH, bo_D)."""
  D, N, K, H = d_model, n_heads, n_kv_heads, head_dim
  specs = {
      'wq': ps.ParamSpec((D, N, H), ps.normal(std), ('embed', 'heads', 'head_dim')),
      'wk': ps.ParamSpec((D, K, H), ps.normal(std), ('embed', 'kv_heads', 'head_dim')),
      'wv': ps.ParamSpec((D, K, H), ps.normal(std), ('embed', 'kv_heads', 'head_dim')),
      'wo': ps.ParamSpec((N, H, D), ps.normal(out_std), ('heads', 'head_dim', 'embed')),
  }
  if bias:
    specs |= {
        'bq': ps.ParamSpec((N, H), ps.zeros, ('heads', 'head_dim')),
        'bk': ps.ParamSpec((K, H), ps.zeros, ('kv_heads', 'head_dim')),
        'bv': ps.ParamSpec((K, H), ps.zeros, ('kv_heads', 'head_dim')),
        'bo': ps.ParamSpec((D,), ps.zeros, ('embed',)),
    }
  return specs


def project_qkv(p: dict, x_BTD: jax.Array):
  """q_BTNH = x Wq (+bq), k_BTKH = x Wk (+bk), v_BTKH = x Wv (+bv)."""
  q_BTNH = jnp.einsum('BTD,DNH->BTNH', x_BTD, p['wq'])
  k_BTKH = jnp.einsum('BTD,DKH->BTKH', x_BTD, p['wk'])
  v_BTKH = jnp.einsum('BTD,DKH->BTKH', x_BTD, p['wv'])
  if 'bq' in p:
    q_BTNH, k_BTKH, v_BTKH = q_BTNH + p['bq'], k_BTKH + p['bk'], v_BTKH + p['bv']
  return q_BTNH, k_BTKH, v_BTKH


def project_out(p: dict, o_BTNH: jax.Array) -> jax.Array:
  """y_BTD = concat_heads(o) Wo (+bo)."""
  y_BTD = jnp.einsum('BTNH,NHD->BTD', o_BTNH, p['wo'])
  return y_BTD + p['bo'] if 'bo' in p else y_BTD
