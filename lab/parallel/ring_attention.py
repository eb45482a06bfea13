"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers") over a mesh axis.

The sequence is split into n blocks along a mesh axis (e.g. 'seq'): device i holds query block i
and key/value block i. For n steps each device attends its queries to the kv block it holds and
passes that block to the next device (ppermute i -> i+1), so at step s it holds kv block
(i - s) mod n. Partial results merge by the online-softmax rule (Milakov & Gimelshein 2018;
FlashAttention, Dao et al. 2022, §3.1) in log-sum-exp form: with per-block normalised output o_j
and lse_j = log sum_s exp(score_s),
  lse = log(exp(lse_a) + exp(lse_b));   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b,
which after all n blocks is exactly softmax attention over the whole sequence. Each block is one
call of lab.kernels.flash_attention with return_lse=True, so the per-block work runs in our
kernels (backend as configured) and gradients flow through both o and lse. With causal masking
(global positions: query i*T + t sees key j*S + s when j*S + s <= i*T + t) the block a device
holds is its own diagonal block (causal), a past block (no mask) or a future block (skipped:
o = 0, lse = -inf); causal work is therefore unbalanced across devices (striped or zig-zag
layouts fix that).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.kernels import flash_attention


def merge(o_BTNG, lse_BTN, o_blk_BTNG, lse_blk_BTN):
  """Online-softmax merge of two normalised partial results (float32); lse_BTN must be finite,
  lse_blk_BTN may be -inf (a skipped block adds nothing)."""
  new_lse_BTN = jnp.logaddexp(lse_BTN, lse_blk_BTN)
  return (jnp.exp(lse_BTN - new_lse_BTN)[..., None] * o_BTNG
          + jnp.exp(lse_blk_BTN - new_lse_BTN)[..., None] * o_blk_BTNG), new_lse_BTN


def ring_attention(q_BTNH, k_BSKH, v_BSKG, *, axis_name: str, causal: bool,
                   softmax_scale: float | None = None, backend: str = 'auto'):
  """o_BTNG = softmax(scale q k^T + mask) v over the whole sequence, called inside shard_map with
  q, k, v sharded on their length dim over `axis_name` (in_specs P(None, axis_name)); returns
  this device's query block of the output, in q's dtype. softmax_scale defaults to 1/sqrt(H);
  backend is the flash_attention backend each block runs on. The kernels do not annotate which
  mesh axes their values vary over, so the shard_map needs check_vma=False.
  """
  T, S = q_BTNH.shape[1], k_BSKH.shape[1]
  if causal and T != S:
    raise ValueError(f'causal ring attention needs equal query and kv blocks, got T={T}, S={S}')
  scale = q_BTNH.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  perm = [(d, (d + 1) % n) for d in range(n)]

  def block(k_BSKH, v_BSKG, diagonal: bool):
    o_BTNG, lse_BTN = flash_attention(q_BTNH, k_BSKH, v_BSKG, causal=diagonal,
                                      softmax_scale=scale, backend=backend, return_lse=True)
    return o_BTNG.astype(jnp.float32), lse_BTN

  def skipped(k_BSKH, v_BSKG):
    B, _, N, _ = q_BTNH.shape
    return (jnp.zeros((B, T, N, v_BSKG.shape[-1]), jnp.float32),
            jnp.full((B, T, N), -jnp.inf, jnp.float32))

  def step(s, carry):
    """Attention to kv block (i - s) mod n, the one this device holds at step s >= 1."""
    k_BSKH, v_BSKG, o_BTNG, lse_BTN = carry
    k_BSKH, v_BSKG = jax.lax.ppermute((k_BSKH, v_BSKG), axis_name, perm)
    if causal:
      o_blk, lse_blk = jax.lax.cond((i - s) % n < i, lambda k, v: block(k, v, False), skipped,
                                    k_BSKH, v_BSKG)
    else:
      o_blk, lse_blk = block(k_BSKH, v_BSKG, False)
    return (k_BSKH, v_BSKG, *merge(o_BTNG, lse_BTN, o_blk, lse_blk))

  # Step 0 is the diagonal block, where every query sees a key, so lse stays finite after it.
  carry = (k_BSKH, v_BSKG, *block(k_BSKH, v_BSKG, causal))
  o_BTNG = jax.lax.fori_loop(1, n, step, carry)[2]
  return o_BTNG.astype(q_BTNH.dtype)
