"""DeepSeekMoE with auxiliary-loss-free load balancing, as in DeepSeek-V3.

DeepSeek-V3 (arXiv 2412.19437) §2.1.2, with DeepSeekMoE's shared and fine-grained experts
(Dai et al. 2024, arXiv 2401.06066) and the bias-based balancing of Wang et al. 2024
(arXiv 2408.15664). For a token u_t with N_s shared and E routed experts (centroids e_i):
  s_{i,t} = sigmoid(u_t^T e_i)                                                       (eq. 15)
  experts of t = TopK({s_{j,t} + b_j}, K)                                             (eq. 16)
  g_{i,t} = s_{i,t} / sum_{j chosen} s_{j,t} for chosen i, else 0                     (eq. 13)
  FFN(u_t) = sum_{i<=N_s} FFN^(s)_i(u_t) + sum_i g_{i,t} FFN^(r)_i(u_t)               (eq. 12)
The bias b_E only decides the selection; the gates use the unbiased affinities. It is model
STATE, not a parameter: it starts at zeros(E) float32 and, after each training step,
  b_i <- b_i + gamma * sign(mean_j load_j - load_i)    (Wang et al. Alg. 1; V3 "bias update speed")
where load_i counts the batch's tokens routed to expert i (`update_bias`).

Beyond the paper's equations, routing follows the V3 release and Hugging Face's
`DeepseekV3TopkRouter` exactly:
  - group-limited routing (the paper's node-limited routing): the E experts form G groups of J =
    E / G; a group's score is the sum of its 2 highest biased affinities; tokens choose the top
    `top_k_groups` groups and their top-K experts only among those groups;
  - normalize=False keeps g = s (no eq. 13); the gates are then multiplied by
    `routed_scaling_factor` (2.5 in V3) in both cases; the eq. 13 sum gets + 1e-20 as in HF.
In this file K is the number of routed experts per token, C the capacity, G the number of
expert groups and J the experts of one group.

Shared experts are one SwiGLU FFN of width N_s F (HF's fused layout; equal to the sum of N_s
FFNs of width F), routed experts are stacked [E, D, F] as in lab.nn.moe, whose dense reference
and GShard capacity dispatch run them (lab.parallel.expert_dispatch for expert parallelism).
`deepseek_moe` returns the FFN output without the residual u_t: the block adds it (as HF).

aux (every dispatch): load_E (tokens routed to each expert, before capacity), dropped
(assignments beyond capacity), max_vio = (max_i load_i - mean load) / mean load (Wang et al.
eq. 4, over this batch), and load_balance_loss = the sequence-wise balance loss L_Bal / alpha
(V3 eqs. 17-20): per sequence of T tokens,
  f_i = E / (K T) sum_t 1(i chosen for t),  P_i = 1/T sum_t s_{i,t} / sum_j s_{j,t},
  loss = sum_i f_i P_i,  averaged over the B sequences (1 when routing is uniform).
The objective multiplies it by alpha (V3: 1e-4), as it does lab.nn.moe's Switch loss. The
indicator is the token's actual (biased, group-limited) choice; eq. 18 writes TopK of s, which
is the same choice when b = 0 and G = 1.

Training with the bias (lab/train/task.py): keep {'bias_E': ...} (per layer) in the model state;
loss_fn calls `deepseek_moe(params, state['bias_E'], ...)` and, when training, returns
new_state = {'bias_E': update_bias(state['bias_E'], aux['load_E'], gamma)}. The bias gets no
gradient (d out / d b = 0: it moves only the discrete choice), so the update is outside the
optimizer. load_E from `deepseek_moe` is over the global batch under jit, whatever the sharding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lab.nn import mlp, moe
from lab.nn import param_spec as ps
from lab.parallel import expert_dispatch

_DISPATCH = ('dense', 'capacity', 'expert_parallel')
_ROUTED = ('w_gate', 'w_up', 'w_down')


def deepseek_moe_specs(d_model: int, d_ff_expert: int, n_routed: int, n_shared: int, *,
                       std: float, out_std: float) -> dict:
  """Parameters: router_DE (the centroids e_i), routed experts w_gate_EDF, w_up_EDF, w_down_EFD
  (lab.nn.moe.moe_specs, SwiGLU) and, when n_shared > 0, 'shared': one SwiGLU FFN of width
  n_shared * d_ff_expert. No bias: the routing bias is state (`update_bias`)."""
  if n_shared < 0:
    raise ValueError(f'deepseek_moe n_shared={n_shared}; expected >= 0 shared experts')
  specs = moe.moe_specs(d_model, d_ff_expert, n_routed, mlp='swiglu', std=std, out_std=out_std)
  if n_shared:
    D, F = d_model, n_shared * d_ff_expert
    w_in = ps.ParamSpec((D, F), ps.normal(std), ('embed', 'mlp'))
    specs['shared'] = {'w_gate': w_in, 'w_up': w_in,
                       'w_down': ps.ParamSpec((F, D), ps.normal(out_std), ('mlp', 'embed'))}
  return specs


def _check_routing(E: int, bias_E, top_k: int, n_groups: int, top_k_groups: int) -> None:
  if bias_E.shape != (E,):
    raise ValueError(f'deepseek_moe bias shape {bias_E.shape}; expected ({E},), one per expert')
  if n_groups < 1 or E % n_groups:
    raise ValueError(f'deepseek_moe n_groups={n_groups}; expected a divisor of {E} experts')
  if n_groups > 1 and E // n_groups < 2:
    raise ValueError(f'deepseek_moe n_groups={n_groups} leaves {E // n_groups} expert per group; '
                     'expected >= 2 (a group scores by its top-2 affinities)')
  if not 1 <= top_k_groups <= n_groups:
    raise ValueError(f'deepseek_moe top_k_groups={top_k_groups}; expected 1..{n_groups} groups')
  if not 1 <= top_k <= top_k_groups * (E // n_groups):
    raise ValueError(f'deepseek_moe top_k={top_k}; expected 1..{top_k_groups * (E // n_groups)} '
                     f'experts in the {top_k_groups} kept groups')


def route(router_DE: jax.Array, bias_E: jax.Array, x_BTD: jax.Array, *, top_k: int,
          n_groups: int = 1, top_k_groups: int = 1, routed_scaling_factor: float = 1.0,
          normalize: bool = True):
  """(scores_BTE, gates_BTK, experts_BTK): sigmoid affinities s (eq. 15) in float32 (float64 for
  float64 x); the K experts chosen on s + b (eq. 16) within the top_k_groups best groups,
  largest first (ties to the lower index); their gates s / sum s (eq. 13, when normalize) times
  routed_scaling_factor. The bias enters the choice only."""
  E = router_DE.shape[1]
  _check_routing(E, bias_E, top_k, n_groups, top_k_groups)
  dtype = jnp.promote_types(x_BTD.dtype, jnp.float32)
  logits_BTE = jnp.einsum('BTD,DE->BTE', x_BTD.astype(dtype), router_DE.astype(dtype))
  scores_BTE = jax.nn.sigmoid(logits_BTE)
  choice_BTE = scores_BTE + bias_E.astype(dtype)
  if n_groups > 1:
    B, T, _ = x_BTD.shape
    choice_BTGJ = choice_BTE.reshape(B, T, n_groups, E // n_groups)
    group_score_BTG = jax.lax.top_k(choice_BTGJ, 2)[0].sum(-1)
    kept_groups = jax.lax.top_k(group_score_BTG, top_k_groups)[1]
    keep_BTG = jax.nn.one_hot(kept_groups, n_groups, dtype=jnp.bool_).any(-2)
    choice_BTE = jnp.where(keep_BTG[..., None], choice_BTGJ, -jnp.inf).reshape(B, T, E)
  _, experts_BTK = jax.lax.top_k(choice_BTE, top_k)
  gates_BTK = jnp.take_along_axis(scores_BTE, experts_BTK, axis=-1)
  if normalize:
    gates_BTK = gates_BTK / (gates_BTK.sum(-1, keepdims=True) + 1e-20)
  return scores_BTE, gates_BTK * routed_scaling_factor, experts_BTK


def sequence_balance_loss(scores_BTE: jax.Array, experts_BTK: jax.Array) -> jax.Array:
  """L_Bal / alpha (V3 eqs. 17-20): mean over sequences of sum_i f_i P_i, with f_i = E/(K T)
  (tokens of the sequence routed to i) and P_i = mean_t of s normalised over all E experts."""
  _, T, E = scores_BTE.shape
  K = experts_BTK.shape[-1]
  chosen_BTE = jax.nn.one_hot(experts_BTK, E, dtype=scores_BTE.dtype).sum(-2)
  f_BE = E / (K * T) * chosen_BTE.sum(1)
  P_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)
  return (f_BE * P_BE).sum(-1).mean()


def max_violation(load_E: jax.Array) -> jax.Array:
  """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. eq. 4); load_E may carry
  leading dims (layers)."""
  load_E = load_E.astype(jnp.float32)
  mean = load_E.mean(-1)
  return (load_E.max(-1) - mean) / mean


def routing_aux(scores_BTE: jax.Array, experts_BTK: jax.Array, dropped: jax.Array) -> dict:
  """aux of one layer: load_E, dropped, max_vio and load_balance_loss (see the module doc)."""
  load_E = jax.nn.one_hot(experts_BTK, scores_BTE.shape[-1], dtype=jnp.int32).sum((0, 1, 2))
  return {'load_E': load_E, 'dropped': dropped.astype(jnp.int32),
          'max_vio': max_violation(load_E),
          'load_balance_loss': sequence_balance_loss(scores_BTE, experts_BTK)}


def deepseek_moe(params: dict, bias_E: jax.Array, x_BTD: jax.Array, *, top_k: int,
                 n_groups: int = 1, top_k_groups: int = 1, routed_scaling_factor: float = 1.0,
                 normalize: bool = True, dispatch: str = 'dense',
                 capacity_factor: float | None = None, mesh=None, rules=None,
                 fp8: bool = False):
  """(y_BTD, aux): shared plus gated routed experts, eq. 12 without the residual u_t.

  params: `deepseek_moe_specs` parameters.  bias_E: the routing bias (state).  Routing kwargs:
  see `route`.  dispatch: 'dense' runs every expert on every token and keeps the chosen (the
  exact reference); 'capacity' is one GShard group of capacity
  C = ceil(capacity_factor B T K / E) per expert (lab.nn.moe; capacity_factor = E / K drops
  nothing); 'expert_parallel' is that per device, with experts spread over the mesh's expert
  axis (lab.parallel.expert_dispatch; mesh, rules default to the active ones).
  fp8: the shared and routed experts' matmuls in DeepSeek-V3's fine-grained FP8 (lab.nn.fp8;
  the router stays in float32, §3.3.1); not with 'expert_parallel', whose remote experts run in
  lab.parallel.expert_dispatch.
  """
  if dispatch not in _DISPATCH:
    raise ValueError(f'deepseek_moe dispatch={dispatch!r}; expected one of {_DISPATCH}')
  if dispatch != 'dense' and capacity_factor is None:
    raise ValueError(f'deepseek_moe dispatch={dispatch!r} got capacity_factor=None; expected a '
                     'positive number')
  if fp8 and dispatch == 'expert_parallel':
    raise ValueError("deepseek_moe fp8=True with dispatch='expert_parallel'; expected 'dense' or "
                     "'capacity' (the expert-parallel experts have no FP8 path)")
  scores_BTE, gates_BTK, experts_BTK = route(
      params['router'], bias_E, x_BTD, top_k=top_k, n_groups=n_groups,
      top_k_groups=top_k_groups, routed_scaling_factor=routed_scaling_factor, normalize=normalize)
  routed = {k: params[k] for k in _ROUTED}
  dropped = jnp.zeros((), jnp.int32)
  if dispatch == 'dense':
    y_BTD = moe.experts_dense(routed, x_BTD, gates_BTK, experts_BTK, fp8=fp8)
  elif dispatch == 'capacity':
    y_BTD, dropped = moe.experts_capacity(
        functools.partial(moe.expert_ffn, routed, fp8=fp8), x_BTD, gates_BTK, experts_BTK,
        n_experts=moe.n_experts(routed), capacity_factor=capacity_factor)
  else:
    y_BTD, dropped = expert_dispatch.experts_expert_parallel(
        routed, x_BTD, gates_BTK, experts_BTK, capacity_factor=capacity_factor, mesh=mesh,
        rules=rules)
  if 'shared' in params:
    shared = params['shared']
    y_BTD = y_BTD + mlp.swiglu_mlp(x_BTD, shared['w_gate'], shared['w_up'], shared['w_down'],
                                   fp8=fp8)
  return y_BTD, routing_aux(scores_BTE, experts_BTK, dropped)


def update_bias(bias_E: jax.Array, load_E: jax.Array, gamma: float) -> jax.Array:
  """b_i + gamma * sign(mean_j load_j - load_i) (Wang et al. Alg. 1; V3 §2.1.2): overloaded
  experts lose gamma, underloaded gain gamma, those at the mean keep b. Leading dims (layers) of
  bias_E and load_E are kept; gamma may be traced (a schedule: V3 sets it to 0 for the last
  tokens). The trainer applies it after each step, outside the gradient."""
  if isinstance(gamma, (int, float)) and gamma < 0:
    raise ValueError(f'deepseek_moe bias update gamma={gamma}; expected >= 0')
  load_E = load_E.astype(jnp.float32)
  step_E = jnp.sign(load_E.mean(-1, keepdims=True) - load_E)
  return bias_E + (gamma * step_E).astype(bias_E.dtype)
