"""Pallas kernels under a device mesh: one kernel call per device through `jax.shard_map`.

XLA cannot partition a Pallas custom call, so inside a sharded jit it would gather q, k, v onto
every device. Attention is independent per example and per head, so under an active mesh
(`lab.parallel.rules.activate`) the kernel runs on each device's block of the batch (the mesh
axes of the logical name 'batch') and of the heads ('act_heads' for q, 'act_kv_heads' for k and
v) with no collectives. A dim that its mesh axes do not divide (a batch of 3 samples on 8
devices, 2 kv heads over tensor=4) is kept whole on every device for that call.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from lab.parallel import rules as rules_lib


def _axes_dividing(logical: str, size: int, mesh, rules):
  """The mesh axes `logical` maps to if their product divides size, else None (whole)."""
  axes = rules_lib.spec((logical,), rules)[0]
  names = rules_lib.mesh_axes(axes)
  return axes if names and size % rules_lib.devices_along(mesh, names) == 0 else None


def per_device(kernel):
  """Wraps kernel(q, k, v, *, q_segment_BT, kv_segment_BS, **kw) to run per device."""

  def wrapped(q_BTNH, k_BSKH, v_BSKG, *, q_segment_BT, kv_segment_BS, return_lse=False, **kw):
    kw['return_lse'] = return_lse
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    # Inside a shard_map (manual axes, e.g. ring attention) the caller already split the work.
    if mesh.empty or not rules or mesh.size == 1 or mesh.manual_axes:
      return kernel(q_BTNH, k_BSKH, v_BSKG, q_segment_BT=q_segment_BT,
                    kv_segment_BS=kv_segment_BS, **kw)
    B, _, N, _ = q_BTNH.shape
    K = k_BSKH.shape[2]
    batch = _axes_dividing('batch', B, mesh, rules)
    heads = _axes_dividing('act_heads', N, mesh, rules)
    kv_heads = _axes_dividing('act_kv_heads', K, mesh, rules)
    if heads != kv_heads:  # GQA groups stay whole only if q and kv heads split alike
      heads = kv_heads = None
    q_spec, kv_spec, seg_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None), P(batch)
    segmented = q_segment_BT is not None

    def local(q, k, v, *segments):
      q_seg, kv_seg = segments if segmented else (None, None)
      return kernel(q, k, v, q_segment_BT=q_seg, kv_segment_BS=kv_seg, **kw)

    args = (q_BTNH, k_BSKH, v_BSKG) + ((q_segment_BT, kv_segment_BS) if segmented else ())
    specs = (q_spec, kv_spec, kv_spec) + ((seg_spec, seg_spec) if segmented else ())
    # check_vma=False: pallas_call outputs carry no varying-axes annotation.
    out_specs = (q_spec, P(batch, None, heads)) if return_lse else q_spec
    return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs,
                         check_vma=False)(*args)

  return wrapped
