"""Flash-attention kernels for TPUs in Pallas with the Mosaic lowering.

The same tile math as the GPU kernels (`tiles.py`; FlashAttention-2, Dao 2023, Algorithms 1-2),
arranged the TPU way: a TPU core runs the grid in order, so the loop over key blocks is the
innermost grid axis ('arbitrary') and the running m, l and accumulator live in VMEM scratch
between steps, while Pallas pipelines the HBM->VMEM copies of the next blocks. A whole key
sequence in VMEM would cap the length, which this avoids.

Fully masked causal blocks are skipped twice: `pl.when` skips their compute, and the index maps
clamp their block index to the last block needed, so no copy is issued for them either.

Layout: Mosaic tiles the last two dims of a block by (8, 128), so arrays are transposed to
[B, N, T, H] and blocks are [block, H] with H the full head dim; block_q is a multiple of 8 and
block_k of 128 (kv segment ids are a [1, block_k] row). Row statistics lse and D are [B, N, T, 1].
Grouped kv heads: the dk/dv kernel loops over the N/K query heads of its kv head inside the
grid, so the sum over the group happens in its accumulator.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lab.kernels.flash_attention import tiles

_PARALLEL, _ARBITRARY = pltpu.PARALLEL, pltpu.ARBITRARY


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def head_dim(H: int) -> int:
  """Blocks span the whole head dim, which Mosaic allows at any size: no padding."""
  return H


def block_sizes(T: int, S: int) -> tuple[int, int]:
  """(block_q, block_k): up to 512 x 512 tiles for the MXU, in (8, 128) multiples."""
  return min(512, _round_up(T, 8)), min(512, _round_up(S, 128))


def _heads_major(x_BTNH):
  return x_BTNH.transpose(0, 2, 1, 3)


def _positions(i, j, cfg):
  q_pos_Q1 = i * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0)
  k_pos_1C = j * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
  return q_pos_Q1, k_pos_1C


def _mask(i, j, seg_refs, cfg, masked: bool):
  q_seg_Q1, kv_seg_1C = (ref[...] for ref in seg_refs) if cfg.segmented else (None, None)
  return tiles.visible(*_positions(i, j, cfg), q_seg_Q1, kv_seg_1C, **cfg.mask_args(masked))


def _forward_kernel(q_ref, k_ref, v_ref, *refs, cfg):
  """Grid step (b, n, i, j): folds key block j into query block i's running softmax."""
  seg_refs = refs[:2] if cfg.segmented else ()
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[len(seg_refs):]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_ref[...], l_ref[...], acc_ref[...] = tiles.softmax_init(*acc_ref.shape)

  def update(masked: bool):
    s_QC = tiles.scores(q_ref[...], k_ref[...], cfg.scale, _mask(i, j, seg_refs, cfg, masked))
    m_ref[...], l_ref[...], acc_ref[...] = tiles.softmax_update(
        m_ref[...], l_ref[...], acc_ref[...], s_QC, v_ref[...])

  full, hi = cfg.kv_blocks(i)
  pl.when(j < full)(functools.partial(update, False))
  pl.when((j >= full) & (j < hi))(functools.partial(update, True))

  @pl.when(j == cfg.num_k - 1)
  def _finish():
    o_QG, lse_Q1 = tiles.softmax_finish(m_ref[...], l_ref[...], acc_ref[...])
    o_ref[...] = o_QG.astype(o_ref.dtype)
    lse_ref[...] = lse_Q1


def _last_kv_block(i, j, cfg):
  """j, clamped to the last key block query block i sees (so skipped steps copy nothing)."""
  _, hi = cfg.kv_blocks(i)
  return jnp.minimum(j, jnp.maximum(hi - 1, 0))


def _first_q_block(i, j, cfg):
  """i, raised to the first query block that sees key block j."""
  lo, _ = cfg.q_blocks(j)
  return jnp.maximum(i, jnp.minimum(lo, cfg.num_q - 1))


def forward(q_BTNH, k_BSKH, v_BSKG, segments, cfg):
  """(o_BTNG, lse_BNT1) on padded inputs; segments: None or (q_seg_BT1, kv_seg_B1S)."""
  q_BNTH, k_BKSH, v_BKSG = (_heads_major(x) for x in (q_BTNH, k_BSKH, v_BSKG))
  B, N, T, H = q_BNTH.shape
  K, G = k_BKSH.shape[1], v_BKSG.shape[-1]
  R, bq, bk = N // K, cfg.block_q, cfg.block_k
  kv_map = lambda b, n, i, j: (b, jax.lax.div(n, R), _last_kv_block(i, j, cfg), 0)
  seg_specs = [pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
               pl.BlockSpec((None, 1, bk), lambda b, n, i, j: (b, 0, _last_kv_block(i, j, cfg)))]
  o_BNTG, lse_BNT1 = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(B, N, cfg.num_q, cfg.num_k),
      in_specs=[pl.BlockSpec((None, None, bq, H), lambda b, n, i, j: (b, n, i, 0)),
                pl.BlockSpec((None, None, bk, H), kv_map),
                pl.BlockSpec((None, None, bk, G), kv_map),
                *(seg_specs if cfg.segmented else [])],
      out_specs=[pl.BlockSpec((None, None, bq, G), lambda b, n, i, j: (b, n, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0))],
      out_shape=[jax.ShapeDtypeStruct((B, N, T, G), q_BNTH.dtype),
                 jax.ShapeDtypeStruct((B, N, T, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, G), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=cfg.interpret,
      name='lab_flash_attention_forward',
  )(q_BNTH, k_BKSH, v_BKSG, *(segments or ()))
  return _heads_major(o_BNTG), lse_BNT1


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg):
  """Grid step (b, n, i, j): adds key block j's share to dq of query block i."""
  seg_refs = refs[:2] if cfg.segmented else ()
  dq_ref, dq_acc_ref = refs[len(seg_refs):]
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  def update(masked: bool):
    k_CH = k_ref[...]
    s_QC = tiles.scores(q_ref[...], k_CH, cfg.scale, _mask(i, j, seg_refs, cfg, masked))
    _, ds_QC = tiles.probs_and_dscores(s_QC, v_ref[...], do_ref[...], lse_ref[...],
                                       delta_ref[...])
    dq_acc_ref[...] += tiles.dot(ds_QC.astype(k_CH.dtype), k_CH)

  full, hi = cfg.kv_blocks(i)
  pl.when(j < full)(functools.partial(update, False))
  pl.when((j >= full) & (j < hi))(functools.partial(update, True))

  @pl.when(j == cfg.num_k - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, cfg, group: int):
  """Grid step (b, kv head, j, r, i): adds query block i of the group's r-th query head to
  dk and dv of key block j."""
  seg_refs = refs[:2] if cfg.segmented else ()
  dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[len(seg_refs):]
  j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  def update(masked: bool):
    q_QH, do_QG = q_ref[...], do_ref[...]
    s_QC = tiles.scores(q_QH, k_ref[...], cfg.scale, _mask(i, j, seg_refs, cfg, masked))
    p_QC, ds_QC = tiles.probs_and_dscores(s_QC, v_ref[...], do_QG, lse_ref[...],
                                          delta_ref[...])
    dk_acc_ref[...] += tiles.dot(ds_QC.astype(q_QH.dtype), q_QH, trans_a=True)
    dv_acc_ref[...] += tiles.dot(p_QC.astype(do_QG.dtype), do_QG, trans_a=True)

  lo, full = cfg.q_blocks(j)
  pl.when((i >= lo) & (i < full))(functools.partial(update, True))
  pl.when(i >= full)(functools.partial(update, False))

  @pl.when((r == group - 1) & (i == cfg.num_q - 1))
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q_BTNH, k_BSKH, v_BSKG, segments, do_BTNG, lse_BNT1, delta_BNT1, cfg):
  """(dq, dk, dv) on padded inputs; dk and dv summed over the query heads of each kv head."""
  q_BNTH, k_BKSH, v_BKSG, do_BNTG = (_heads_major(x)
                                     for x in (q_BTNH, k_BSKH, v_BSKG, do_BTNG))
  B, N, T, H = q_BNTH.shape
  K, S, G = k_BKSH.shape[1], k_BKSH.shape[2], v_BKSG.shape[-1]
  R, bq, bk = N // K, cfg.block_q, cfg.block_k
  args = (q_BNTH, k_BKSH, v_BKSG, do_BNTG, lse_BNT1, delta_BNT1, *(segments or ()))

  row_map = lambda b, n, i, j: (b, n, i, 0)
  kv_map = lambda b, n, i, j: (b, jax.lax.div(n, R), _last_kv_block(i, j, cfg), 0)
  seg_specs = [pl.BlockSpec((None, bq, 1), lambda b, n, i, j: (b, i, 0)),
               pl.BlockSpec((None, 1, bk), lambda b, n, i, j: (b, 0, _last_kv_block(i, j, cfg)))]
  dq_BNTH = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(B, N, cfg.num_q, cfg.num_k),
      in_specs=[pl.BlockSpec((None, None, bq, H), row_map),
                pl.BlockSpec((None, None, bk, H), kv_map),
                pl.BlockSpec((None, None, bk, G), kv_map),
                pl.BlockSpec((None, None, bq, G), row_map),
                pl.BlockSpec((None, None, bq, 1), row_map),
                pl.BlockSpec((None, None, bq, 1), row_map),
                *(seg_specs if cfg.segmented else [])],
      out_specs=pl.BlockSpec((None, None, bq, H), row_map),
      out_shape=jax.ShapeDtypeStruct(q_BNTH.shape, q_BNTH.dtype),
      scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY)),
      interpret=cfg.interpret,
      name='lab_flash_attention_dq',
  )(*args)

  q_map = lambda b, h, j, r, i: (b, h * R + r, _first_q_block(i, j, cfg), 0)
  key_map = lambda b, h, j, r, i: (b, h, j, 0)
  dk_BKSH, dv_BKSG = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, group=R),
      grid=(B, K, cfg.num_k, R, cfg.num_q),
      in_specs=[pl.BlockSpec((None, None, bq, H), q_map),
                pl.BlockSpec((None, None, bk, H), key_map),
                pl.BlockSpec((None, None, bk, G), key_map),
                pl.BlockSpec((None, None, bq, G), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                pl.BlockSpec((None, None, bq, 1), q_map),
                *([pl.BlockSpec((None, bq, 1),
                                lambda b, h, j, r, i: (b, _first_q_block(i, j, cfg), 0)),
                   pl.BlockSpec((None, 1, bk), lambda b, h, j, r, i: (b, 0, j))]
                  if cfg.segmented else [])],
      out_specs=[pl.BlockSpec((None, None, bk, H), key_map),
                 pl.BlockSpec((None, None, bk, G), key_map)],
      out_shape=[jax.ShapeDtypeStruct(k_BKSH.shape, k_BKSH.dtype),
                 jax.ShapeDtypeStruct(v_BKSG.shape, v_BKSG.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, G), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL, _PARALLEL, _PARALLEL, _ARBITRARY, _ARBITRARY)),
      interpret=cfg.interpret,
      name='lab_flash_attention_dkv',
  )(*args)
  return _heads_major(dq_BNTH), _heads_major(dk_BKSH), _heads_major(dv_BKSG)
