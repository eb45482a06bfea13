"""The reference attention backend and the input validation of `flash_attention`.

The oracle is softmax attention (Vaswani et al. 2017, eq. 1) in float64 NumPy, looped over batch,
heads and query rows, with GQA head n reading kv head n // (N / K) and causal queries aligned to
the last T of the S keys.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.kernels import available_backends, flash_attention
from lab.kernels.flash_attention import reference
from oracles import as_jax_segments, assert_vjp_matches_oracle, draw_segments

attention_jit = jax.jit(flash_attention, static_argnames=('causal', 'softmax_scale', 'backend'))


def np_attention(q_BTNH, k_BSKH, v_BSKG, causal=False, q_seg_BT=None, kv_seg_BS=None,
                 scale=None):
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  scale = H ** -0.5 if scale is None else scale
  o_BTNG = np.zeros((B, T, N, v_BSKG.shape[-1]))
  for b in range(B):
    for n in range(N):
      kv_head = n // (N // K)
      for t in range(T):
        visible_S = np.ones(S, bool)
        if causal:
          visible_S &= np.arange(S) <= t + S - T
        if q_seg_BT is not None:
          visible_S &= kv_seg_BS[b] == q_seg_BT[b, t]
        if visible_S.any():
          s = scale * k_BSKH[b, visible_S, kv_head] @ q_BTNH[b, t, n]
          p = np.exp(s - s.max())
          o_BTNG[b, t, n] = p / p.sum() @ v_BSKG[b, visible_S, kv_head]
  return o_BTNG


def draw(seed, B, T, S, N, K, H, G, segments=None):
  """q, k, v rounded to float32 (q scaled up so softmax rows are peaked) and segment ids.

  segments: None, 'one' (an array_BT, T == S) or 'pair' (q ids in 0..3, kv ids in 0..2, so
  queries of segment 3 see no key at all).
  """
  rng = np.random.default_rng(seed)
  round32 = lambda a: a.astype(np.float32).astype(np.float64)
  q_BTNH = round32(2.0 * rng.standard_normal((B, T, N, H)))
  k_BSKH = round32(rng.standard_normal((B, S, K, H)))
  v_BSKG = round32(rng.standard_normal((B, S, K, G)))
  seg = draw_segments(rng, B, T, S, segments)
  return rng, q_BTNH, k_BSKH, v_BSKG, seg


def as_oracle_segments(seg):
  if seg is None:
    return {}
  q_seg_BT, kv_seg_BS = seg if isinstance(seg, tuple) else (seg, seg)
  return {'q_seg_BT': q_seg_BT, 'kv_seg_BS': kv_seg_BS}


def f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


CASES = [  # B, T, S, N, K, H, G, causal, segments, softmax_scale
    (2, 5, 5, 4, 4, 8, 8, False, None, None),     # multi-head
    (2, 5, 5, 4, 2, 8, 8, True, None, None),      # GQA, causal
    (1, 3, 7, 6, 2, 8, 8, True, None, None),      # T < S: queries are the last 3 positions
    (1, 6, 4, 2, 1, 8, 8, True, None, None),      # T > S: queries 0 and 1 see no key
    (2, 5, 5, 4, 2, 12, 8, True, 'one', 0.3),     # one segment array, G != H, explicit scale
    (2, 3, 6, 4, 1, 4, 6, False, 'pair', None),   # (q, kv) segment pair, multi-query
    (2, 4, 6, 2, 2, 4, 4, True, 'pair', 0.5),     # causal and segments together
]


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('B,T,S,N,K,H,G,causal,segments,scale', CASES)
def test_reference_matches_oracle(seed, B, T, S, N, K, H, G, causal, segments, scale):
  _, q_BTNH, k_BSKH, v_BSKG, seg = draw(seed, B, T, S, N, K, H, G, segments)
  got_BTNG = attention_jit(*f32(q_BTNH, k_BSKH, v_BSKG), causal=causal,
                           segment_ids=as_jax_segments(seg), softmax_scale=scale,
                           backend='reference')
  assert got_BTNG.dtype == jnp.float32 and got_BTNG.shape == (B, T, N, G)
  want_BTNG = np_attention(q_BTNH, k_BSKH, v_BSKG, causal, scale=scale, **as_oracle_segments(seg))
  np.testing.assert_allclose(got_BTNG, want_BTNG, rtol=1e-5, atol=1e-5)


def test_auto_backend_matches_oracle():
  _, q_BTNH, k_BSKH, v_BSKG, _ = draw(0, 1, 4, 4, 2, 1, 8, 8)
  got_BTNG = attention_jit(*f32(q_BTNH, k_BSKH, v_BSKG), causal=True)
  np.testing.assert_allclose(got_BTNG, np_attention(q_BTNH, k_BSKH, v_BSKG, True), rtol=1e-5,
                             atol=1e-5)
  assert set(available_backends()) >= {'auto', 'reference'}


def test_rows_with_no_visible_key_are_zero_with_zero_gradient():
  _, q_BTNH, k_BSKH, v_BSKG, _ = draw(1, 1, 4, 3, 2, 1, 4, 4)
  q_seg_BT = jnp.asarray([[0, 5, 1, 1]])  # no key has segment 5; causal hides all keys from row 0
  kv_seg_BS = jnp.asarray([[0, 1, 1]])
  f = lambda *qkv: flash_attention(*qkv, causal=True, segment_ids=(q_seg_BT, kv_seg_BS),
                                   backend='reference')
  loss = lambda *qkv: jnp.sum(f(*qkv) ** 2)
  o_BTNG, grads = jax.jit(lambda *qkv: (f(*qkv), jax.grad(loss, argnums=(0, 1, 2))(*qkv)))(
      *f32(q_BTNH, k_BSKH, v_BSKG))
  np.testing.assert_array_equal(o_BTNG[:, :2], 0.0)
  assert np.all(np.abs(o_BTNG[:, 2:]) > 0)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads[0][:, :2], 0.0)


@pytest.mark.parametrize('seed', range(2))
def test_gradients_match_oracle(seed):
  """d/dq, d/dk, d/dv with GQA, causal T < S, and a query segment that sees no key."""
  rng, q_BTNH, k_BSKH, v_BSKG, seg = draw(seed, 1, 3, 4, 2, 1, 4, 3, 'pair')
  assert_vjp_matches_oracle(
      lambda *qkv: flash_attention(*qkv, causal=True, segment_ids=as_jax_segments(seg),
                                   backend='reference'),
      lambda *qkv: np_attention(*qkv, causal=True, **as_oracle_segments(seg)),
      (q_BTNH, k_BSKH, v_BSKG), rng)


def test_bfloat16_keeps_dtype_and_matches():
  _, *qkv, _ = draw(2, 2, 5, 5, 4, 2, 8, 8)
  qkv = [jnp.asarray(a, jnp.bfloat16) for a in qkv]
  got_BTNG = attention_jit(*qkv, causal=True, backend='reference')
  assert got_BTNG.dtype == jnp.bfloat16
  want_BTNG = np_attention(*(np.asarray(a, np.float64) for a in qkv), causal=True)
  np.testing.assert_allclose(np.asarray(got_BTNG, np.float64), want_BTNG, rtol=2e-2, atol=2e-2)


def test_reference_float64_check_grads(x64):
  _, q_BTNH, k_BSKH, v_BSKG, seg = draw(3, 1, 3, 4, 2, 1, 4, 3, 'pair')
  q_seg_BT, kv_seg_BS = as_jax_segments(seg)
  f = jax.jit(lambda *qkv: reference.attention(*qkv, causal=True, q_segment_BT=q_seg_BT,
                                               kv_segment_BS=kv_seg_BS, softmax_scale=0.5))
  check_grads(f, (q_BTNH, k_BSKH, v_BSKG), order=1, modes=['rev'])


def zeros_qkv(B=2, T=5, S=5, N=4, K=2, H=8, G=8):
  return [jnp.zeros(shape, jnp.float32) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, G))]


def raises(message):
  return pytest.raises(ValueError, match=re.escape(message))


def test_wrong_rank_raises():
  q_BTNH, k_BSKH, v_BSKG = zeros_qkv()
  with raises('q has shape (2, 5, 32)'):
    flash_attention(q_BTNH.reshape(2, 5, 32), k_BSKH, v_BSKG)
  with raises('v has shape (1, 2, 5, 2, 8)'):
    flash_attention(q_BTNH, k_BSKH, v_BSKG[None])


def test_bad_dtype_raises():
  q_BTNH, k_BSKH, v_BSKG = zeros_qkv()
  with raises('k dtype int32'):
    flash_attention(q_BTNH, k_BSKH.astype(jnp.int32), v_BSKG)


def test_float64_raises(x64):
  q_BTNH, k_BSKH, v_BSKG = zeros_qkv()
  with raises('v dtype float64'):
    flash_attention(q_BTNH, k_BSKH, v_BSKG.astype(jnp.float64))


def test_heads_not_divisible_raises():
  with raises('6 query heads are not a multiple of 4 kv heads'):
    flash_attention(*zeros_qkv(N=6, K=4))


def test_mismatched_shapes_raise():
  q_BTNH, k_BSKH, v_BSKG = zeros_qkv()
  with raises('k shape (3, 5, 2, 8)'):  # batch
    flash_attention(q_BTNH, jnp.zeros((3, 5, 2, 8)), v_BSKG)
  with raises('k shape (2, 5, 2, 4)'):  # head dim
    flash_attention(q_BTNH, jnp.zeros((2, 5, 2, 4)), v_BSKG)
  with raises('v shape (2, 6, 2, 8)'):  # length
    flash_attention(q_BTNH, k_BSKH, jnp.zeros((2, 6, 2, 8)))
  with raises('v shape (2, 5, 1, 8)'):  # kv heads
    flash_attention(q_BTNH, k_BSKH, jnp.zeros((2, 5, 1, 8)))


def test_bad_segment_ids_raise():
  q_BTNH, k_BSKH, v_BSKG = zeros_qkv(T=3, S=5)
  with raises('T=3, S=5'):
    flash_attention(q_BTNH, k_BSKH, v_BSKG, segment_ids=jnp.zeros((2, 3), jnp.int32))
  with raises('(2, 4)'):
    flash_attention(q_BTNH, k_BSKH, v_BSKG,
                    segment_ids=(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 4), jnp.int32)))


def test_unknown_backend_raises():
  with raises("backend='triton_magic'"):
    flash_attention(*zeros_qkv(), backend='triton_magic')
