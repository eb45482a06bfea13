"""Attention of a block of new tokens against a KV cache, for speculative decoding.

A block of T new tokens attends to the cache's filled entries 0..length-1 and, among
themselves, to whatever a mask allows: the causal chain (chunked prefill), or the ancestor mask
of a tree of candidates (Medusa, Cai et al. 2024, sec. 2.1.2 "tree attention"). A tree mask is
not a causal or segment mask over the whole key range, so the two key sets are attended
separately, each through `lab.kernels.flash_attention`, and merged by their log-sum-exps.
The new keys and values are written at length..length+T-1 without advancing the length;
`compact` keeps the accepted ones. Any attention that can be written as (q, k, v) with grouped
kv heads fits: the decoder's GQA and MLA's absorbed form (one shared latent key and value).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.kernels import flash_attention


def merge_attention(o1_BTNG, lse1_BTN, o2_BTNG, lse2_BTN):
  """Softmax attention over the union of two disjoint key sets from each set's normalised output
  and row log-sum-exp (the rescaling flash attention does between key blocks, Dao et al. 2022,
  Alg. 1 line 12): o = sum_i exp(lse_i - lse) o_i with lse = log(exp(lse_1) + exp(lse_2))."""
  lse_BTN = jnp.logaddexp(lse1_BTN, lse2_BTN)
  w1_BTN1 = jnp.exp(lse1_BTN - lse_BTN)[..., None]
  w2_BTN1 = jnp.exp(lse2_BTN - lse_BTN)[..., None]
  o_BTNG = w1_BTN1 * o1_BTNG.astype(jnp.float32) + w2_BTN1 * o2_BTNG.astype(jnp.float32)
  return o_BTNG.astype(o1_BTNG.dtype)


def masked_block_attention(q_BTNH, k_BTKH, v_BTKG, mask_BTT, *, backend: str,
                           softmax_scale: float | None = None):
  """(o_BTNG, lse_BTN) of T queries over the block's own T keys under an arbitrary boolean mask:
  each query becomes its own batch row whose kv segment ids are its mask row (1 = visible), so
  the block's keys are copied T times (T^2 K H elements: small for speculative trees)."""
  B, T, N, H = q_BTNH.shape
  rows = lambda x_BTKX: jnp.broadcast_to(x_BTKX[:, None], (B, T, *x_BTKX.shape[1:])).reshape(
      B * T, *x_BTKX.shape[1:])
  q_seg = jnp.ones((B * T, 1), jnp.int32)
  kv_seg = mask_BTT.reshape(B * T, T).astype(jnp.int32)
  o, lse = flash_attention(q_BTNH.reshape(B * T, 1, N, H), rows(k_BTKH), rows(v_BTKG),
                           segment_ids=(q_seg, kv_seg), softmax_scale=softmax_scale,
                           backend=backend, return_lse=True)
  return o.reshape(B, T, N, v_BTKG.shape[3]), lse.reshape(B, T, N)


def extend_attention(q_BTNH, k_BTKH, v_BTKG, k_cache_BSKH, v_cache_BSKG, length, mask_BTT, *,
                     backend: str, softmax_scale: float | None = None):
  """(o_BTNG, k_cache, v_cache): T new queries over the cache's entries 0..length-1 and the new
  block's keys (mask_BTT: True = visible, each token must see itself; None = causal), with the
  new keys and values written at length..length+T-1 of the caches (length is traced, so the
  caller keeps length + T <= S: the write would be clamped otherwise)."""
  B, T = q_BTNH.shape[:2]
  S = k_cache_BSKH.shape[1]
  if T > S:
    raise ValueError(f'{T} new tokens do not fit a cache of {S} entries')
  if mask_BTT is not None and mask_BTT.shape != (B, T, T):
    raise ValueError(f'mask_BTT shape {mask_BTT.shape}; expected {(B, T, T)}')
  q_seg_BT = jnp.ones((B, T), jnp.int32)
  kv_seg_BS = jnp.broadcast_to((jnp.arange(S) < length).astype(jnp.int32), (B, S))
  o_old, lse_old = flash_attention(q_BTNH, k_cache_BSKH, v_cache_BSKG,
                                   segment_ids=(q_seg_BT, kv_seg_BS), softmax_scale=softmax_scale,
                                   backend=backend, return_lse=True)
  k_BTKH, v_BTKG = k_BTKH.astype(k_cache_BSKH.dtype), v_BTKG.astype(v_cache_BSKG.dtype)
  if mask_BTT is None:
    o_new, lse_new = flash_attention(q_BTNH, k_BTKH, v_BTKG, causal=True,
                                     softmax_scale=softmax_scale, backend=backend,
                                     return_lse=True)
  else:
    o_new, lse_new = masked_block_attention(q_BTNH, k_BTKH, v_BTKG, mask_BTT, backend=backend,
                                            softmax_scale=softmax_scale)
  k_cache_BSKH = jax.lax.dynamic_update_slice_in_dim(k_cache_BSKH, k_BTKH, length, 1)
  v_cache_BSKG = jax.lax.dynamic_update_slice_in_dim(v_cache_BSKG, v_BTKG, length, 1)
  return merge_attention(o_old, lse_old, o_new, lse_new), k_cache_BSKH, v_cache_BSKG


def compact(x_LBS: jax.Array, length, index_BA: jax.Array) -> jax.Array:
  """Moves cache entries x[:, b, length + index_BA[b, a]] to x[:, b, length + a] for a stacked
  cache x_LBS... (layers, batch, slots, any trailing dims), as Medusa keeps the accepted path's
  keys and values; the caller then advances the length by the accepted count (<= A) and keeps
  length + A <= S."""
  src_LBA = (length + index_BA)[None].reshape(1, *index_BA.shape, *([1] * (x_LBS.ndim - 3)))
  kept_LBA = jnp.take_along_axis(x_LBS, src_LBA, axis=2)
  return jax.lax.dynamic_update_slice_in_dim(x_LBS, kept_LBA, length, 2)
