"""Parameters as data: a `ParamSpec` per array, and the generic `init` and `count` over them.

A model's `param_specs(cfg)` returns a pytree of `ParamSpec`; nothing is allocated until `init`
runs. Because specs carry logical axis names, `init` can create every array directly in its
sharded layout (`jit(out_shardings=...)`), and `count` needs no memory at all.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Shape, dtype, initializer and logical axis names (one per dimension) of one parameter."""
  shape: tuple[int, ...]
  init: Initializer
  axes: tuple[str | None, ...]
  dtype: Any = jnp.float32

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f'ParamSpec shape {self.shape} has {len(self.shape)} dims but axes '
                       f'{self.axes} names {len(self.axes)}; expected one axis name per dim')


def normal(std: float) -> Initializer:
  return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def zeros(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def stack(spec: ParamSpec, n: int, axis_name: str = 'layers') -> ParamSpec:
  """The spec of `n` independent copies of `spec` stacked on a new leading axis (for `scan`)."""
  def init(key, shape, dtype):
    return jax.vmap(lambda k: spec.init(k, shape[1:], dtype))(jax.random.split(key, shape[0]))
  return ParamSpec((n, *spec.shape), init, (axis_name, *spec.axes), spec.dtype)


def _path_key(key: jax.Array, path) -> jax.Array:
  """A key that depends only on the parameter's path, so adding a parameter never moves others."""
  return jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF)


def init(specs, key: jax.Array, mesh: jax.sharding.Mesh | None = None,
         rules: Sequence[tuple[str, Any]] | None = None):
  """Creates the parameters of `specs`; with a mesh, each is born in its sharded layout."""
  def make():
    return jax.tree_util.tree_map_with_path(
        lambda path, s: s.init(_path_key(key, path), s.shape, s.dtype), specs, is_leaf=is_spec)
  if mesh is None:
    return jax.jit(make)()
  return jax.jit(make, out_shardings=shardings(specs, mesh, rules))()


def shardings(specs, mesh: jax.sharding.Mesh, rules):
  """NamedSharding of every spec, mapping its logical axes to mesh axes through `rules`."""
  import flax.linen as nn
  return jax.tree.map(
      lambda s: nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(*s.axes), mesh, rules),
      specs, is_leaf=is_spec)


def count(specs) -> int:
  """Number of scalar parameters, read from shapes alone."""
  return sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=is_spec))


def shapes(specs):
  """`jax.ShapeDtypeStruct` of every spec (for `eval_shape`-style planning, no allocation)."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.dtype(s.dtype)), specs,
                      is_leaf=is_spec)
