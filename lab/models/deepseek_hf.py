"""Hugging Face interop for `lab.models.deepseek`: transformers' `DeepseekV3ForCausalLM`.

Our blocks are stacked on a leading layer axis per group (layers 0..k-1 dense, k..L-1 MoE, with
k = first_k_dense_replace); HF keeps one module per layer. nn.Linear stores [out, in], so every
matrix is transposed:
  model.embed_tokens.weight [V, D] = embed        model.norm.weight = final_norm
  lm_head.weight [V, D] = head^T                   (tie_word_embeddings must be False)
  model.layers.i.input_layernorm.weight = attn_norm
  model.layers.i.post_attention_layernorm.weight = ffn_norm
  model.layers.i.self_attn.* = attn               (lab.nn.mla_hf, RoPE layout included)
  model.layers.i.mlp.{gate,up,down}_proj.weight = ffn.w_gate^T, w_up^T, w_down^T (i < k)
  model.layers.i.mlp.* = ffn and the routing bias  (lab.nn.deepseek_moe_hf, i >= k)
The routing biases (gate.e_score_correction_bias) become the model state {'blocks': [L_moe, E]}.
DeepseekV3ForCausalLM holds no MTP module, so the config has mtp_depth = 0.
"""
from __future__ import annotations

import jax
import numpy as np

from lab.nn import deepseek_moe_hf, mla_hf

_DEFAULTS = {'hidden_act': 'silu', 'tie_word_embeddings': False, 'norm_topk_prob': True,
             'rms_norm_eps': 1e-6, 'first_k_dense_replace': 0, 'initializer_range': 0.02,
             'max_position_embeddings': 4096}
_REQUIRED = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
             'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim',
             'intermediate_size', 'moe_intermediate_size', 'n_routed_experts',
             'n_shared_experts', 'num_experts_per_tok', 'n_group', 'topk_group',
             'routed_scaling_factor')
# HF's MLA latent norms always use eps 1e-6; lab uses model.norm_eps for every RMSNorm.
_SUPPORTED = {'hidden_act': 'silu', 'tie_word_embeddings': False, 'norm_topk_prob': True,
              'rms_norm_eps': 1e-6}


def config_from_hf(hf: dict) -> dict:
  """config.model fields for lab.models.deepseek from a DeepseekV3Config dict (to_dict()); the
  training-only fields (gamma, alpha, lambda, dispatch) get V3's values."""
  missing = [k for k in _REQUIRED if k not in hf]
  if missing:
    raise ValueError(f'HF DeepseekV3 config lacks fields {missing}')
  hf = _DEFAULTS | hf
  for key, want in _SUPPORTED.items():
    if hf[key] != want:
      raise ValueError(f'HF config {key}={hf[key]!r} is not supported; expected {want!r}')
  attn = mla_hf.mla_config_from_hf(hf)
  return dict(
      name='deepseek', vocab_size=hf['vocab_size'], vocab_multiple=1, d_model=hf['hidden_size'],
      n_layers=hf['num_hidden_layers'], first_dense_layers=hf['first_k_dense_replace'],
      n_heads=attn['n_heads'], q_lora_rank=attn['q_lora_rank'],
      kv_lora_rank=attn['kv_lora_rank'], qk_nope_dim=attn['qk_nope_dim'],
      qk_rope_dim=attn['qk_rope_dim'], v_head_dim=attn['v_head_dim'],
      d_ff=hf['intermediate_size'], d_ff_expert=hf['moe_intermediate_size'],
      n_routed_experts=hf['n_routed_experts'], n_shared_experts=hf['n_shared_experts'],
      top_k=hf['num_experts_per_tok'], n_groups=hf['n_group'], top_k_groups=hf['topk_group'],
      routed_scaling_factor=float(hf['routed_scaling_factor']), bias_update_speed=1e-3,
      balance_alpha=1e-4, mtp_depth=0, mtp_lambda=0.3, rope_theta=float(attn['rope_theta']),
      norm_eps=float(hf['rms_norm_eps']), max_len=hf['max_position_embeddings'], fp8=False,
      attention_backend='auto', moe_dispatch='dense', moe_capacity_factor=1.25,
      init_std=float(hf['initializer_range']))


def _take(tensors: dict, prefix: str, used: set) -> dict:
  """The float32 tensors under `prefix`, keyed without it; marks them used."""
  out = {k[len(prefix):]: np.asarray(v, np.float32) for k, v in tensors.items()
         if k.startswith(prefix)}
  used.update(prefix + k for k in out)
  return out


def _layer(hf: dict, tensors: dict, i: int, used: set) -> tuple[dict, np.ndarray | None]:
  """(block params, routing bias or None) of HF layer i."""
  prefix = f'model.layers.{i}.'
  norms = _take(tensors, prefix + 'input_layernorm.', used)['weight'], _take(
      tensors, prefix + 'post_attention_layernorm.', used)['weight']
  attn = mla_hf.mla_params_from_hf(_take(tensors, prefix + 'self_attn.', used),
                                   mla_hf.mla_config_from_hf(hf))
  mlp = _take(tensors, prefix + 'mlp.', used)
  bias_E = None
  if i < hf['first_k_dense_replace']:
    ffn = {k: mlp[f'{k.removeprefix("w_")}_proj.weight'].T for k in ('w_gate', 'w_up', 'w_down')}
  else:
    ffn, bias_E = deepseek_moe_hf.from_hf(mlp)
  return {'attn_norm': norms[0], 'attn': attn, 'ffn_norm': norms[1], 'ffn': ffn}, bias_E


def params_from_hf(hf: dict, tensors: dict) -> tuple[dict, dict]:
  """(params, state) for lab.models.deepseek (float32 NumPy) from a DeepseekV3ForCausalLM state
  dict (numpy or torch-convertible values) and its config dict; every tensor must be used."""
  hf = _DEFAULTS | hf
  used: set = set()
  stack = lambda trees: jax.tree.map(lambda *a: np.stack(a), *trees)
  layers = [_layer(hf, tensors, i, used) for i in range(hf['num_hidden_layers'])]
  k = hf['first_k_dense_replace']
  params = {'embed': np.asarray(tensors['model.embed_tokens.weight'], np.float32),
            'moe_blocks': stack([p for p, _ in layers[k:]]),
            'final_norm': np.asarray(tensors['model.norm.weight'], np.float32),
            'head': np.asarray(tensors['lm_head.weight'], np.float32).T}
  used |= {'model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'}
  if k:
    params['dense_blocks'] = stack([p for p, _ in layers[:k]])
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f'HF DeepseekV3 tensors {unused[:4]}{"..." if len(unused) > 4 else ""} '
                     'are not part of DeepseekV3ForCausalLM; expected none (MTP layers are not '
                     'loaded)')
  return params, {'blocks': np.stack([b for _, b in layers[k:]])}
