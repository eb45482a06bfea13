"""Plain softmax attention in jnp: the oracle every other backend is tested against.

o = softmax(scale * q k^T + mask) v   (Vaswani et al. 2017, eq. 1), scores and softmax in at least
float32 (float64 inputs stay float64).
"""
import jax
import jax.numpy as jnp


def attention_mask(T: int, S: int, causal: bool, q_segment_BT, kv_segment_BS):
  """Boolean mask_BTS (or None): causal aligns the T queries to the last T of the S keys."""
  mask = None
  if causal:
    mask = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None]
  if q_segment_BT is not None:
    same_BTS = q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]
    mask = same_BTS if mask is None else mask & same_BTS
  return mask


def attention(q_BTNH, k_BSKH, v_BSKG, *, causal, q_segment_BT, kv_segment_BS, softmax_scale,
              return_lse: bool = False):
  """Grouped-query attention; query head n reads kv head n // (N/K). Rows with no key give 0.
  With return_lse also lse_BTN = log sum_s exp(scaled score) (-inf for rows with no key)."""
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  acc = jnp.promote_types(q_BTNH.dtype, jnp.float32)
  q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
  s_BKRTS = jnp.einsum('BTKRH,BSKH->BKRTS', q_BTKRH, k_BSKH,
                       preferred_element_type=acc) * softmax_scale
  mask_BTS = attention_mask(T, S, causal, q_segment_BT, kv_segment_BS)
  if mask_BTS is not None:
    s_BKRTS = jnp.where(mask_BTS[:, None, None], s_BKRTS, -jnp.inf)
  m_BKRT1 = jax.lax.stop_gradient(jnp.max(s_BKRTS, axis=-1, keepdims=True))
  m_BKRT1 = jnp.where(jnp.isfinite(m_BKRT1), m_BKRT1, 0.0)
  p_BKRTS = jnp.exp(s_BKRTS - m_BKRT1)
  l_BKRT1 = p_BKRTS.sum(-1, keepdims=True)
  p_BKRTS = p_BKRTS / jnp.where(l_BKRT1 == 0, 1.0, l_BKRT1)
  o_BTKRG = jnp.einsum('BKRTS,BSKG->BTKRG', p_BKRTS.astype(v_BSKG.dtype), v_BSKG,
                       preferred_element_type=acc)
  o_BTNG = o_BTKRG.reshape(B, T, N, v_BSKG.shape[-1]).astype(q_BTNH.dtype)
  if not return_lse:
    return o_BTNG
  empty_BKRT1 = l_BKRT1 == 0
  lse_BKRT1 = jnp.where(empty_BKRT1, -jnp.inf,
                        m_BKRT1 + jnp.log(jnp.where(empty_BKRT1, 1.0, l_BKRT1)))
  return o_BTNG, jnp.moveaxis(lse_BKRT1[..., 0], -1, 1).reshape(B, T, N)
