"""The xla backend: the flash-attention algorithm in plain jnp, fused and compiled by XLA.

The same tile math as the Pallas kernels (`tiles.py`; FlashAttention-2, Dao 2023, Algorithms
1-2) without Pallas: the query rows of the N/K heads that share a kv head are stacked into one
[R T, H] block, and keys are folded in by `lax.scan` over chunks of up to 512 (one chunk, i.e.
one fused softmax, when S <= 512). A custom_vjp saves the log-sum-exp instead of the
probabilities and recomputes them chunk by chunk in the backward, so memory grows as
T x chunk rather than T x S in both passes. The grouped heads' dk and dv sum over the stacked
rows by construction.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lab.kernels.flash_attention import tiles

_CHUNK = 512


def attention(q_BTNH, k_BSKH, v_BSKG, *, causal, q_segment_BT, kv_segment_BS, softmax_scale,
              return_lse: bool = False):
  """Grouped-query attention o_BTNG; query head n reads kv head n // (N/K). With return_lse
  also lse_BTN, the row log-sum-exp (-inf for rows with no key); its cotangent enters the
  backward as D - dlse (see pallas.py)."""
  B, T, N, H = q_BTNH.shape
  S, K, G = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKG.shape[-1]
  R = N // K
  spec = tiles.Spec(q_len=T, kv_len=S, block_q=T, block_k=min(_CHUNK, S), causal=causal,
                    scale=float(softmax_scale), segmented=q_segment_BT is not None)
  pad_keys = lambda x: jnp.pad(x, [(0, 0), (0, spec.num_k * spec.block_k - S)]
                               + [(0, 0)] * (x.ndim - 2))
  q_BKQH = q_BTNH.reshape(B, T, K, R, H).transpose(0, 2, 3, 1, 4).reshape(B, K, R * T, H)
  k_BKSH = pad_keys(k_BSKH).transpose(0, 2, 1, 3)
  v_BKSG = pad_keys(v_BSKG).transpose(0, 2, 1, 3)
  segments = None
  if spec.segmented:
    segments = (jnp.tile(q_segment_BT.astype(jnp.int32), (1, R))[:, :, None],
                pad_keys(kv_segment_BS.astype(jnp.int32))[:, None, :])
  o_BKQG, lse_BKQ1 = _flash(q_BKQH, k_BKSH, v_BKSG, segments, spec)
  o_BTNG = o_BKQG.reshape(B, K, R, T, G).transpose(0, 3, 1, 2, 4).reshape(B, T, N, G)
  if not return_lse:
    return o_BTNG
  lse_BTN = lse_BKQ1.reshape(B, K, R, T).transpose(0, 3, 1, 2).reshape(B, T, N)
  return o_BTNG, jnp.where(jnp.isposinf(lse_BTN), -jnp.inf, lse_BTN)


def _chunks(k_SH, v_SG, kv_seg_1S, spec):
  """Scan inputs: (j, k_CH, v_CG, kv_seg_1C) for each key chunk j."""
  n, C = spec.num_k, spec.block_k
  kv_seg_n1C = None if kv_seg_1S is None else kv_seg_1S.reshape(n, C)[:, None, :]
  return jnp.arange(n), k_SH.reshape(n, C, -1), v_SG.reshape(n, C, -1), kv_seg_n1C


def _chunk_scores(q_QH, q_seg_Q1, j, k_CH, kv_seg_1C, spec):
  """s_QC of the stacked query rows (row r T + t is query t) against key chunk j."""
  Q, C = q_QH.shape[0], spec.block_k
  q_pos_Q1 = jax.lax.broadcasted_iota(jnp.int32, (Q, 1), 0) % spec.q_len
  k_pos_1C = j * C + jax.lax.broadcasted_iota(jnp.int32, (1, C), 1)
  mask = tiles.visible(q_pos_Q1, k_pos_1C, q_seg_Q1, kv_seg_1C, **spec.mask_args(True))
  return tiles.scores(q_QH, k_CH, spec.scale, mask)


def _forward_rows(q_QH, k_SH, v_SG, segments, spec):
  """(o_QG, lse_Q1) for one batch row and kv head."""
  q_seg_Q1, kv_seg_1S = segments or (None, None)

  def step(carry, chunk):
    j, k_CH, v_CG, kv_seg_1C = chunk
    s_QC = _chunk_scores(q_QH, q_seg_Q1, j, k_CH, kv_seg_1C, spec)
    return tiles.softmax_update(*carry, s_QC, v_CG), None

  init = tiles.softmax_init(q_QH.shape[0], v_SG.shape[-1])
  carry, _ = jax.lax.scan(step, init, _chunks(k_SH, v_SG, kv_seg_1S, spec))
  o_QG, lse_Q1 = tiles.softmax_finish(*carry)
  return o_QG.astype(q_QH.dtype), lse_Q1


def _backward_rows(q_QH, k_SH, v_SG, segments, do_QG, lse_Q1, delta_Q1, spec):
  """(dq_QH, dk_SH, dv_SG) for one batch row and kv head."""
  q_seg_Q1, kv_seg_1S = segments or (None, None)

  def step(dq_QH, chunk):
    j, k_CH, v_CG, kv_seg_1C = chunk
    s_QC = _chunk_scores(q_QH, q_seg_Q1, j, k_CH, kv_seg_1C, spec)
    p_QC, ds_QC = tiles.probs_and_dscores(s_QC, v_CG, do_QG, lse_Q1, delta_Q1)
    dk_CH = tiles.dot(ds_QC.astype(q_QH.dtype), q_QH, trans_a=True) * spec.scale
    dv_CG = tiles.dot(p_QC.astype(do_QG.dtype), do_QG, trans_a=True)
    return dq_QH + tiles.dot(ds_QC.astype(k_CH.dtype), k_CH), (dk_CH, dv_CG)

  dq_QH = jnp.zeros(q_QH.shape, jnp.float32)
  dq_QH, (dk_nCH, dv_nCG) = jax.lax.scan(step, dq_QH, _chunks(k_SH, v_SG, kv_seg_1S, spec))
  return ((dq_QH * spec.scale).astype(q_QH.dtype), dk_nCH.reshape(k_SH.shape).astype(k_SH.dtype),
          dv_nCG.reshape(v_SG.shape).astype(v_SG.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_BKQH, k_BKSH, v_BKSG, segments, spec):
  return _forward(q_BKQH, k_BKSH, v_BKSG, segments, spec)


def _forward(q_BKQH, k_BKSH, v_BKSG, segments, spec):
  per_head = jax.vmap(functools.partial(_forward_rows, spec=spec), in_axes=(0, 0, 0, None))
  return jax.vmap(per_head)(q_BKQH, k_BKSH, v_BKSG, segments)


def _flash_fwd(q_BKQH, k_BKSH, v_BKSG, segments, spec):
  o_BKQG, lse_BKQ1 = _forward(q_BKQH, k_BKSH, v_BKSG, segments, spec)
  return (o_BKQG, lse_BKQ1), (q_BKQH, k_BKSH, v_BKSG, segments, o_BKQG, lse_BKQ1)


def _flash_bwd(spec, residuals, cotangents):
  q_BKQH, k_BKSH, v_BKSG, segments, o_BKQG, lse_BKQ1 = residuals
  do_BKQG, dlse_BKQ1 = cotangents
  delta_BKQ1 = jnp.sum(o_BKQG.astype(jnp.float32) * do_BKQG.astype(jnp.float32), axis=-1,
                       keepdims=True) - dlse_BKQ1
  per_head = jax.vmap(functools.partial(_backward_rows, spec=spec),
                      in_axes=(0, 0, 0, None, 0, 0, 0))
  dq, dk, dv = jax.vmap(per_head)(q_BKQH, k_BKSH, v_BKSG, segments, do_BKQG, lse_BKQ1,
                                  delta_BKQ1)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
