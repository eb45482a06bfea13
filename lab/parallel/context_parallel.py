"""Context parallelism: attention over a sequence sharded along the 'seq' mesh axis.

When the logical name 'length' maps to mesh axes of more than one device (config.mesh.seq > 1
with the default rules), activations are split along their length. Attention then runs as ring
attention (lab.parallel.ring_attention) inside `jax.shard_map`: each device keeps its query block
and passes key/value blocks around the ring, so no device holds the whole sequence's keys. Batch
and heads stay split as the rules say (heads only when the kv heads split alike).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from lab.parallel import rules as rules_lib
from lab.parallel.ring_attention import ring_attention


def seq_axes(T: int, S: int):
  """The mesh axes the sequence is split over, or None when attention is not context-parallel
  here: no mesh, inside a shard_map already, length not split, not a self-attention (T != S, as
  in cached decoding), or a length those axes do not divide (a short prompt); XLA then runs it
  on the whole sequence."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules or mesh.manual_axes or T != S:
    return None
  axes = rules_lib.spec(('length',), rules)[0]
  n = rules_lib.devices_along(mesh, rules_lib.mesh_axes(axes))
  return axes if n > 1 and T % n == 0 else None


def ring_self_attention(q_BTNH, k_BTKH, v_BTKG, *, causal: bool, softmax_scale: float,
                        backend: str, axes):
  """Self-attention o_BTNG with q, k, v split along length over `axes` (from seq_axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  names = rules_lib.mesh_axes(axes)
  if len(names) != 1:
    raise ValueError(f"context parallelism needs 'length' on one mesh axis, got {names}")
  N, K = q_BTNH.shape[2], k_BTKH.shape[2]
  batch = rules_lib.spec(('batch',), rules)[0]
  if q_BTNH.shape[0] % rules_lib.devices_along(mesh, rules_lib.mesh_axes(batch)):
    batch = None
  heads = rules_lib.spec(('act_heads',), rules)[0]
  heads_n = rules_lib.devices_along(mesh, rules_lib.mesh_axes(heads))
  if N % heads_n or K % heads_n:
    heads = None
  spec = P(batch, names[0], heads, None)
  attend = functools.partial(ring_attention, axis_name=names[0], causal=causal,
                             softmax_scale=softmax_scale, backend=backend)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BTNH, k_BTKH, v_BTKG)
