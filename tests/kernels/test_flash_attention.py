"""The flash-attention backends (interpret, xla, reference) against a float64 NumPy oracle.

The oracle is softmax attention (Vaswani et al. 2017, eq. 1) and its analytic vector-Jacobian
product in float64: with P = softmax(scale q k^T + mask) and cotangent dO,
  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = scale dS K,  dK = scale dS^T Q,
summed over the query heads of each kv head (GQA head n reads kv head n // (N / K)). Causal
queries are aligned to the last T of the S keys; a query that sees no key outputs 0.
The oracle's own gradient is checked once against central differences.

The `interpret` backend runs the GPU kernels (the ones pallas_gpu compiles with Triton) in the
Pallas interpreter with 16 x 16 tiles; the TPU kernels run in the interpreter too, and both
kernel sets are lowered for cuda (Triton IR) and tpu (Mosaic), which this CPU machine can do
without the devices.
"""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from lab.kernels import flash_attention
from lab.kernels.flash_attention import api, pallas, tiles
from oracles import as_jax_segments, draw_segments

# Kernel logic, not XLA's optimisations, is under test: compiling at -O0 halves compile time.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}
_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 4e-3}
_LENGTHS = st.one_of(st.sampled_from([1, 15, 16, 17, 31, 32, 33]), st.integers(1, 70))


def np_attention_vjp(q, k, v, do, causal=False, q_seg=None, kv_seg=None, scale=None):
  """(o, dq, dk, dv) in float64."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  R = N // K
  scale = H ** -0.5 if scale is None else scale
  k_q, v_q = np.repeat(k, R, axis=2), np.repeat(v, R, axis=2)  # kv head of each query head
  mask = np.ones((B, 1, T, S), bool)
  if causal:
    mask &= np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
  if q_seg is not None:
    mask &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  s = np.where(mask, scale * np.einsum('btnh,bsnh->bnts', q, k_q), -np.inf)
  m = s.max(-1, keepdims=True)
  e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l == 0, 1.0, l)
  o = np.einsum('bnts,bsng->btng', p, v_q)
  dp = np.einsum('btng,bsng->bnts', do, v_q)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True))
  dq = scale * np.einsum('bnts,bsnh->btnh', ds, k_q)
  group_sum = lambda x: x.reshape(B, S, K, R, -1).sum(3)
  dk = group_sum(scale * np.einsum('bnts,btnh->bsnh', ds, q))
  dv = group_sum(np.einsum('bnts,btng->bsng', p, do))
  return o, dq, dk, dv


def draw(seed, B, T, S, N, K, H, G, segments, dtype=jnp.float32):
  """(q, k, v, dO) rounded to dtype (as float64) and segment ids.

  segments: None, 'one' (sorted ids in 0..2 as packed sequences give, T == S) or 'pair' (q ids in
  0..3, kv ids in 0..2: queries of segment 3 see no key).
  """
  rng = np.random.default_rng(seed)
  rounded = lambda *shape: np.asarray(jnp.asarray(rng.standard_normal(shape), dtype), np.float64)
  q, k, v, do = rounded(B, T, N, H), rounded(B, S, K, H), rounded(B, S, K, G), rounded(B, T, N, G)
  seg = draw_segments(rng, B, T, S, segments)
  return q, k, v, do, seg


def as_oracle_segments(seg):
  if seg is None:
    return {}
  q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
  return {'q_seg': q_seg, 'kv_seg': kv_seg}


def attention_vjp(attention, q, k, v, do, seg, dtype, **kw):
  """(o, dq, dk, dv) of `attention(q, k, v, segment_ids, **kw)` in dtype, by jax.vjp."""
  def f(q, k, v, do, seg):
    o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg, **kw), q, k, v)
    return (o, *vjp(do))
  args = [jnp.asarray(x, dtype) for x in (q, k, v, do)]
  return jax.jit(f, compiler_options=_FAST_COMPILE)(*args, as_jax_segments(seg))


def public(backend):
  return lambda q, k, v, seg, **kw: flash_attention(q, k, v, segment_ids=seg, backend=backend,
                                                    **kw)


def assert_matches_oracle(got, q, k, v, do, seg, dtype, **kw):
  want = np_attention_vjp(q, k, v, do, **as_oracle_segments(seg), **kw)
  tol = _TOL[dtype]
  for name, g, w in zip(('o', 'dq', 'dk', 'dv'), got, want):
    assert g.dtype == dtype and g.shape == w.shape, (name, g.dtype, g.shape)
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=tol,
                               atol=tol * max(1.0, np.abs(w).max()), err_msg=name)


@st.composite
def problems(draw_from, dtypes=(jnp.float32, jnp.bfloat16, jnp.float16)):
  """Keyword arguments of `draw` plus causal and dtype, over small random shapes."""
  T, S = draw_from(_LENGTHS), draw_from(_LENGTHS)
  K, R = draw_from(st.sampled_from([1, 2])), draw_from(st.sampled_from([1, 2, 3]))
  H = draw_from(st.sampled_from([8, 16, 24]))
  segments = draw_from(st.sampled_from([None, 'one', 'pair']))
  return dict(seed=draw_from(st.integers(0, 2**16)), B=draw_from(st.sampled_from([1, 2])), T=T,
              S=T if segments == 'one' else S, N=K * R, K=K, H=H,
              G=draw_from(st.sampled_from([H, 8, 24])), segments=segments,
              causal=draw_from(st.booleans()), dtype=draw_from(st.sampled_from(dtypes)))


def check_problem(attention, p):
  p = dict(p)
  causal, dtype = p.pop('causal'), p['dtype']
  q, k, v, do, seg = draw(**p)
  got = attention_vjp(attention, q, k, v, do, seg, dtype, causal=causal)
  assert_matches_oracle(got, q, k, v, do, seg, dtype, causal=causal)


_PROPERTY = settings(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(_PROPERTY, max_examples=12)
@given(problems())
def test_interpret_kernels_match_oracle(p):
  check_problem(public('interpret'), p)


@settings(_PROPERTY, max_examples=12)
@given(problems(), st.sampled_from(['reference', 'xla']))
def test_reference_and_xla_match_oracle(p, backend):
  check_problem(public(backend), p)


def test_xla_matches_oracle_across_key_chunks():
  """S > 512: the xla backend scans key chunks, the last one padded."""
  check_problem(public('xla'), dict(seed=0, B=1, T=24, S=600, N=2, K=1, H=8, G=8,
                                    segments='pair', causal=True, dtype=jnp.float32))


@pytest.mark.parametrize('T,S', [(1, 1), (1, 33), (17, 15), (16, 16), (15, 40), (33, 17)])
def test_interpret_lengths_around_blocks(T, S):
  """Length 1, block +- 1 and T != S under the causal mask (end-aligned queries)."""
  check_problem(public('interpret'), dict(seed=T * 100 + S, B=2, T=T, S=S, N=4, K=2, H=16, G=16,
                                          segments=None, causal=True, dtype=jnp.float32))


def test_interpret_mla_head_dims():
  """DeepSeek MLA: H = 192 for queries and keys, G = 128 for values."""
  check_problem(public('interpret'), dict(seed=3, B=1, T=20, S=20, N=2, K=1, H=192, G=128,
                                          segments=None, causal=True, dtype=jnp.bfloat16))


@pytest.mark.parametrize('backend', ['interpret', 'xla'])
def test_rows_with_no_visible_key_output_zero_with_zero_gradient(backend):
  """Causal T > S hides every key from the first T - S queries; segment 9 has no key at all."""
  q, k, v, do, _ = draw(5, 1, 20, 4, 2, 1, 16, 16, None)
  q_seg = np.ones((1, 20), int)
  q_seg[0, 18] = 9
  seg = (q_seg, np.ones((1, 4), int))
  got = attention_vjp(public(backend), q, k, v, do, seg, jnp.float32, causal=True)
  assert all(np.isfinite(x).all() for x in got)
  o, dq = np.asarray(got[0]), np.asarray(got[1])
  np.testing.assert_array_equal(o[:, :16], 0.0)
  np.testing.assert_array_equal(o[:, 18], 0.0)
  np.testing.assert_array_equal(dq[:, :16], 0.0)
  assert np.abs(o[:, 16]).min() > 0
  assert_matches_oracle(got, q, k, v, do, seg, jnp.float32, causal=True)


def tpu_kernels(interpret):
  """The TPU kernels under an interpreter, with tiles far below TPU sizes to cross blocks."""
  def attention(q, k, v, seg, *, causal):
    q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
    return pallas.attention(q, k, v, causal=causal, q_segment_BT=q_seg, kv_segment_BS=kv_seg,
                            softmax_scale=q.shape[-1] ** -0.5, platform='tpu',
                            interpret=interpret, block_q=8, block_k=16)
  return attention


@pytest.mark.parametrize('p', [
    dict(seed=0, B=2, T=17, S=40, N=4, K=2, H=16, G=8, segments='pair', causal=True),
    dict(seed=1, B=1, T=33, S=20, N=3, K=1, H=8, G=24, segments=None, causal=True),
    dict(seed=2, B=1, T=24, S=24, N=2, K=2, H=16, G=16, segments='one', causal=False),
])
def test_tpu_kernels_match_oracle(p):
  check_problem(tpu_kernels(interpret=True), dict(p, dtype=jnp.float32))


def test_tpu_kernels_in_tpu_interpret_mode():
  """TPU interpret mode simulates VMEM and runs 'parallel' grid axes in a random order, which
  catches state carried across a grid axis wrongly marked parallel."""
  check_problem(tpu_kernels(pltpu.InterpretParams(random_seed=0)),
                dict(seed=4, B=1, T=17, S=30, N=2, K=1, H=8, G=8, segments='pair', causal=True,
                     dtype=jnp.float32))


@pytest.mark.parametrize('platform,lowering', [('gpu', 'cuda'), ('tpu', 'tpu')])
@pytest.mark.parametrize('shape,causal,segmented,dtype', [
    ((2, 256, 256, 4, 4, 128, 128), True, False, jnp.bfloat16),
    ((1, 200, 300, 8, 2, 64, 64), True, True, jnp.float16),
    ((1, 1, 77, 4, 2, 64, 64), False, True, jnp.float32),    # a decode step over a padded cache
    ((1, 128, 128, 2, 1, 192, 128), True, False, jnp.bfloat16),  # MLA
])
def test_kernels_lower_for_their_devices(platform, lowering, shape, causal, segmented, dtype):
  """Forward and backward lower to Triton IR / Mosaic for cuda / tpu (no device needed), with
  the platform's default tiles; compiling that IR to machine code needs the device."""
  B, T, S, N, K, H, G = shape
  segs = (jax.ShapeDtypeStruct((B, T), jnp.int32),
          jax.ShapeDtypeStruct((B, S), jnp.int32)) if segmented else (None, None)

  def fwd_bwd(q, k, v, do, q_seg, kv_seg):
    f = lambda q, k, v: pallas.attention(q, k, v, causal=causal, q_segment_BT=q_seg,
                                         kv_segment_BS=kv_seg, softmax_scale=0.1,
                                         platform=platform)
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(do)

  args = [jax.ShapeDtypeStruct(s, dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, G),
                                                    (B, T, N, G))]
  hlo = jax.jit(fwd_bwd).trace(*args, *segs).lower(lowering_platforms=(lowering,)).as_text()
  target = {'cuda': '__gpu$xla.gpu.triton', 'tpu': 'tpu_custom_call'}[lowering]
  assert hlo.count(f'custom_call @{target}') == 3  # forward, dq, dk/dv


def brute_force_blocks(spec):
  """Per query block, the key blocks holding a visible key, and those wholly visible and unpadded;
  per key block, the query blocks that see a key of it, and those that see all of it unpadded."""
  t = np.arange(spec.num_q * spec.block_q)[:, None]
  s = np.arange(spec.num_k * spec.block_k)[None, :]
  see = (s <= t + spec.kv_len - spec.q_len) if spec.causal else np.ones_like(t + s, bool)
  see_real = see & (s < spec.kv_len)
  tiled = lambda x: x.reshape(spec.num_q, spec.block_q, spec.num_k, spec.block_k)
  any_, all_ = tiled(see_real).any((1, 3)), tiled(see_real).all((1, 3))
  return any_, all_


@settings(_PROPERTY, max_examples=100)
@given(st.integers(1, 80), st.integers(1, 80), st.sampled_from([8, 16]),
       st.sampled_from([8, 16, 32]), st.booleans())
def test_block_ranges_skip_exactly_the_masked_blocks(T, S, block_q, block_k, causal):
  """kv_blocks and q_blocks: skipped blocks hold no visible key; unmasked ones need no mask."""
  spec = tiles.Spec(q_len=T, kv_len=S, block_q=block_q, block_k=block_k, causal=causal,
                    scale=1.0, segmented=False)
  any_, all_ = brute_force_blocks(spec)
  for i in range(spec.num_q):
    full, hi = (int(x) for x in spec.kv_blocks(jnp.int32(i)))
    assert not any_[i, hi:].any() and (hi == 0 or any_[i, hi - 1])
    assert all_[i, :full].all() and (full == spec.num_k or not all_[i, full])
  for j in range(spec.num_k):
    lo, full = (int(x) for x in spec.q_blocks(jnp.int32(j)))
    assert not any_[:lo, j].any() and all_[full:, j].all()


def test_oracle_gradient_matches_central_differences():
  q, k, v, do, seg = draw(6, 1, 3, 4, 2, 1, 4, 3, 'pair')
  kw = dict(causal=True, **as_oracle_segments(seg))
  _, *grads = np_attention_vjp(q, k, v, do, **kw)
  for i, (x, g) in enumerate(zip((q, k, v), grads)):
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      e = np.zeros_like(x)
      e[idx] = 1e-6
      shifted = lambda sign: np_attention_vjp(*((q, k, v)[j] + sign * e if j == i else (q, k, v)[j]
                                                for j in range(3)), do, **kw)[0]
      fd[idx] = np.vdot(do, shifted(1) - shifted(-1)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_auto_is_xla_on_cpu_and_logged_once(caplog):
  api._auto.cache_clear()
  attention = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))
  with caplog.at_level(logging.INFO):
    for T in (5, 6):  # two traces, two backend choices, one log line
      q, k, v, _, _ = draw(T, 1, T, T, 2, 1, 8, 8, None)
      got = attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
      want = np_attention_vjp(q, k, v, np.zeros((1, T, 2, 8)), causal=True)[0]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert [r.getMessage() for r in caplog.records if 'flash_attention' in r.getMessage()] == [
      'flash_attention backend="auto" on cpu: using \'xla\'']


def qkv(dtype=jnp.float32):
  return (jnp.zeros((2, 5, 4, 8), dtype), jnp.zeros((2, 5, 2, 8), dtype),
          jnp.zeros((2, 5, 2, 8), dtype))


def test_mixed_dtypes_raise():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=re.escape('q, k, v dtypes bfloat16, float32, float32')):
    flash_attention(q.astype(jnp.bfloat16), k, v)


@pytest.mark.parametrize('backend,device', [('pallas_gpu', 'gpu'), ('pallas_tpu', 'tpu')])
def test_device_backends_refuse_cpu(backend, device):
  with pytest.raises(ValueError, match=re.escape(f"backend='{backend}' needs a {device}")):
    flash_attention(*qkv(), backend=backend)


def test_backends_are_listed():
  assert set(api.available_backends()) == {'auto', 'reference', 'xla', 'pallas_gpu',
                                           'pallas_tpu', 'interpret'}
