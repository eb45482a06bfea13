"""Flash-attention kernels for NVIDIA GPUs in Pallas with the Triton lowering (also run by the
Pallas interpreter on CPU: the `interpret` backend).

One program per (query block, batch, head) holds its query block on chip and loops over key
blocks with `lax.fori_loop` (FlashAttention-2, Dao 2023, Algorithm 1); the per-tile math is
`tiles.py`. Causal blocks past the diagonal are outside the loop bounds, and blocks wholly
below it run without building a mask. Arrays stay in the model's [B, T, N, H] layout: a
BlockSpec with squeezed (None) batch and head dims hands each program a 2-D [block, H] view, so
no transposes are needed.

Backward (Algorithm 2) as two kernels: dq (one program per query block, loop over key blocks)
and dk/dv (one program per key block and query head, loop over query blocks). With grouped kv
heads the dk/dv kernel writes one float32 slice per query head and the N/K heads of a group are
summed afterwards.

Triton needs power-of-two tile shapes of at least 16 (`tl.dot`): head dims are padded to that
(MLA's 192 becomes 256) and block sizes are powers of two. The tilings are untuned defaults.
Mosaic GPU (`plgpu` warpgroup kernels, as in jax's `attention_mgpu.py`) could be faster on
Hopper with wgmma and TMA; it is not used yet.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lab.kernels.flash_attention import tiles

_MIN_TILE = 16


def _pow2(n: int) -> int:
  return max(_MIN_TILE, pl.next_power_of_2(n))


def head_dim(H: int) -> int:
  """The padded head dim the kernels use: a power of two of at least 16."""
  return _pow2(H)


def block_sizes(T: int, S: int) -> tuple[int, int]:
  """(block_q, block_k): 128 x 64 tiles, smaller for short sequences."""
  return min(128, _pow2(T)), min(64, _pow2(S))


def _compiler_params(H: int):
  return plgpu.CompilerParams(num_warps=4 if H <= 64 else 8, num_stages=2)


def _segment_specs(cfg, q_spec, kv_spec):
  return [q_spec, kv_spec] if cfg.segmented else []


def _key_block(cfg, j, masked: bool, q_pos_Q1, q_seg_Q1, kv_seg_ref):
  """(slice of key block j, its visibility mask for the query block, or None when unmasked)."""
  bk = cfg.block_k
  keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
  k_pos_1C = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  mask = tiles.visible(q_pos_Q1, k_pos_1C, q_seg_Q1,
                       kv_seg_ref[:, keys] if cfg.segmented else None, **cfg.mask_args(masked))
  return keys, mask


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg):
  """o and lse of one query block; refs: [q_seg, kv_seg,] o, lse."""
  q_seg_ref, kv_seg_ref = refs[:-2] if cfg.segmented else (None, None)
  o_ref, lse_ref = refs[-2:]
  i = pl.program_id(0)
  bq = cfg.block_q
  q_QH = q_ref[...]
  q_pos_Q1 = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg_Q1 = q_seg_ref[...] if cfg.segmented else None

  def step(masked, j, carry):
    keys, mask = _key_block(cfg, j, masked, q_pos_Q1, q_seg_Q1, kv_seg_ref)
    s_QC = tiles.scores(q_QH, k_ref[keys, :], cfg.scale, mask)
    return tiles.softmax_update(*carry, s_QC, v_ref[keys, :])

  full, hi = cfg.kv_blocks(i)
  carry = tiles.softmax_init(bq, v_ref.shape[-1])
  carry = jax.lax.fori_loop(0, full, functools.partial(step, False), carry)
  carry = jax.lax.fori_loop(full, hi, functools.partial(step, True), carry)
  o_QG, lse_Q1 = tiles.softmax_finish(*carry)
  o_ref[...] = o_QG.astype(o_ref.dtype)
  lse_ref[...] = lse_Q1


def forward(q_BTNH, k_BSKH, v_BSKG, segments, cfg):
  """(o_BTNG, lse_BNT1) on padded inputs; segments: None or (q_seg_BT1, kv_seg_B1S)."""
  B, T, N, H = q_BTNH.shape
  S, K, G = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKG.shape[-1]
  R, bq = N // K, cfg.block_q
  in_specs = [
      pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0)),
      pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, n // R, 0)),
      pl.BlockSpec((None, S, None, G), lambda i, b, n: (b, 0, n // R, 0)),
      *_segment_specs(cfg, pl.BlockSpec((None, bq, 1), lambda i, b, n: (b, i, 0)),
                      pl.BlockSpec((None, 1, S), lambda i, b, n: (b, 0, 0))),
  ]
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(T // bq, B, N),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bq, None, G), lambda i, b, n: (b, i, n, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, T, N, G), q_BTNH.dtype),
                 jax.ShapeDtypeStruct((B, N, T, 1), jnp.float32)],
      compiler_params=_compiler_params(H),
      interpret=cfg.interpret,
      name='lab_flash_attention_forward',
  )(q_BTNH, k_BSKH, v_BSKG, *(segments or ()))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg):
  """dq of one query block, looping over key blocks; refs: [q_seg, kv_seg,] dq."""
  q_seg_ref, kv_seg_ref = refs[:-1] if cfg.segmented else (None, None)
  dq_ref = refs[-1]
  i = pl.program_id(0)
  bq = cfg.block_q
  q_QH, do_QG, lse_Q1, delta_Q1 = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  q_pos_Q1 = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg_Q1 = q_seg_ref[...] if cfg.segmented else None

  def step(masked, j, dq_QH):
    keys, mask = _key_block(cfg, j, masked, q_pos_Q1, q_seg_Q1, kv_seg_ref)
    k_CH = k_ref[keys, :]
    s_QC = tiles.scores(q_QH, k_CH, cfg.scale, mask)
    _, ds_QC = tiles.probs_and_dscores(s_QC, v_ref[keys, :], do_QG, lse_Q1, delta_Q1)
    return dq_QH + tiles.dot(ds_QC.astype(k_CH.dtype), k_CH)

  full, hi = cfg.kv_blocks(i)
  dq_QH = jnp.zeros(q_QH.shape, jnp.float32)
  dq_QH = jax.lax.fori_loop(0, full, functools.partial(step, False), dq_QH)
  dq_QH = jax.lax.fori_loop(full, hi, functools.partial(step, True), dq_QH)
  dq_ref[...] = (dq_QH * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg):
  """dk, dv of one key block for one query head, looping over query blocks;
  refs: [q_seg, kv_seg,] dk, dv."""
  q_seg_ref, kv_seg_ref = refs[:-2] if cfg.segmented else (None, None)
  dk_ref, dv_ref = refs[-2:]
  j = pl.program_id(0)
  bq, bk = cfg.block_q, cfg.block_k
  k_CH, v_CG = k_ref[...], v_ref[...]
  k_pos_1C = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  kv_seg_1C = kv_seg_ref[...] if cfg.segmented else None

  def step(masked, i, carry):
    dk_CH, dv_CG = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    q_pos_Q1 = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    mask = tiles.visible(q_pos_Q1, k_pos_1C, q_seg_ref[rows, :] if cfg.segmented else None,
                         kv_seg_1C, **cfg.mask_args(masked))
    q_QH, do_QG = q_ref[rows, :], do_ref[rows, :]
    s_QC = tiles.scores(q_QH, k_CH, cfg.scale, mask)
    p_QC, ds_QC = tiles.probs_and_dscores(s_QC, v_CG, do_QG, lse_ref[rows, :],
                                          delta_ref[rows, :])
    return (dk_CH + tiles.dot(ds_QC.astype(q_QH.dtype), q_QH, trans_a=True),
            dv_CG + tiles.dot(p_QC.astype(do_QG.dtype), do_QG, trans_a=True))

  lo, full = cfg.q_blocks(j)
  carry = (jnp.zeros(k_CH.shape, jnp.float32), jnp.zeros(v_CG.shape, jnp.float32))
  carry = jax.lax.fori_loop(lo, full, functools.partial(step, True), carry)
  dk_CH, dv_CG = jax.lax.fori_loop(full, cfg.num_q, functools.partial(step, False), carry)
  dk_ref[...] = (dk_CH * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv_CG.astype(dv_ref.dtype)


def backward(q_BTNH, k_BSKH, v_BSKG, segments, do_BTNG, lse_BNT1, delta_BNT1, cfg):
  """(dq, dk, dv) on padded inputs; dk and dv summed over the query heads of each kv head."""
  B, T, N, H = q_BTNH.shape
  S, K, G = k_BSKH.shape[1], k_BSKH.shape[2], v_BSKG.shape[-1]
  R, bq, bk = N // K, cfg.block_q, cfg.block_k
  params = _compiler_params(max(H, G))
  args = (q_BTNH, k_BSKH, v_BSKG, do_BTNG, lse_BNT1, delta_BNT1, *(segments or ()))

  row_spec = lambda D: pl.BlockSpec((None, bq, None, D), lambda i, b, n: (b, i, n, 0))
  all_keys = lambda D: pl.BlockSpec((None, S, None, D), lambda i, b, n: (b, 0, n // R, 0))
  stat_spec = pl.BlockSpec((None, None, bq, 1), lambda i, b, n: (b, n, i, 0))
  dq_BTNH = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(T // bq, B, N),
      in_specs=[row_spec(H), all_keys(H), all_keys(G), row_spec(G), stat_spec, stat_spec,
                *_segment_specs(cfg, pl.BlockSpec((None, bq, 1), lambda i, b, n: (b, i, 0)),
                                pl.BlockSpec((None, 1, S), lambda i, b, n: (b, 0, 0)))],
      out_specs=row_spec(H),
      out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name='lab_flash_attention_dq',
  )(*args)

  all_rows = lambda D: pl.BlockSpec((None, T, None, D), lambda j, b, n: (b, 0, n, 0))
  key_spec = lambda D: pl.BlockSpec((None, bk, None, D), lambda j, b, n: (b, j, n // R, 0))
  out_spec = lambda D: pl.BlockSpec((None, bk, None, D), lambda j, b, n: (b, j, n, 0))
  all_stats = pl.BlockSpec((None, None, T, 1), lambda j, b, n: (b, n, 0, 0))
  grad_dtype = lambda x: jnp.float32 if R > 1 else x.dtype
  dk_BSNH, dv_BSNG = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(S // bk, B, N),
      in_specs=[all_rows(H), key_spec(H), key_spec(G), all_rows(G), all_stats, all_stats,
                *_segment_specs(cfg, pl.BlockSpec((None, T, 1), lambda j, b, n: (b, 0, 0)),
                                pl.BlockSpec((None, 1, bk), lambda j, b, n: (b, 0, j)))],
      out_specs=[out_spec(H), out_spec(G)],
      out_shape=[jax.ShapeDtypeStruct((B, S, N, H), grad_dtype(k_BSKH)),
                 jax.ShapeDtypeStruct((B, S, N, G), grad_dtype(v_BSKG))],
      compiler_params=params,
      interpret=cfg.interpret,
      name='lab_flash_attention_dkv',
  )(*args)
  group_sum = lambda d_BSND, like: d_BSND.reshape(B, S, K, R, -1).sum(3).astype(like.dtype)
  return dq_BTNH, group_sum(dk_BSNH, k_BSKH), group_sum(dv_BSNG, v_BSKG)
