"""Hugging Face interop for `lab.nn.mla`: transformers' `DeepseekV3Attention` weights and config.

HF's names (nn.Linear stores [out, in]; output features are head-major, index n * dim + j):
  q_a_proj.weight [Q, D]              = w_dq^T            (absent when q_lora_rank is None)
  q_a_layernorm.weight [Q]            = q_norm
  q_b_proj.weight [N (H+R), Q]        = per head [w_uq | w_qr]^T  (q_proj [N (H+R), D] with no
                                        query compression, q_lora_rank None; ours is 0)
  kv_a_proj_with_mqa.weight [C+R, D]  = [w_dkv | w_kr]^T  (W^DKV and W^KR fused)
  kv_a_layernorm.weight [C]           = kv_norm
  kv_b_proj.weight [N (H+G), C]       = per head [w_uk | w_uv]^T
  o_proj.weight [D, N G]              = w_o^T
Both latent RMSNorms use HF's default eps 1e-6, `mla_attention`'s default.

RoPE layout: with `rope_interleave` (HF's default, as DeepSeek's checkpoints are stored) HF rotates
the pairs (x_0, x_1), (x_2, x_3), ... and writes the result half-split; `lab.nn.rope` rotates
(x_i, x_{i+R/2}). Taking the rotary output columns of W^QR and W^KR in the order
0, 2, 4, ..., 1, 3, 5, ... turns one into the other exactly (the rotated q^R, k^R are then equal),
so the mapping permutes those columns and lab keeps a single RoPE. Without `rope_interleave` the
layouts already agree.
"""
from __future__ import annotations

import numpy as np

_DEFAULTS = {'q_lora_rank': None, 'attention_bias': False, 'rope_interleave': True,
             'rope_parameters': None, 'rope_scaling': None, 'num_key_value_heads': None}


def mla_config_from_hf(hf: dict) -> dict:
  """`mla_specs` dims plus rope_theta and rope_interleave from a DeepseekV3Config dict (to_dict());
  RoPE scaling (YaRN, whose mscale changes the softmax scale) and attention biases are refused."""
  hf = _DEFAULTS | hf
  rope = hf['rope_parameters'] or {}
  if (rope.get('rope_type', 'default') != 'default' or hf['rope_scaling']
      or set(rope) - {'rope_type', 'rope_theta'}):
    raise ValueError(f"HF config rope_parameters={rope!r}, rope_scaling={hf['rope_scaling']!r} "
                     "not supported; expected {'rope_type': 'default', 'rope_theta': ...}")
  if hf['attention_bias']:
    raise ValueError('HF config attention_bias=True is not supported; expected False')
  n_kv = hf['num_key_value_heads'] or hf['num_attention_heads']
  if n_kv != hf['num_attention_heads']:
    raise ValueError(f'HF config num_key_value_heads={n_kv}; expected num_attention_heads='
                     f"{hf['num_attention_heads']} (MLA has one key per query head)")
  return dict(d_model=hf['hidden_size'], n_heads=hf['num_attention_heads'],
              q_lora_rank=hf['q_lora_rank'] or 0, kv_lora_rank=hf['kv_lora_rank'],
              qk_nope_dim=hf['qk_nope_head_dim'], qk_rope_dim=hf['qk_rope_head_dim'],
              v_head_dim=hf['v_head_dim'], rope_theta=rope.get('rope_theta', hf.get('rope_theta')),
              rope_interleave=bool(hf['rope_interleave']))


def rope_permutation(qk_rope_dim: int) -> np.ndarray:
  """Column order 0, 2, 4, ..., 1, 3, 5, ... taking HF's interleaved RoPE pairs to half-split."""
  return np.concatenate([np.arange(0, qk_rope_dim, 2), np.arange(1, qk_rope_dim, 2)])


def mla_params_from_hf(state: dict, cfg: dict) -> dict:
  """`mla_specs`-shaped float32 NumPy params from one layer's `self_attn` state dict (names
  without the 'model.layers.i.self_attn.' prefix) and `mla_config_from_hf`'s cfg."""
  N, Q, C = cfg['n_heads'], cfg['q_lora_rank'], cfg['kv_lora_rank']
  H, R, G = cfg['qk_nope_dim'], cfg['qk_rope_dim'], cfg['v_head_dim']
  perm = rope_permutation(R) if cfg['rope_interleave'] else np.arange(R)
  w = {k: np.asarray(v, np.float32) for k, v in state.items()}
  w_q = w['q_b_proj.weight'] if Q else w['q_proj.weight']
  w_q_XNY = w_q.T.reshape(-1, N, H + R)
  kv_a = w['kv_a_proj_with_mqa.weight'].T
  kv_b_CNY = w['kv_b_proj.weight'].T.reshape(C, N, H + G)
  params = {
      'w_uq': w_q_XNY[..., :H], 'w_qr': w_q_XNY[..., H:][..., perm],
      'w_dkv': kv_a[:, :C], 'w_kr': kv_a[:, C:][:, perm],
      'kv_norm': w['kv_a_layernorm.weight'],
      'w_uk': kv_b_CNY[..., :H], 'w_uv': kv_b_CNY[..., H:],
      'w_o': w['o_proj.weight'].T.reshape(N, G, -1),
  }
  if Q:
    params |= {'w_dq': w['q_a_proj.weight'].T, 'q_norm': w['q_a_layernorm.weight']}
  return params
