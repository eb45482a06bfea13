"""The device mesh from config.mesh: axes data, fsdp, tensor, expert, seq.

`config.mesh = {data: -1, fsdp: 1, tensor: 1, expert: 1, seq: 1}` (a missing axis is 1): -1 takes
the devices the other axes leave; seq > 1 splits sequences (context parallelism); a product that does not match the device count is a ConfigError naming both numbers.
`config.mesh_dcn` (same keys, default all 1) splits axes across slices / hosts joined by the
data-center network: the mesh is then built by `mesh_utils.create_hybrid_device_mesh` so that
ICI-connected devices stay together within each slice.

Axis types are `AxisType.Auto` on purpose: lab runs `jax.jit` with in/out shardings and
`with_sharding_constraint` hints and lets XLA's partitioner propagate the rest (what pjit became),
rather than sharding-in-types (`Explicit`, current `jax.make_mesh`'s default).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from lab.config import ConfigError

AXES = ('data', 'fsdp', 'tensor', 'expert', 'seq')


def _sizes(cfg, total: int, what: str) -> tuple[int, ...]:
  unknown = set(cfg.keys()) - set(AXES)
  if unknown:
    raise ConfigError(f'{what} has unknown axes {sorted(unknown)}; expected {AXES}')
  sizes = [int(cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f'{what}={dict(zip(AXES, sizes))}: at most one axis may be -1')
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f'{what}={dict(zip(AXES, sizes))}: sizes must be positive or -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ConfigError(f'{what}={dict(zip(AXES, sizes))}: the fixed axes ({known} devices) do '
                        f'not divide the {total} devices')
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ConfigError(f'{what}={dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but '
                      f'there are {total}')
  return tuple(sizes)


def mesh_shape(mesh_cfg, n_devices: int, dcn_cfg=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(per-slice ICI shape, DCN shape) over AXES, resolving -1 in the ICI shape."""
  dcn = _sizes(dcn_cfg or {}, math.prod(int(v) for v in (dcn_cfg or {}).values()) or 1,
               'mesh_dcn')
  n_slices = math.prod(dcn)
  if n_devices % n_slices:
    raise ConfigError(f'mesh_dcn has {n_slices} slices but {n_devices} devices do not split '
                      'evenly across them')
  return _sizes(mesh_cfg, n_devices // n_slices, 'mesh'), dcn


def make_mesh(mesh_cfg, dcn_cfg=None, devices=None) -> Mesh:
  """A Mesh over AXES (all of `devices`, default jax.devices()) with Auto axis types."""
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = mesh_shape(mesh_cfg, len(devices), dcn_cfg)
  if math.prod(dcn) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  elif devices == list(jax.devices()):
    grid = mesh_utils.create_device_mesh(ici, devices=devices)
  else:
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
