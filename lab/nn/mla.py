"""Multi-head Latent Attention (MLA): DeepSeek-V2 §2.1 (eqs. 9-19), DeepSeek-V3 §2.1.1 (eqs. 1-11).

Keys and values are rebuilt from one small latent per token, c^KV_t = W^DKV h_t (V3 eq. 1), plus
one RoPE key k^R_t = RoPE(W^KR h_t) shared by all heads (eq. 3); queries come from their own
latent c^Q_t = W^DQ h_t (eq. 6). Both latents pass through an RMSNorm (V3 §4.2: "additional
RMSNorm layers after the compressed latent vectors"). A decoding cache holds only c^KV and k^R:
d_c + d_h^R numbers a token instead of 2 N d_h.

Shape letters beyond the usual ones: Q query latent d_c' (q_lora_rank), C kv latent d_c
(kv_lora_rank), H non-rotary head dim d_h (qk_nope_dim), R rotary head dim d_h^R (qk_rope_dim),
G value head dim (v_head_dim).

Two equivalent ways to attend:
  naive     (training, prefill) per-head keys [k^C; k^R] and values v^C, eqs. 2, 4, 5, 9-10.
  absorbed  (decode, V2 §2.1.2) W^UK is folded into the query and W^UV applied after attention:
            score = (q^C W^UK^T) c^KV + q^R k^R, o = (softmax c^KV) W^UV. This is attention with
            one shared key [c^KV; k^R] (dim C+R) and one shared value c^KV (dim C), so cached
            tokens are never expanded into per-head keys or values. `mla_decode_step` appends
            one token; `mla_extend` a block of tokens under any mask among them (speculative
            verification, lab.nn.cached_attention).
`fp8=True` runs the projections W^DQ, W^UQ, W^QR, W^DKV, W^KR, W^UK, W^UV and W^O through
DeepSeek-V3's fine-grained FP8 GEMMs (lab.nn.fp8, §3.3); the attention core and, in the
absorbed decode, the per-head products with W^UK and W^UV stay in the input dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.kernels import flash_attention
from lab.nn import cached_attention, norms, rope
from lab.nn import fp8 as fp8_lib
from lab.nn import param_spec as ps


def mla_specs(d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int, qk_nope_dim: int,
              qk_rope_dim: int, v_head_dim: int, *, std: float, out_std: float) -> dict:
  """Parameters (V3 eqs. 1-11): w_dq_DQ, q_norm_Q, w_uq_QNH, w_qr_QNR, w_dkv_DC, w_kr_DR,
  kv_norm_C, w_uk_CNH, w_uv_CNG, w_o_NGD. q_lora_rank = 0 means no query compression (as in
  DeepSeek-V2-Lite): no w_dq / q_norm, and w_uq_DNH, w_qr_DNR read h_t directly (W^Q)."""
  dims = dict(d_model=d_model, n_heads=n_heads, kv_lora_rank=kv_lora_rank,
              qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim, v_head_dim=v_head_dim)
  for name, value in dims.items():
    if value < 1:
      raise ValueError(f'MLA {name}={value}; expected a positive integer')
  if q_lora_rank < 0:
    raise ValueError(f'MLA q_lora_rank={q_lora_rank}; expected 0 (no query compression) or more')
  if qk_rope_dim % 2:
    raise ValueError(f'MLA qk_rope_dim={qk_rope_dim}; expected an even number (RoPE pairs)')
  D, N, Q, C, H, R, G = (d_model, n_heads, q_lora_rank, kv_lora_rank, qk_nope_dim, qk_rope_dim,
                         v_head_dim)
  specs = {}
  q_in, q_axis = D, 'embed'
  if Q:
    specs['w_dq'] = ps.ParamSpec((D, Q), ps.normal(std), ('embed', 'q_lora'))
    specs['q_norm'] = ps.ParamSpec((Q,), ps.ones, ('q_lora',))
    q_in, q_axis = Q, 'q_lora'
  return specs | {
      'w_uq': ps.ParamSpec((q_in, N, H), ps.normal(std), (q_axis, 'heads', 'head_dim')),
      'w_qr': ps.ParamSpec((q_in, N, R), ps.normal(std), (q_axis, 'heads', 'head_dim')),
      'w_dkv': ps.ParamSpec((D, C), ps.normal(std), ('embed', 'kv_lora')),
      'w_kr': ps.ParamSpec((D, R), ps.normal(std), ('embed', 'head_dim')),
      'kv_norm': ps.ParamSpec((C,), ps.ones, ('kv_lora',)),
      'w_uk': ps.ParamSpec((C, N, H), ps.normal(std), ('kv_lora', 'heads', 'head_dim')),
      'w_uv': ps.ParamSpec((C, N, G), ps.normal(std), ('kv_lora', 'heads', 'head_dim')),
      'w_o': ps.ParamSpec((N, G, D), ps.normal(out_std), ('heads', 'head_dim', 'embed')),
  }


def cache_elements_per_token(kv_lora_rank: int, qk_rope_dim: int) -> int:
  """Numbers one token puts in an MLA cache per layer: d_c + d_h^R (V2 Table 1)."""
  return kv_lora_rank + qk_rope_dim


def mha_cache_elements_per_token(n_kv_heads: int, head_dim: int) -> int:
  """The same for MHA / GQA, which caches a key and a value per kv head: 2 K H."""
  return 2 * n_kv_heads * head_dim


def _softmax_scale(p: dict) -> float:
  """1 / sqrt(d_h + d_h^R) (V3 eq. 10)."""
  return (p['w_uq'].shape[-1] + p['w_qr'].shape[-1]) ** -0.5


def _project(p: dict, x_BTD, positions_BT, rope_theta: float, eps: float, fp8: bool):
  """(q^C_BTNH, q^R_BTNR, c^KV_BTC, k^R_BTR) of V3 eqs. 6-8, 1 and 3 (latents RMS-normed)."""
  dot = lambda x, w: fp8_lib.linear(x, w, fp8=fp8)
  c_BTQ = x_BTD
  if 'w_dq' in p:
    c_BTQ = norms.rms_norm(dot(x_BTD, p['w_dq']), p['q_norm'], eps)
  q_c_BTNH = dot(c_BTQ, p['w_uq'])
  q_r_BTNR = rope.apply_rope(dot(c_BTQ, p['w_qr']), positions_BT, rope_theta)
  c_kv_BTC = norms.rms_norm(dot(x_BTD, p['w_dkv']), p['kv_norm'], eps)
  k_r_BT1R = rope.apply_rope(dot(x_BTD, p['w_kr'])[:, :, None], positions_BT, rope_theta)
  return q_c_BTNH, q_r_BTNR, c_kv_BTC, k_r_BT1R[:, :, 0]


def _out(p: dict, o_BTNG, fp8: bool):
  """u_BTD = o W^O over the heads' concatenated outputs (V3 eq. 11)."""
  B, T, N, G = o_BTNG.shape
  return fp8_lib.linear(o_BTNG.reshape(B, T, N * G), p['w_o'].reshape(N * G, -1), fp8=fp8)


def _naive(p, x_BTD, positions_BT, rope_theta, causal, segment_ids, backend, eps, fp8):
  """(y_BTD, c^KV_BTC, k^R_BTR): per-head keys and values, V3 eqs. 1-11."""
  q_c_BTNH, q_r_BTNR, c_kv_BTC, k_r_BTR = _project(p, x_BTD, positions_BT, rope_theta, eps, fp8)
  N = q_c_BTNH.shape[2]
  k_c_BTNH = fp8_lib.linear(c_kv_BTC, p['w_uk'], fp8=fp8)
  v_BTNG = fp8_lib.linear(c_kv_BTC, p['w_uv'], fp8=fp8)
  k_r_BTNR = jnp.broadcast_to(k_r_BTR[:, :, None], (*k_r_BTR.shape[:2], N, k_r_BTR.shape[-1]))
  q_BTNX = jnp.concatenate([q_c_BTNH, q_r_BTNR], axis=-1)
  k_BTNX = jnp.concatenate([k_c_BTNH, k_r_BTNR], axis=-1)
  o_BTNG = flash_attention(q_BTNX, k_BTNX, v_BTNG, causal=causal, segment_ids=segment_ids,
                           softmax_scale=_softmax_scale(p), backend=backend)
  return _out(p, o_BTNG, fp8), c_kv_BTC, k_r_BTR


def mla_attention(p: dict, x_BTD: jax.Array, positions_BT: jax.Array, *, rope_theta: float,
                  causal: bool = True, segment_ids=None, backend: str = 'auto',
                  eps: float = 1e-6, fp8: bool = False) -> jax.Array:
  """MLA output u_BTD (V3 eqs. 1-11), naive form for training and prefill.

  q_{t,i} = [q^C_{t,i}; q^R_{t,i}] and k_{j,i} = [k^C_{j,i}; k^R_j] have d_h + d_h^R dims, values
  d_h^v; segment_ids as in `flash_attention`; eps is the latents' RMSNorm epsilon; fp8: the
  projections in FP8 (module docstring).
  """
  return _naive(p, x_BTD, positions_BT, rope_theta, causal, segment_ids, backend, eps, fp8)[0]


def mla_prefill(p: dict, x_BTD: jax.Array, max_len: int, *, rope_theta: float,
                backend: str = 'auto', eps: float = 1e-6, fp8: bool = False):
  """Causal MLA over a prompt at positions 0..T-1 -> (y_BTD, cache) with room for max_len tokens.

  cache = {'c_kv': [B, max_len, C], 'k_rope': [B, max_len, R] (after RoPE), 'length': int32}.
  """
  B, T, _ = x_BTD.shape
  if max_len < T:
    raise ValueError(f'mla_prefill max_len={max_len}; expected at least the prompt length {T}')
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  y_BTD, c_kv_BTC, k_r_BTR = _naive(p, x_BTD, positions_BT, rope_theta, True, None, backend, eps,
                                    fp8)
  pad = ((0, 0), (0, max_len - T), (0, 0))
  cache = {'c_kv': jnp.pad(c_kv_BTC, pad), 'k_rope': jnp.pad(k_r_BTR, pad),
           'length': jnp.asarray(T, jnp.int32)}
  return y_BTD, cache


def mla_decode_step(p: dict, x_B1D: jax.Array, cache: dict, *, rope_theta: float,
                    backend: str = 'auto', eps: float = 1e-6, fp8: bool = False):
  """One token per row at position cache['length'] -> (y_B1D, new cache), in the absorbed form
  (V2 §2.1.2): scores (q^C W^UK^T) c^KV + q^R k^R, output (softmax c^KV) W^UV W^O.

  The caller keeps length < max_len: the length is traced, so a full cache cannot be detected.
  """
  B, T, _ = x_B1D.shape
  if T != 1:
    raise ValueError(f'mla_decode_step got {T} tokens per row; expected 1')
  length = cache['length']
  S = cache['c_kv'].shape[1]
  positions_B1 = jnp.full((B, 1), length, jnp.int32)
  q_c_B1NH, q_r_B1NR, c_kv_B1C, k_r_B1R = _project(p, x_B1D, positions_B1, rope_theta, eps, fp8)
  update = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                                length, 1)
  c_kv_BSC, k_r_BSR = update(cache['c_kv'], c_kv_B1C), update(cache['k_rope'], k_r_B1R)
  q_B1NX = _absorbed_query(p, q_c_B1NH, q_r_B1NR)
  k_BS1X = jnp.concatenate([c_kv_BSC, k_r_BSR], axis=-1)[:, :, None]
  # Keys 0..length are filled (segment 1); the rest of the buffer is empty (segment 0).
  kv_seg_BS = jnp.broadcast_to((jnp.arange(S) <= length).astype(jnp.int32), (B, S))
  o_B1NC = flash_attention(q_B1NX.astype(k_BS1X.dtype), k_BS1X, c_kv_BSC[:, :, None],
                           segment_ids=(jnp.ones((B, 1), jnp.int32), kv_seg_BS),
                           softmax_scale=_softmax_scale(p), backend=backend)
  o_B1NG = jnp.einsum('BTNC,CNG->BTNG', o_B1NC, p['w_uv'])
  y_B1D = _out(p, o_B1NG, fp8)
  return y_B1D, {'c_kv': c_kv_BSC, 'k_rope': k_r_BSR, 'length': length + 1}


def _absorbed_query(p: dict, q_c_BTNH, q_r_BTNR):
  """[q^C W^UK^T; q^R]: the query of the absorbed form, N heads of dim C + R."""
  return jnp.concatenate([jnp.einsum('BTNH,CNH->BTNC', q_c_BTNH, p['w_uk']), q_r_BTNR], axis=-1)


def mla_extend(p: dict, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTT, cache: dict, *,
               rope_theta: float, backend: str = 'auto', eps: float = 1e-6, fp8: bool = False):
  """T new tokens after the cache's `length` entries, absorbed form -> (y_BTD, cache).

  Each new token attends to the cached tokens 0..length-1 and, among the new ones, as mask_BTT
  allows (None: causal); its c^KV and k^R are written at length..length+T-1 and the length is
  left as it was (lab.nn.cached_attention.extend_attention; compact keeps the accepted ones).
  cache = {'c_kv': [B, S, C], 'k_rope': [B, S, R], 'length': int32} as mla_prefill makes it.
  """
  C = cache['c_kv'].shape[-1]
  q_c_BTNH, q_r_BTNR, c_kv_BTC, k_r_BTR = _project(p, x_BTD, positions_BT, rope_theta, eps, fp8)
  k_cache_BS1X = jnp.concatenate([cache['c_kv'], cache['k_rope']], axis=-1)[:, :, None]
  q_BTNX = _absorbed_query(p, q_c_BTNH, q_r_BTNR).astype(k_cache_BS1X.dtype)
  o_BTNC, k_cache_BS1X, v_cache_BS1C = cached_attention.extend_attention(
      q_BTNX, jnp.concatenate([c_kv_BTC, k_r_BTR], axis=-1)[:, :, None], c_kv_BTC[:, :, None],
      k_cache_BS1X, cache['c_kv'][:, :, None], cache['length'], mask_BTT, backend=backend,
      softmax_scale=_softmax_scale(p))
  y_BTD = _out(p, jnp.einsum('BTNC,CNG->BTNG', o_BTNC, p['w_uv']), fp8)
  return y_BTD, {'c_kv': v_cache_BS1C[:, :, 0], 'k_rope': k_cache_BS1X[:, :, 0, C:],
                 'length': cache['length']}
