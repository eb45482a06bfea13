"""Expert parallelism: the MoE layer of lab.nn.moe with experts spread over a mesh axis.

GShard (Lepikhin et al. 2020, §2.2-3.2) in `jax.shard_map`. Tokens are sharded on the batch dim
over the mesh axes of the logical name 'batch' (default (data, fsdp, expert)); the expert
weights [E, ...] over the axis of 'experts' (default expert), so that device p of that axis owns
experts [p E/n, (p+1) E/n). The router runs outside the shard_map on the global batch (jit
keeps it sharded like the tokens), so the routing (gates_BTK, experts_BTK) is an input and any
router can use this layer (`experts_expert_parallel`; lab.nn.deepseek_moe).
Each device is one GShard group:
  1. takes the routing of its own B*T tokens and builds per-expert buffers x_ECD of capacity
     C = ceil(capacity_factor * B*T * K / E) (lab.nn.moe.dispatch_combine, same priority order);
  2. all_to_all sends the buffers of expert e to the device owning e; that device runs its local
     experts on the tokens of all n devices at once;
  3. a second all_to_all returns the outputs, which are combined with the gates.
Dropped assignments are summed over the token axes (psum); load and the Switch loss come from
the global routing, so aux is the global one. With a capacity that drops nothing the result
equals lab.nn.moe.moe_dense; with drops it equals moe_capacity applied to each device's tokens.
Everything is differentiable (the transpose of all_to_all is all_to_all), so this runs inside
a jitted train step. Expert weights sharded on their D or F dims (fsdp, tensor) are gathered at
the shard_map boundary.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from lab.nn import moe
from lab.parallel import rules as rules_lib


def _remote_experts(params: dict, x_ECD: jax.Array, axis: str) -> jax.Array:
  """FFN of every buffer on the device that owns its expert; y_ECD back in global expert order.

  After the first all_to_all a device holds, for each of the n source devices, the buffers of
  its E/n local experts: [n * E/n, C, D], source-major.
  """
  n = jax.lax.axis_size(axis)
  E, C, D = x_ECD.shape
  x_ECD = jax.lax.all_to_all(x_ECD, axis, 0, 0, tiled=True)
  x_ECD = x_ECD.reshape(n, E // n, C, D).swapaxes(0, 1).reshape(E // n, n * C, D)
  y_ECD = moe.expert_ffn(params, x_ECD)
  y_ECD = y_ECD.reshape(E // n, n, C, D).swapaxes(0, 1).reshape(E, C, D)
  return jax.lax.all_to_all(y_ECD, axis, 0, 0, tiled=True)


def _local_experts(params, x_BTD, gates_BTK, experts_BTK, *, n_experts, capacity_factor,
                   expert_axis, token_axes):
  """One device's group: dispatch, exchange, combine; dropped summed over token_axes."""
  ffn = (functools.partial(moe.expert_ffn, params) if expert_axis is None
         else functools.partial(_remote_experts, params, axis=expert_axis))
  y_BTD, dropped = moe.experts_capacity(ffn, x_BTD, gates_BTK, experts_BTK, n_experts=n_experts,
                                        capacity_factor=capacity_factor)
  return y_BTD, jax.lax.psum(dropped, token_axes)


def experts_expert_parallel(params: dict, x_BTD: jax.Array, gates_BTK: jax.Array,
                            experts_BTK: jax.Array, *, capacity_factor: float, mesh=None,
                            rules=None):
  """(y_BTD, dropped) of the stacked experts for a given routing, expert-parallel.

  params: the expert weights of lab.nn.moe.moe_specs (no router), each [E, ...].  x_BTD and the
  routing gates_BTK, experts_BTK: global arrays (B divisible by the token-sharding axes).
  mesh: default the one set by `lab.parallel.rules.activate` (jax.set_mesh); rules: default the
  active flax logical_axis_rules, else DEFAULT_RULES.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh.empty:
    raise ValueError('expert-parallel MoE got no mesh; pass mesh= or call it under '
                     'lab.parallel.rules.activate(mesh, rules)')
  rules = rules or nn.get_logical_axis_rules() or rules_lib.DEFAULT_RULES
  token_axes = rules_lib.mesh_axes(rules_lib.spec(('batch',), rules)[0])
  expert_axes = rules_lib.mesh_axes(rules_lib.spec(('experts',), rules)[0])
  if len(expert_axes) > 1 or not set(expert_axes) <= set(token_axes):
    raise ValueError(f"logical axis 'experts' maps to {expert_axes}; expected at most one mesh "
                     f"axis, one of the token axes {token_axes}")
  B = x_BTD.shape[0]
  E = moe.n_experts(params)
  n_groups = rules_lib.devices_along(mesh, token_axes)
  if B % n_groups:
    raise ValueError(f'moe batch size {B} is not divisible by the {n_groups} devices of mesh '
                     f'axes {token_axes}')
  expert_axis = expert_axes[0] if expert_axes else None
  if expert_axis and E % mesh.shape[expert_axis]:
    raise ValueError(f'moe n_experts={E} is not divisible by mesh axis {expert_axis!r} of size '
                     f'{mesh.shape[expert_axis]}')
  local = functools.partial(_local_experts, n_experts=E, capacity_factor=capacity_factor,
                            expert_axis=expert_axis, token_axes=token_axes)
  tokens = P(token_axes)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=({k: P(expert_axis) for k in params}, tokens, tokens, tokens),
                       out_specs=(tokens, P()))(params, x_BTD, gates_BTK, experts_BTK)


def moe_expert_parallel(params: dict, x_BTD: jax.Array, *, top_k: int, capacity_factor: float,
                        renormalize: bool = True, mesh=None, rules=None):
  """Top-k MoE with expert-parallel all_to_all dispatch: (y_BTD, aux) as lab.nn.moe returns.

  params: lab.nn.moe.moe_specs parameters.  x_BTD: the global batch (B divisible by the
  token-sharding axes).  mesh, rules: as `experts_expert_parallel`.
  """
  B, T, _ = x_BTD.shape
  probs_BTE, gates_BTK, experts_BTK = moe.route(params['router'], x_BTD, top_k, renormalize)
  experts = {k: v for k, v in params.items() if k != 'router'}
  y_BTD, dropped = experts_expert_parallel(experts, x_BTD, gates_BTK, experts_BTK,
                                           capacity_factor=capacity_factor, mesh=mesh,
                                           rules=rules)
  aux = moe.routing_aux(*moe.routing_stats(probs_BTE, experts_BTK), B * T, top_k, dropped)
  return y_BTD, aux
