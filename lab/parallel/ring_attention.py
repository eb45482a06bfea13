"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers") over a mesh axis.

The sequence is split into n blocks along a mesh axis (e.g. 'seq'): device i holds query block i
and key/value block i. For n steps each device attends its queries to the kv block it holds and
passes that block to the next device (ppermute i -> i+1), so at step s it holds kv block
(i - s) mod n. Partial results merge by the online-softmax rule (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022, §3.1) in log-sum-exp form: with per-block normalised output o_j
and lse_j = log sum_s exp(score_s),
  lse = log(exp(lse_a) + exp(lse_b));   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b,
which after all n blocks is exactly softmax attention over the whole sequence. Causal masking
uses global positions (query i*T + t sees key j*S + s when j*S + s <= i*T + t); blocks wholly in
the future are computed and masked, so causal work is unbalanced across devices (striped or
zig-zag layouts fix that).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def block_attention(q_BTNH, k_BSKH, v_BSKG, mask_TS, softmax_scale: float):
  """(o_BTNG, lse_BTN) in float32 for one query block against one kv block; query head n reads kv
  head n // (N/K). Rows with no visible key give o = 0, lse = -inf.

  This is the jnp stand-in for the per-block flash-attention kernel
  (lab.kernels.flash_attention); to call the kernel here it must also return its log-sum-exp.
  """
  B, T, N, H = q_BTNH.shape
  K, G = k_BSKH.shape[2], v_BSKG.shape[-1]
  q_BTKRH = q_BTNH.reshape(B, T, K, N // K, H)
  s_BKRTS = jnp.einsum('BTKRH,BSKH->BKRTS', q_BTKRH, k_BSKH,
                       preferred_element_type=jnp.float32) * softmax_scale
  s_BKRTS = jnp.where(mask_TS, s_BKRTS, -jnp.inf)
  m_BKRT = jax.lax.stop_gradient(jnp.max(s_BKRTS, axis=-1))
  m_BKRT = jnp.where(jnp.isfinite(m_BKRT), m_BKRT, 0.0)
  p_BKRTS = jnp.exp(s_BKRTS - m_BKRT[..., None])
  l_BKRT = p_BKRTS.sum(-1)
  empty_BKRT = l_BKRT == 0
  l_BKRT = jnp.where(empty_BKRT, 1.0, l_BKRT)
  lse_BKRT = jnp.where(empty_BKRT, -jnp.inf, m_BKRT + jnp.log(l_BKRT))
  o_BTKRG = jnp.einsum('BKRTS,BSKG->BTKRG', p_BKRTS / l_BKRT[..., None], v_BSKG,
                       preferred_element_type=jnp.float32)
  lse_BTN = jnp.moveaxis(lse_BKRT, -1, 1).reshape(B, T, N)
  return o_BTKRG.reshape(B, T, N, G), lse_BTN


def merge(o_BTNG, lse_BTN, o_blk_BTNG, lse_blk_BTN):
  """Online-softmax merge of two normalised partial results; lse_BTN must be finite."""
  new_lse_BTN = jnp.logaddexp(lse_BTN, lse_blk_BTN)
  return (jnp.exp(lse_BTN - new_lse_BTN)[..., None] * o_BTNG
          + jnp.exp(lse_blk_BTN - new_lse_BTN)[..., None] * o_blk_BTNG), new_lse_BTN


def ring_attention(q_BTNH, k_BSKH, v_BSKG, *, axis_name: str, causal: bool,
                   softmax_scale: float | None = None):
  """o_BTNG = softmax(scale q k^T + mask) v over the whole sequence, called inside shard_map with
  q, k, v sharded on their length dim over `axis_name` (in_specs P(None, axis_name)); returns
  this device's query block of the output, in q's dtype. softmax_scale defaults to 1/sqrt(H).
  """
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  if causal and T != S:
    raise ValueError(f'causal ring attention needs equal query and kv blocks, got T={T}, S={S}')
  scale = q_BTNH.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  perm = [(d, (d + 1) % n) for d in range(n)]
  q_pos_T1 = (i * T + jnp.arange(T))[:, None]

  def attend(s, k_BSKH, v_BSKG):
    """Attention to kv block (i - s) mod n, the one this device holds at step s."""
    k_pos_1S = (((i - s) % n) * S + jnp.arange(S))[None, :]
    mask_TS = k_pos_1S <= q_pos_T1 if causal else jnp.ones((T, S), bool)
    return block_attention(q_BTNH, k_BSKH, v_BSKG, mask_TS, scale)

  def step(s, carry):
    k_BSKH, v_BSKG, o_BTNG, lse_BTN = carry
    k_BSKH, v_BSKG = jax.lax.ppermute((k_BSKH, v_BSKG), axis_name, perm)
    return (k_BSKH, v_BSKG, *merge(o_BTNG, lse_BTN, *attend(s, k_BSKH, v_BSKG)))

  # Step 0 is the diagonal block, where every query sees a key, so lse stays finite after it.
  carry = (k_BSKH, v_BSKG, *attend(0, k_BSKH, v_BSKG))
  o_BTNG = jax.lax.fori_loop(1, n, step, carry)[2]
  return o_BTNG.astype(q_BTNH.dtype)
