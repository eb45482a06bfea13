"""Tile math shared by every flash-attention kernel (Pallas GPU, Pallas TPU, interpret) and xla.

A tile is one block of query rows (Q of them) against one block of keys (C of them); every array
here is 2-D and row statistics are column vectors [Q, 1], which lowers alike to Triton, Mosaic
TPU and XLA. Scores and statistics are float32; matmuls take the inputs' dtype and accumulate
in float32.

Forward, FlashAttention-2 (Dao 2023, Algorithm 1, lines 8-12), per key block j:
  s = scale q k_j^T,  m' = max(m, rowmax s),  p = exp(s - m'),
  l' = exp(m - m') l + rowsum p,  acc' = exp(m - m') acc + p v_j;
  at the end o = acc / l and the log-sum-exp lse = m + log l is saved for the backward.
Backward (Algorithm 2, lines 11-17), with D = rowsum(dO * O) computed once:
  p = exp(s - lse),  dv_j += p^T dO,  dp = dO v_j^T,  ds = p * (dp - D),
  dq += scale ds k_j,  dk_j += scale ds^T q.
Masked scores are -inf. A row that sees no key keeps m = -inf and l = 0; it outputs 0 and saves
lse = +inf, so its p is exp(-inf) = 0 in the backward and its gradients are 0, not NaN.
"""
import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

NEG_INF = float('-inf')


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """a @ b (a^T, b^T when asked) with float32 accumulation."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def visible(q_pos_Q1, k_pos_1C, q_seg_Q1=None, kv_seg_1C=None, *, causal: bool, offset: int,
            kv_len: int | None):
  """Boolean mask_QC of the keys each query row sees, or None when it sees them all.

  causal: query t sees key s iff s <= t + offset, offset = S - T (queries end-aligned to keys).
  kv_len: keys at positions >= kv_len are padding (None: this tile holds no padding).
  Segment ids: a query sees only keys of its own segment.
  """
  conds = []
  if causal:
    conds.append(k_pos_1C <= q_pos_Q1 + offset)
  if kv_len is not None:
    conds.append(k_pos_1C < kv_len)
  if q_seg_Q1 is not None:
    conds.append(q_seg_Q1 == kv_seg_1C)
  return functools.reduce(operator.and_, conds) if conds else None


def scores(q_QH, k_CH, scale: float, mask_QC) -> jax.Array:
  """s_QC = scale q k^T in float32, -inf where masked."""
  s_QC = dot(q_QH, k_CH, trans_b=True) * scale
  return s_QC if mask_QC is None else jnp.where(mask_QC, s_QC, NEG_INF)


def softmax_init(Q: int, G: int):
  """(m, l, acc) before the first key block: m = -inf, l = 0, acc = 0."""
  return (jnp.full((Q, 1), NEG_INF, jnp.float32), jnp.zeros((Q, 1), jnp.float32),
          jnp.zeros((Q, G), jnp.float32))


def softmax_update(m_Q1, l_Q1, acc_QG, s_QC, v_CG):
  """One online-softmax step over a key block (Algorithm 1, lines 9-10): returns (m', l', acc').

  While a row has seen no visible key, m' = -inf; exponents then subtract 0 instead, so that
  exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN.
  """
  m_new_Q1 = jnp.maximum(m_Q1, jnp.max(s_QC, axis=1, keepdims=True))
  m_sub_Q1 = jnp.where(m_new_Q1 == NEG_INF, 0.0, m_new_Q1)
  alpha_Q1 = jnp.exp(m_Q1 - m_sub_Q1)
  p_QC = jnp.exp(s_QC - m_sub_Q1)
  l_new_Q1 = alpha_Q1 * l_Q1 + jnp.sum(p_QC, axis=1, keepdims=True)
  acc_new_QG = alpha_Q1 * acc_QG + dot(p_QC.astype(v_CG.dtype), v_CG)
  return m_new_Q1, l_new_Q1, acc_new_QG


def softmax_finish(m_Q1, l_Q1, acc_QG):
  """o = acc / l and lse = m + log l (Algorithm 1, lines 12-13); empty rows: o = 0, lse = +inf."""
  empty_Q1 = l_Q1 == 0.0
  o_QG = acc_QG / jnp.where(empty_Q1, 1.0, l_Q1)
  lse_Q1 = jnp.where(empty_Q1, float('inf'), m_Q1 + jnp.log(jnp.where(empty_Q1, 1.0, l_Q1)))
  return o_QG, lse_Q1


def probs_and_dscores(s_QC, v_CG, do_QG, lse_Q1, delta_Q1):
  """p = exp(s - lse) and ds = p * (dO v^T - D) (Algorithm 2, lines 11, 13-14), both float32."""
  p_QC = jnp.exp(s_QC - lse_Q1)
  dp_QC = dot(do_QG, v_CG, trans_b=True)
  return p_QC, p_QC * (dp_QC - delta_Q1)


def _floordiv(x, d: int):
  """floor(max(x, 0) / d) for a traced or static int and a positive d."""
  return jax.lax.div(jnp.maximum(x, 0), d)


def _ceildiv(x, d: int):
  return jax.lax.div(jnp.maximum(x, 0) + d - 1, d)


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static description of one kernel call: true lengths over padded, blocked arrays.

  Arrays are padded to num_q * block_q query rows and num_k * block_k keys; positions at or past
  q_len / kv_len are padding. `interpret` is pallas_call's argument (False on device).
  """
  q_len: int
  kv_len: int
  block_q: int
  block_k: int
  causal: bool
  scale: float
  segmented: bool
  interpret: Any = False

  @property
  def num_q(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_k(self) -> int:
    return -(-self.kv_len // self.block_k)

  def mask_args(self, masked: bool) -> dict:
    """`visible` arguments for a tile that may need the causal and padding masks (masked) or
    that is known to need neither (segment ids still apply)."""
    padded = self.kv_len % self.block_k != 0
    return dict(causal=masked and self.causal, offset=self.kv_len - self.q_len,
                kv_len=self.kv_len if masked and padded else None)

  def kv_blocks(self, i):
    """(full, hi) for query block i: it sees key blocks [0, hi), and [0, full) without the
    causal or padding mask. Blocks at or past hi are fully masked causal blocks: skipped."""
    bq, bk, offset = self.block_q, self.block_k, self.kv_len - self.q_len
    full = self.kv_len // bk  # the blocks before any padding
    if not self.causal:
      return full, self.num_k
    hi = jnp.minimum(_ceildiv((i + 1) * bq + offset, bk), self.num_k)
    return jnp.minimum(_floordiv(i * bq + offset + 1, bk), full), hi

  def q_blocks(self, j):
    """(lo, full) for key block j: query blocks [lo, num_q) see it, [full, num_q) unmasked."""
    bq, bk, offset = self.block_q, self.block_k, self.kv_len - self.q_len
    lo, full = 0, 0
    if self.causal:
      lo = jnp.minimum(_floordiv(j * bk - offset, bq), self.num_q)
      full = jnp.minimum(_ceildiv((j + 1) * bk - 1 - offset, bq), self.num_q)
    if self.kv_len % bk:  # the last key block holds padding: mask it for every query block
      # int32, not Python ints: Triton's lowering mis-types a select of weakly typed constants.
      full = jnp.where(j == self.num_k - 1, jnp.int32(self.num_q), jnp.asarray(full, jnp.int32))
    return lo, full
