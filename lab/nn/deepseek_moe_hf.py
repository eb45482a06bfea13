"""Hugging Face interop for lab.nn.deepseek_moe: DeepseekV3MoE weights and routing config.

Keys are relative to one MoE layer (`model.layers.{i}.mlp.`); nn.Linear stores [out, in], so
every matrix is transposed. F is the routed experts' width, N_s the shared experts:
  gate.weight [E, D] = router^T               gate.e_score_correction_bias [E] = bias_E (state)
  experts.gate_up_proj [E, 2F, D] = [w_gate | w_up]^T per expert   (the transformers>=5 module)
  experts.down_proj [E, D, F] = w_down^T per expert
  or, as in the released checkpoints, experts.{e}.{gate,up,down}_proj.weight [F, D] / [D, F]
  shared_experts.{gate,up,down}_proj.weight [N_s F, D] / [D, N_s F] = shared w^T
"""
from __future__ import annotations

import numpy as np

_SHARED = {'w_gate': 'shared_experts.gate_proj.weight', 'w_up': 'shared_experts.up_proj.weight',
           'w_down': 'shared_experts.down_proj.weight'}


def routing_kwargs(hf_config: dict) -> dict:
  """`deepseek_moe.route` keyword arguments from a DeepseekV3Config dict."""
  return dict(top_k=hf_config['num_experts_per_tok'], n_groups=hf_config['n_group'],
              top_k_groups=hf_config['topk_group'],
              routed_scaling_factor=hf_config['routed_scaling_factor'],
              normalize=hf_config['norm_topk_prob'])


def _stacked_experts(tensors: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(w_gate_EDF, w_up_EDF, w_down_EFD) from the fused module layout or per-expert tensors."""
  if 'experts.gate_up_proj' in tensors:
    w_gate_EFD, w_up_EFD = np.split(np.asarray(tensors['experts.gate_up_proj']), 2, axis=1)
    w_down_EDF = np.asarray(tensors['experts.down_proj'])
  else:
    E = np.asarray(tensors['gate.weight']).shape[0]
    missing = [e for e in range(E) if f'experts.{e}.gate_proj.weight' not in tensors]
    if missing:
      raise ValueError(f'DeepseekV3MoE tensors lack experts.gate_up_proj and the per-expert '
                       f'weights of experts {missing}; expected one of the two layouts')
    stack = lambda name: np.stack([np.asarray(tensors[f'experts.{e}.{name}.weight'])
                                   for e in range(E)])
    w_gate_EFD, w_up_EFD, w_down_EDF = stack('gate_proj'), stack('up_proj'), stack('down_proj')
  return w_gate_EFD.swapaxes(1, 2), w_up_EFD.swapaxes(1, 2), w_down_EDF.swapaxes(1, 2)


def from_hf(tensors: dict) -> tuple[dict, np.ndarray]:
  """(params, bias_E) for lab.nn.deepseek_moe from one DeepseekV3MoE's tensors (numpy)."""
  w_gate_EDF, w_up_EDF, w_down_EFD = _stacked_experts(tensors)
  params = {'router': np.asarray(tensors['gate.weight']).T, 'w_gate': w_gate_EDF,
            'w_up': w_up_EDF, 'w_down': w_down_EFD}
  if _SHARED['w_gate'] in tensors:
    params['shared'] = {k: np.asarray(tensors[name]).T for k, name in _SHARED.items()}
  return params, np.asarray(tensors['gate.e_score_correction_bias'])


def to_hf(params: dict, bias_E) -> dict:
  """DeepseekV3MoE.state_dict() layout (fused experts) as numpy arrays; inverse of from_hf."""
  T = lambda a: np.asarray(a).swapaxes(-1, -2)
  tensors = {'gate.weight': T(params['router']),
             'gate.e_score_correction_bias': np.asarray(bias_E),
             'experts.gate_up_proj': np.concatenate([T(params['w_gate']), T(params['w_up'])], 1),
             'experts.down_proj': T(params['w_down'])}
  if 'shared' in params:
    tensors |= {name: T(params['shared'][k]) for k, name in _SHARED.items()}
  return tensors
