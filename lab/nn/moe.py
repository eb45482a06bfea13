"""Top-k mixture-of-experts MLP: router, expert FFNs, the dense reference and capacity dispatch.

Shazeer et al. 2017 (eq. 1 and 3, without the noise of eq. 4), GShard (Lepikhin et al. 2020,
Algorithm 1), Switch (Fedus et al. 2021). For a token x_D with router probabilities
p_E = softmax(x W_r):
  e_1..e_K = the K experts of largest p;  y_D = sum_k g_k FFN_{e_k}(x_D),
  g_k = p_{e_k} / sum_j p_{e_j} when `renormalize` (= softmax over the kept logits, Shazeer eq. 3;
  GShard; Mixtral), else g_k = p_{e_k} (Switch).
In this file K is the number of experts per token (top-k), not kv heads, and C is the capacity
(tokens per expert per group), not channels.

Experts are stacked weights, [E, D, F] and [E, F, D], without biases: GELU (w_in, w_out) or
SwiGLU (w_gate, w_up, w_down); `expert_ffn` picks the form from the params' keys.

Capacity (GShard §2.2): of the B*T tokens of a group each expert takes at most
C = ceil(capacity_factor * B*T * K / E). Assignments are served in priority order, all first
choices in token order (b, t row-major), then all second choices, and so on (GShard
Algorithm 1); an assignment beyond C is dropped: that expert adds 0 to the token's output and
the residual stream carries the token. Dispatch and combine are the GShard one-hot tensors
dispatch_BTEC in {0, 1} and combine_BTEC = gate * dispatch:
  x_ECD = sum_BT dispatch_BTEC x_BTD;  y_BTD = sum_EC combine_BTEC FFN_E(x_ECD).
They hold B*T*E*C numbers, fine for groups of a few thousand tokens.

Every MoE function returns (y_BTD, aux) with aux = {'dropped': dropped (token, expert)
assignments, 'load_E': assignments routed to each expert before capacity, 'load_balance_loss':
the Switch loss (eq. 4-6) E * sum_e f_e P_e with f_e = load_e / (B*T*K) and P_e = mean_BT p_e}.
It is 1 when routing is uniform, for any K; with K = 1 it is Switch's loss (times their alpha).
`experts_dense` and `experts_capacity` take the routing (gates_BTK, experts_BTK) as input, so
that other routers (lab.nn.deepseek_moe) share the expert computation.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lab.nn import fp8 as fp8_lib
from lab.nn import param_spec as ps

_MLPS = ('gelu', 'swiglu')


def moe_specs(d_model: int, d_ff: int, n_experts: int, *, mlp: str, std: float,
              out_std: float) -> dict:
  """Parameters: router_DE and per-expert w_in_EDF, w_out_EFD (GELU) or w_gate_EDF, w_up_EDF,
  w_down_EFD (SwiGLU); expert dims carry the logical axis 'experts'."""
  if mlp not in _MLPS:
    raise ValueError(f'moe mlp={mlp!r}; expected one of {_MLPS}')
  D, F, E = d_model, d_ff, n_experts
  w_in = ps.ParamSpec((E, D, F), ps.normal(std), ('experts', 'embed', 'mlp'))
  w_out = ps.ParamSpec((E, F, D), ps.normal(out_std), ('experts', 'mlp', 'embed'))
  specs = {'router': ps.ParamSpec((D, E), ps.normal(std), ('embed', None))}
  if mlp == 'swiglu':
    return specs | {'w_gate': w_in, 'w_up': w_in, 'w_down': w_out}
  return specs | {'w_in': w_in, 'w_out': w_out}


def route(router_DE: jax.Array, x_BTD: jax.Array, top_k: int, renormalize: bool):
  """(probs_BTE, gates_BTK, experts_BTK): softmax router probabilities in float32 (float64 for
  float64 x), the top-k experts of each token (largest first, ties to the lower index) and their
  gates."""
  E = router_DE.shape[1]
  if not 1 <= top_k <= E:
    raise ValueError(f'moe top_k={top_k}; expected 1 <= top_k <= {E} experts')
  dtype = jnp.promote_types(x_BTD.dtype, jnp.float32)
  logits_BTE = jnp.einsum('BTD,DE->BTE', x_BTD, router_DE, preferred_element_type=dtype)
  probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  gates_BTK, experts_BTK = jax.lax.top_k(probs_BTE, top_k)
  if renormalize:
    gates_BTK = gates_BTK / gates_BTK.sum(-1, keepdims=True)
  return probs_BTE, gates_BTK, experts_BTK


def capacity(n_tokens: int, n_experts: int, top_k: int, capacity_factor: float) -> int:
  """C = ceil(capacity_factor * tokens * K / E) (GShard §2.2)."""
  if capacity_factor <= 0:
    raise ValueError(f'moe capacity_factor={capacity_factor}; expected a positive number')
  return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def dispatch_combine(gates_BTK: jax.Array, experts_BTK: jax.Array, n_experts: int, C: int):
  """(dispatch_BTEC, combine_BTEC, dropped) for one group, in GShard's priority order (all first
  choices in token order, then second choices, ...); dropped counts assignments beyond C."""
  mask_KBTE = jax.nn.one_hot(jnp.moveaxis(experts_BTK, -1, 0), n_experts, dtype=jnp.int32)
  position_KBTE = jnp.cumsum(mask_KBTE.reshape(-1, n_experts), axis=0).reshape(mask_KBTE.shape) - 1
  kept_KBTE = mask_KBTE * (position_KBTE < C)
  slot_KBTEC = jax.nn.one_hot(position_KBTE, C, dtype=gates_BTK.dtype) * kept_KBTE[..., None]
  dispatch_BTEC = slot_KBTEC.sum(0)
  combine_BTEC = jnp.einsum('KBTEC,BTK->BTEC', slot_KBTEC, gates_BTK)
  return dispatch_BTEC, combine_BTEC, mask_KBTE.sum() - kept_KBTE.sum()


def _expert_dot(x_ECD: jax.Array, w_EDF: jax.Array, fp8: bool) -> jax.Array:
  """x_ECD w_EDF per expert; in fine-grained FP8 (lab.nn.fp8, one GEMM per expert) when fp8."""
  if fp8:
    return jax.vmap(functools.partial(fp8_lib.linear, fp8=True))(x_ECD, w_EDF)
  return jnp.einsum('ECD,EDF->ECF', x_ECD, w_EDF)


def expert_ffn(params: dict, x_ECD: jax.Array, *, fp8: bool = False) -> jax.Array:
  """y_ECD = FFN_e(x_ECD[e]) for each expert e: GELU_tanh(x W_in) W_out, or SwiGLU (Shazeer
  2020, eq. 6) (SiLU(x W_gate) * x W_up) W_down when params hold w_gate; every matmul in
  FP8 (DeepSeek-V3 §3.3) when `fp8`."""
  if 'w_gate' in params:
    gate_ECF = jax.nn.silu(_expert_dot(x_ECD, params['w_gate'], fp8))
    h_ECF = gate_ECF * _expert_dot(x_ECD, params['w_up'], fp8)
    return _expert_dot(h_ECF, params['w_down'], fp8)
  h_ECF = jax.nn.gelu(_expert_dot(x_ECD, params['w_in'], fp8), approximate=True)
  return _expert_dot(h_ECF, params['w_out'], fp8)


def routing_stats(probs_BTE: jax.Array, experts_BTK: jax.Array):
  """(load_E, prob_sum_E): assignments routed to each expert and the summed probabilities."""
  load_E = jax.nn.one_hot(experts_BTK, probs_BTE.shape[-1], dtype=jnp.int32).sum((0, 1, 2))
  return load_E, probs_BTE.sum((0, 1))


def routing_aux(load_E: jax.Array, prob_sum_E: jax.Array, n_tokens: int, top_k: int,
                dropped: jax.Array) -> dict:
  """aux from per-expert assignment counts and summed probabilities over n_tokens tokens;
  load_balance_loss = E * sum_e (load_e / (n_tokens K)) (prob_sum_e / n_tokens) (Switch eq. 4)."""
  f_E = load_E / (n_tokens * top_k)
  P_E = prob_sum_E / n_tokens
  return {'dropped': dropped.astype(jnp.int32), 'load_E': load_E.astype(jnp.int32),
          'load_balance_loss': load_E.shape[0] * jnp.sum(f_E * P_E)}


def n_experts(params: dict) -> int:
  """E, read from the stacked expert weights."""
  return params['w_gate' if 'w_gate' in params else 'w_in'].shape[0]


def experts_dense(params: dict, x_BTD: jax.Array, gates_BTK: jax.Array,
                  experts_BTK: jax.Array, *, fp8: bool = False) -> jax.Array:
  """y_BTD = sum_k gates_BTK FFN_{experts_BTK}(x_BTD) with no capacity (the reference), for any
  routing; runs all E experts on all tokens and keeps the chosen: E/K times a routed layer's FLOPs.
  fp8: the expert matmuls in FP8 (`expert_ffn`).
  """
  B, T, D = x_BTD.shape
  E = n_experts(params)
  y_ECD = expert_ffn(params, jnp.broadcast_to(x_BTD.reshape(1, B * T, D), (E, B * T, D)),
                     fp8=fp8)
  weights_BTE = jnp.einsum('BTKE,BTK->BTE', jax.nn.one_hot(experts_BTK, E), gates_BTK)
  y_BTD = jnp.einsum('BTE,EBTD->BTD', weights_BTE, y_ECD.reshape(E, B, T, D))
  return y_BTD.astype(x_BTD.dtype)


def experts_capacity(ffn, x_BTD: jax.Array, gates_BTK: jax.Array, experts_BTK: jax.Array, *,
                     n_experts: int, capacity_factor: float):
  """(y_BTD, dropped): all B*T tokens as one GShard group with capacity C per expert, for any
  routing. `ffn(x_ECD) -> y_ECD` runs the experts on their buffers: functools.partial(expert_ffn,
  params) here; the expert-parallel layer passes one that exchanges the buffers between devices."""
  B, T, _ = x_BTD.shape
  C = capacity(B * T, n_experts, experts_BTK.shape[-1], capacity_factor)
  dispatch_BTEC, combine_BTEC, dropped = dispatch_combine(gates_BTK, experts_BTK, n_experts, C)
  x_ECD = jnp.einsum('BTEC,BTD->ECD', dispatch_BTEC.astype(x_BTD.dtype), x_BTD)
  y_BTD = jnp.einsum('BTEC,ECD->BTD', combine_BTEC, ffn(x_ECD))
  return y_BTD.astype(x_BTD.dtype), dropped


def moe_dense(params: dict, x_BTD: jax.Array, *, top_k: int, renormalize: bool = True):
  """The reference: every token through all of its top-k experts, no capacity (y_BTD, aux)."""
  B, T, _ = x_BTD.shape
  probs_BTE, gates_BTK, experts_BTK = route(params['router'], x_BTD, top_k, renormalize)
  y_BTD = experts_dense(params, x_BTD, gates_BTK, experts_BTK)
  aux = routing_aux(*routing_stats(probs_BTE, experts_BTK), B * T, top_k, jnp.zeros((), jnp.int32))
  return y_BTD, aux


def moe_capacity(params: dict, x_BTD: jax.Array, *, top_k: int, capacity_factor: float,
                 renormalize: bool = True):
  """All B*T tokens as one GShard group with capacity C per expert: (y_BTD, aux)."""
  B, T, _ = x_BTD.shape
  probs_BTE, gates_BTK, experts_BTK = route(params['router'], x_BTD, top_k, renormalize)
  y_BTD, dropped = experts_capacity(functools.partial(expert_ffn, params), x_BTD, gates_BTK,
                                    experts_BTK, n_experts=n_experts(params),
                                    capacity_factor=capacity_factor)
  aux = routing_aux(*routing_stats(probs_BTE, experts_BTK), B * T, top_k, dropped)
  return y_BTD, aux
