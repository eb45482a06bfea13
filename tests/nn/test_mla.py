"""Multi-head Latent Attention against a float64 NumPy oracle of DeepSeek-V3 eqs. 1-11, the
absorbed decode against the naive path, and one attention layer of transformers' DeepseekV3."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.kernels.flash_attention import reference
from lab.nn import mla, mla_hf
from lab.nn import param_spec as ps
from oracles import assert_vjp_matches_oracle

# d_model, n_heads, kv_lora_rank, qk_nope_dim, qk_rope_dim, v_head_dim: all different, so a
# swapped axis cannot go unnoticed.
DIMS = dict(d_model=12, n_heads=3, kv_lora_rank=7, qk_nope_dim=5, qk_rope_dim=4, v_head_dim=3)
THETA = 100.0  # small, so that a few positions already turn the rotary pairs by large angles
EPS = 1e-6


def specs(q_lora_rank):
  return mla.mla_specs(**DIMS, q_lora_rank=q_lora_rank, std=0.3, out_std=0.2)


def draw_params(rng, q_lora_rank):
  """Random params of `specs` (norm scales around 1), float32 values held in float64."""
  def draw(spec):
    if len(spec.shape) == 1:
      a = 1.0 + 0.3 * rng.standard_normal(spec.shape)
    else:
      a = rng.standard_normal(spec.shape) / np.sqrt(spec.shape[0])
    return a.astype(np.float32).astype(np.float64)
  return jax.tree.map(draw, specs(q_lora_rank), is_leaf=ps.is_spec)


def draw_x(rng, B, T):
  return rng.standard_normal((B, T, DIMS['d_model'])).astype(np.float32).astype(np.float64)


# ---------------------------------------------------------------- float64 NumPy oracle


def np_rms_norm(x, g):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + EPS) * g


def np_rope(x_TR, pos_T):
  """RoFormer eq. 34: pair (i, i + R/2) turned by the angle pos * theta^(-2i/R)."""
  R = x_TR.shape[-1]
  angle_Ti = pos_T[:, None] * THETA ** (-2.0 * np.arange(R // 2) / R)
  a, b = x_TR[:, :R // 2], x_TR[:, R // 2:]
  return np.concatenate([a * np.cos(angle_Ti) - b * np.sin(angle_Ti),
                         a * np.sin(angle_Ti) + b * np.cos(angle_Ti)], axis=-1)


def np_latents(p, h_TD, pos_T):
  """c^KV_t (eq. 1, RMS-normed as V3 §4.2) and k^R_t (eq. 3) of one sequence."""
  return np_rms_norm(h_TD @ p['w_dkv'], p['kv_norm']), np_rope(h_TD @ p['w_kr'], pos_T)


def np_mla(p, x_BTD, pos_BT, seg_BT=None, causal=True):
  """u_t of DeepSeek-V3 eqs. 1-11, one sequence and one head at a time."""
  B, T, _ = x_BTD.shape
  N, H, R = p['w_uk'].shape[1], p['w_uk'].shape[2], p['w_qr'].shape[2]
  u_BTD = []
  for b in range(B):
    h_TD, pos_T = x_BTD[b], pos_BT[b]
    c_kv_TC, k_r_TR = np_latents(p, h_TD, pos_T)                             # eqs. 1, 3
    c_q = np_rms_norm(h_TD @ p['w_dq'], p['q_norm']) if 'w_dq' in p else h_TD  # eq. 6
    visible_TS = np.ones((T, T), bool)
    if causal:
      visible_TS &= np.arange(T)[None, :] <= np.arange(T)[:, None]
    if seg_BT is not None:
      visible_TS &= seg_BT[b][:, None] == seg_BT[b][None, :]
    o_heads = []
    for i in range(N):
      k_TX = np.concatenate([c_kv_TC @ p['w_uk'][:, i], k_r_TR], axis=-1)     # eqs. 2, 4
      v_TG = c_kv_TC @ p['w_uv'][:, i]                                        # eq. 5
      q_TX = np.concatenate([c_q @ p['w_uq'][:, i],                           # eqs. 7, 9
                             np_rope(c_q @ p['w_qr'][:, i], pos_T)], axis=-1)  # eq. 8
      s_TS = np.where(visible_TS, q_TX @ k_TX.T / np.sqrt(H + R), -np.inf)    # eq. 10
      w_TS = np.exp(s_TS - s_TS.max(-1, keepdims=True))
      o_heads.append(w_TS / w_TS.sum(-1, keepdims=True) @ v_TG)
    u_BTD.append(np.concatenate(o_heads, -1) @ p['w_o'].reshape(-1, p['w_o'].shape[-1]))  # eq. 11
  return np.stack(u_BTD)


def positions(B, T):
  return np.broadcast_to(np.arange(T), (B, T))


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@functools.partial(jax.jit, static_argnames=('causal', 'backend'))
def attend(p, x_BTD, pos_BT, segment_ids=None, causal=True, backend='auto'):
  return mla.mla_attention(p, x_BTD, pos_BT, rope_theta=THETA, causal=causal,
                           segment_ids=segment_ids, backend=backend)


# ---------------------------------------------------------------- naive path vs the oracle


@pytest.mark.parametrize('q_lora_rank', [0, 6])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('seed', range(2))
def test_naive_matches_oracle(q_lora_rank, causal, seed):
  rng = np.random.default_rng(seed)
  p, x_BTD = draw_params(rng, q_lora_rank), draw_x(rng, 2, 6)
  pos_BT = rng.integers(0, 20, (2, 6))  # arbitrary positions exercise RoPE off the diagonal
  got = attend(f32(p), f32(x_BTD), jnp.asarray(pos_BT), causal=causal)
  assert got.shape == x_BTD.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_mla(p, x_BTD, pos_BT, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('q_lora_rank', [0, 6])
def test_naive_gradients_match_oracle(q_lora_rank):
  rng = np.random.default_rng(q_lora_rank)
  p, x_BTD = draw_params(rng, q_lora_rank), draw_x(rng, 1, 4)
  names = sorted(p)
  pos_BT = positions(1, 4) + 3

  def f(x, *leaves):
    return mla.mla_attention(dict(zip(names, leaves)), x, jnp.asarray(pos_BT), rope_theta=THETA)

  def oracle(x, *leaves):
    return np_mla(dict(zip(names, leaves)), x, pos_BT)

  assert_vjp_matches_oracle(f, oracle, [x_BTD, *(p[k] for k in names)], rng)


def test_segments_attend_within_their_own_sequence():
  """Two packed sequences (positions restarting) give what each gives alone."""
  rng = np.random.default_rng(3)
  p, x_BTD = f32(draw_params(rng, 6)), f32(draw_x(rng, 1, 7))
  seg_BT = jnp.asarray([[1, 1, 1, 2, 2, 2, 2]])
  pos_BT = jnp.asarray([[0, 1, 2, 0, 1, 2, 3]])
  packed = attend(p, x_BTD, pos_BT, seg_BT)
  first = attend(p, x_BTD[:, :3], pos_BT[:, :3])
  second = attend(p, x_BTD[:, 3:], pos_BT[:, 3:])
  np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(packed, np_mla(jax.tree.map(np.float64, p), np.float64(x_BTD),
                                            np.asarray(pos_BT), seg_BT=np.asarray(seg_BT)),
                             rtol=1e-5, atol=1e-5)


def test_later_tokens_do_not_change_earlier_outputs():
  rng = np.random.default_rng(4)
  p, x_BTD = f32(draw_params(rng, 6)), draw_x(rng, 2, 8)
  t = 4
  x2_BTD = x_BTD.copy()
  x2_BTD[:, t + 1:] = draw_x(rng, 2, 8 - t - 1)
  y, y2 = (attend(p, f32(x), jnp.asarray(positions(2, 8))) for x in (x_BTD, x2_BTD))
  np.testing.assert_allclose(y[:, :t + 1], y2[:, :t + 1], rtol=1e-6, atol=1e-6)
  assert np.abs(y[:, t + 1:] - y2[:, t + 1:]).min() > 1e-4


# ---------------------------------------------------------------- absorbed decode vs naive


def prefill_and_decode(p, x_BTD, T_prompt, max_len, **kw):
  """Outputs of prefill on the prompt, then one decode step per remaining token, and the cache."""
  prefill = jax.jit(lambda x: mla.mla_prefill(p, x, max_len, rope_theta=THETA, **kw))
  y_BTD, cache = prefill(x_BTD[:, :T_prompt])
  step = jax.jit(lambda x, c: mla.mla_decode_step(p, x, c, rope_theta=THETA, **kw))
  ys = [y_BTD]
  for t in range(T_prompt, x_BTD.shape[1]):
    y_B1D, cache = step(x_BTD[:, t:t + 1], cache)
    ys.append(y_B1D)
  return jnp.concatenate(ys, axis=1), cache


@pytest.mark.parametrize('q_lora_rank, backend', [(0, 'auto'), (6, 'auto'), (6, 'interpret')])
def test_absorbed_decode_matches_naive(q_lora_rank, backend):
  B, T_prompt, T, max_len = 2, 3, 7, 9
  rng = np.random.default_rng(5)
  p, x_BTD = f32(draw_params(rng, q_lora_rank)), f32(draw_x(rng, B, T))
  got, cache = prefill_and_decode(p, x_BTD, T_prompt, max_len, backend=backend)
  want = attend(p, x_BTD, jnp.asarray(positions(B, T)), backend=backend)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  assert int(cache['length']) == T


def test_absorbed_decode_matches_naive_float64(x64, monkeypatch):
  """In float64 the two forms agree to rounding. flash_attention accepts no float64, so its
  reference backend (which keeps float64) stands in for it here."""
  def reference_f64(q, k, v, *, causal=False, segment_ids=None, softmax_scale=None, backend=None):
    del backend
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
    return reference.attention(q, k, v, causal=causal, q_segment_BT=q_seg, kv_segment_BS=kv_seg,
                               softmax_scale=softmax_scale)

  monkeypatch.setattr(mla, 'flash_attention', reference_f64)
  rng = np.random.default_rng(6)
  p, x_BTD = draw_params(rng, 6), draw_x(rng, 2, 6)
  got, _ = prefill_and_decode(jax.tree.map(jnp.asarray, p), jnp.asarray(x_BTD), 2, 8)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_mla(p, x_BTD, positions(2, 6)), rtol=1e-11, atol=1e-12)


def test_cache_holds_the_latent_and_rope_key_only():
  """d_c + d_h^R numbers a token: c^KV (eq. 1) and k^R after RoPE (eq. 3); empty slots stay 0."""
  rng = np.random.default_rng(7)
  p, x_BTD = draw_params(rng, 6), draw_x(rng, 2, 5)
  _, cache = prefill_and_decode(f32(p), f32(x_BTD), 3, 8)
  B, S, C, R = 2, 8, DIMS['kv_lora_rank'], DIMS['qk_rope_dim']
  assert set(cache) == {'c_kv', 'k_rope', 'length'}
  assert cache['c_kv'].shape == (B, S, C) and cache['k_rope'].shape == (B, S, R)
  per_token = (cache['c_kv'].size + cache['k_rope'].size) // (B * S)
  assert per_token == mla.cache_elements_per_token(C, R) == C + R
  for b in range(B):
    c_kv_TC, k_r_TR = np_latents(p, x_BTD[b], np.arange(5))
    np.testing.assert_allclose(cache['c_kv'][b, :5], c_kv_TC, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cache['k_rope'][b, :5], k_r_TR, rtol=1e-5, atol=1e-6)
  assert not np.any(cache['c_kv'][:, 5:]) and not np.any(cache['k_rope'][:, 5:])
  # DeepSeek-V3: 512 + 64 = 576 against 2 * 128 * 128 for MHA with 128 heads of 128 (V2 Table 1).
  assert mla.cache_elements_per_token(512, 64) == 576
  assert mla.mha_cache_elements_per_token(128, 128) == 32768
  assert mla.mha_cache_elements_per_token(8, 128) == 2048


# ---------------------------------------------------------------- parameters and errors


def test_specs_shapes_and_axes():
  s = mla.mla_specs(**DIMS, q_lora_rank=6, std=0.02, out_std=0.01)
  D, N, C, H, R, G = DIMS.values()
  assert {k: v.shape for k, v in s.items()} == {
      'w_dq': (D, 6), 'q_norm': (6,), 'w_uq': (6, N, H), 'w_qr': (6, N, R), 'w_dkv': (D, C),
      'w_kr': (D, R), 'kv_norm': (C,), 'w_uk': (C, N, H), 'w_uv': (C, N, G), 'w_o': (N, G, D)}
  assert s['w_uk'].axes == ('kv_lora', 'heads', 'head_dim')
  s0 = mla.mla_specs(**DIMS, q_lora_rank=0, std=0.02, out_std=0.01)
  assert 'w_dq' not in s0 and 'q_norm' not in s0 and s0['w_uq'].shape == (D, N, H)
  assert s0['w_uq'].axes == ('embed', 'heads', 'head_dim')
  assert s['q_norm'].init is ps.ones and s['kv_norm'].init is ps.ones
  w = s['w_o'].init(jax.random.key(0), (4000,), jnp.float32)
  np.testing.assert_allclose(np.std(w), 0.01, rtol=0.1)


@pytest.mark.parametrize('bad, match', [
    (dict(n_heads=0), 'n_heads=0'),
    (dict(kv_lora_rank=-2), 'kv_lora_rank=-2'),
    (dict(qk_rope_dim=3), 'qk_rope_dim=3'),
    (dict(q_lora_rank=-1), 'q_lora_rank=-1'),
    (dict(v_head_dim=0), 'v_head_dim=0'),
])
def test_bad_dims_raise_one_line(bad, match):
  kw = DIMS | dict(q_lora_rank=4) | bad
  with pytest.raises(ValueError, match=match) as e:
    mla.mla_specs(**kw, std=0.02, out_std=0.02)
  assert '\n' not in str(e.value)


def test_bad_decode_calls_raise():
  p = f32(draw_params(np.random.default_rng(0), 0))
  x_BTD = jnp.zeros((1, 4, DIMS['d_model']))
  with pytest.raises(ValueError, match='max_len=3'):
    mla.mla_prefill(p, x_BTD, 3, rope_theta=THETA)
  cache = {'c_kv': jnp.zeros((1, 8, DIMS['kv_lora_rank'])),
           'k_rope': jnp.zeros((1, 8, DIMS['qk_rope_dim'])), 'length': jnp.asarray(4, jnp.int32)}
  with pytest.raises(ValueError, match='got 2 tokens'):
    mla.mla_decode_step(p, x_BTD[:, :2], cache, rope_theta=THETA)


# ---------------------------------------------------------------- transformers' DeepseekV3


def hf_attention(q_lora_rank, rope_interleave):
  import torch
  from transformers import DeepseekV3Config
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
  config = DeepseekV3Config(
      hidden_size=DIMS['d_model'], num_attention_heads=DIMS['n_heads'],
      num_key_value_heads=DIMS['n_heads'], q_lora_rank=q_lora_rank,
      kv_lora_rank=DIMS['kv_lora_rank'], qk_nope_head_dim=DIMS['qk_nope_dim'],
      qk_rope_head_dim=DIMS['qk_rope_dim'], v_head_dim=DIMS['v_head_dim'],
      rope_interleave=rope_interleave, rope_theta=THETA, num_hidden_layers=1, vocab_size=16,
      intermediate_size=8, moe_intermediate_size=4, attn_implementation='eager')
  torch.manual_seed(q_lora_rank or 0)
  attn, rotary = hf.DeepseekV3Attention(config, 0).double(), hf.DeepseekV3RotaryEmbedding(config)
  with torch.no_grad():
    for name, w in attn.named_parameters():  # HF inits norms to 1: draw them too
      w.copy_(torch.randn_like(w) * (0.3 if 'layernorm' in name else w.shape[-1] ** -0.5)
              + (1.0 if 'layernorm' in name else 0.0))
  return config, attn, rotary


@pytest.mark.parametrize('q_lora_rank, rope_interleave', [(6, True), (None, True), (6, False)])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank, rope_interleave):
  import torch
  config, attn, rotary = hf_attention(q_lora_rank, rope_interleave)
  cfg = mla_hf.mla_config_from_hf(config.to_dict())
  assert cfg['rope_theta'] == THETA and cfg['q_lora_rank'] == (q_lora_rank or 0)
  p = mla_hf.mla_params_from_hf({k: v.numpy() for k, v in attn.state_dict().items()}, cfg)
  assert jax.tree.map(np.shape, p) == jax.tree.map(
      lambda s: s.shape, specs(cfg['q_lora_rank']), is_leaf=ps.is_spec)
  B, T = 2, 6
  x_BTD = draw_x(np.random.default_rng(8), B, T)
  pos_BT = positions(B, T) + 5
  x_t = torch.tensor(x_BTD)
  mask = torch.full((T, T), -torch.inf, dtype=torch.float64).triu(1)[None, None]
  with torch.no_grad():
    cos_sin = tuple(a.double() for a in rotary(x_t, torch.tensor(pos_BT)))
    want = attn(x_t, position_embeddings=cos_sin, attention_mask=mask)[0].numpy()
  got = attend(f32(p), f32(x_BTD), jnp.asarray(pos_BT))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_hf_config_with_rope_scaling_is_refused():
  hf = dict(hidden_size=8, num_attention_heads=2, kv_lora_rank=4, qk_nope_head_dim=2,
            qk_rope_head_dim=2, v_head_dim=2,
            rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 40.0})
  with pytest.raises(ValueError, match='yarn'):
    mla_hf.mla_config_from_hf(hf)
