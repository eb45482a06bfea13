"""The one table from logical axis names to mesh axes, and helpers that apply it.

Parameters name their dims in ParamSpec.axes; activations are constrained at block boundaries
with `constrain(x, ('batch', 'length', 'embed'))`. An experiment may override entries through
config.sharding_rules ({logical name: mesh axis, a list of them, or None}).

Default layout (Megatron tensor parallelism + ZeRO-3 FSDP + expert parallelism):
  batch    -> (data, fsdp, expert)   every device of those axes holds different examples
  embed    -> fsdp                   parameters sharded over fsdp, gathered per layer by XLA
  mlp, heads, kv_heads, vocab -> tensor   column/row-parallel attention and MLP, vocab-parallel
  experts  -> expert
  length   -> seq                    context parallelism: ring attention over 'seq'
Activations use their own names (act_embed, act_heads, act_mlp, act_vocab): FSDP shards weights,
not the features of activations, so 'embed' and 'act_embed' map differently.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from lab.config import ConfigError

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ('batch', ('data', 'fsdp', 'expert')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('experts', 'expert'),
    ('layers', None),
    ('head_dim', None),
    ('length', 'seq'),
    # activations: features stay whole unless tensor parallelism splits them
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def make_rules(overrides=None) -> Rules:
  """DEFAULT_RULES with entries replaced or added from {logical: mesh axis | [axes] | None}."""
  table = dict(DEFAULT_RULES)
  for name, value in dict(overrides or {}).items():
    table[name] = tuple(value) if isinstance(value, (list, tuple)) else value
  return tuple(table.items())


def spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """The PartitionSpec of a value whose dims carry these logical names."""
  return nn.logical_to_mesh_axes(tuple(axes), rules)


def sharding(axes: Sequence[str | None], mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, spec(axes, rules))


def mesh_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names) as a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def devices_along(mesh, names: Sequence[str]) -> int:
  """How many devices the mesh axes `names` span together."""
  return math.prod(mesh.shape[a] for a in names)


def check_divisible(name: str, shape: Sequence[int], axes: Sequence[str | None], mesh, rules):
  """ConfigError unless every dim is divisible by the product of the mesh axes it maps to."""
  for dim, size, entry in zip(axes, shape, spec(axes, rules)):
    names = mesh_axes(entry)
    n = devices_along(mesh, names)
    if size % n:
      raise ConfigError(f'{name}: dim {dim!r} of size {size} is not divisible by mesh axes '
                        f'{names} of total size {n}')


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules):
  """Within the block (and traces made in it), `constrain` shards activations for this mesh and
  rules table: jax.set_mesh plus flax's logical_axis_rules, the two contexts flax reads."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names under `activate`; the identity outside it."""
  return nn.with_logical_constraint(x, tuple(axes))
