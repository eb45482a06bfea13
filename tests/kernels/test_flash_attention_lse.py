"""return_lse: every backend's row log-sum-exp and its gradient (through q, k) equal a float64
NumPy oracle; rows with no visible key give -inf."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.kernels import flash_attention
from oracles import as_jax_segments, draw_segments


def np_lse(q_BTNH, k_BSKH, causal, seg, scale):
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  k_BSNH = np.repeat(k_BSKH, N // K, axis=2)
  s_BNTS = np.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH) * scale
  visible = np.ones((B, 1, T, S), bool)
  if causal:
    visible &= (np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T)[None, None]
  if seg is not None:
    q_seg, kv_seg = seg if isinstance(seg, tuple) else (seg, seg)
    visible &= (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  s_BNTS = np.where(visible, s_BNTS, -np.inf)
  with np.errstate(divide='ignore', invalid='ignore'):
    m = s_BNTS.max(-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    lse = np.log(np.exp(s_BNTS - m_safe).sum(-1)) + m_safe[..., 0]
  return lse.transpose(0, 2, 1)  # B T N


@pytest.mark.parametrize('backend', ['reference', 'xla', 'interpret'])
@pytest.mark.parametrize('causal, segments, T, S', [(True, None, 19, 19), (False, 'pair', 7, 21),
                                                    (True, None, 5, 23)])
def test_lse_and_its_gradient_match_oracle(backend, causal, segments, T, S):
  rng = np.random.default_rng(T + S)
  B, N, K, H = 2, 4, 2, 8
  q = rng.standard_normal((B, T, N, H)).astype(np.float32)
  k = rng.standard_normal((B, S, K, H)).astype(np.float32)
  v = rng.standard_normal((B, S, K, H)).astype(np.float32)
  seg = draw_segments(rng, B, T, S, segments)
  scale = H ** -0.5
  want = np_lse(q.astype(np.float64), k.astype(np.float64), causal, seg, scale)

  def lse_of(q, k):
    return flash_attention(q, k, jnp.asarray(v), causal=causal, segment_ids=as_jax_segments(seg),
                           backend=backend, return_lse=True)[1]

  got = jax.jit(lse_of)(q, k)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(np.asarray(got)[finite], want[finite], rtol=1e-5, atol=1e-5)
  # d/dq of sum(r * lse) over rows that see a key is sum_s p_ts k_s * scale * r_t.
  r = np.where(finite, rng.standard_normal(want.shape), 0.0).astype(np.float32)
  dq, dk = jax.jit(jax.grad(lambda q, k: jnp.sum(jnp.where(finite, lse_of(q, k), 0.0) * r),
                            argnums=(0, 1)))(q, k)
  eps = 1e-3
  for arr, grad in ((q, dq), (k, dk)):
    for idx in [tuple(rng.integers(0, n) for n in arr.shape) for _ in range(4)]:
      plus, minus = arr.astype(np.float64).copy(), arr.astype(np.float64).copy()
      plus[idx] += eps
      minus[idx] -= eps
      args = lambda a: (a, k.astype(np.float64)) if arr is q else (q.astype(np.float64), a)
      f = lambda a: np.sum(np.where(finite, np_lse(*args(a), causal, seg, scale), 0.0) * r)
      np.testing.assert_allclose(grad[idx], (f(plus) - f(minus)) / (2 * eps), rtol=2e-3,
                                 atol=2e-4)
