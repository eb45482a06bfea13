"""Precision policy: float32 parameters, compute in float32 / bfloat16 / float16, and dynamic
loss scaling for float16 (Micikevicius et al. 2018, sec. 3.2).

Loss scaling multiplies the loss by S before differentiation and divides the gradients by S.
A step whose gradients are not finite is skipped and S is halved; after `period` finite steps in
a row S doubles.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from lab.config import ConfigError

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def compute_dtype(name: str):
  if name not in COMPUTE_DTYPES:
    raise ConfigError(f'train.compute_dtype={name!r}; expected one of {tuple(COMPUTE_DTYPES)}')
  return COMPUTE_DTYPES[name]


def cast_floats(tree, dtype):
  """Casts every floating-point leaf to dtype; integer leaves are left alone."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@flax.struct.dataclass
class LossScale:
  scale: jax.Array        # float32 scalar S
  good_steps: jax.Array   # int32: finite steps since the last change of S
  period: int = flax.struct.field(pytree_node=False, default=2000)

  @classmethod
  def create(cls, initial: float, period: int) -> LossScale:
    return cls(jnp.asarray(initial, jnp.float32), jnp.asarray(0, jnp.int32), period)

  def update(self, finite: jax.Array) -> LossScale:
    """Halve on overflow (not below 1); double after `period` finite steps in a row."""
    grown = self.good_steps + 1 >= self.period
    scale = jnp.where(finite, jnp.where(grown, self.scale * 2.0, self.scale),
                      jnp.maximum(self.scale / 2.0, 1.0))
    good = jnp.where(finite & ~grown, self.good_steps + 1, 0)
    return self.replace(scale=scale, good_steps=good.astype(jnp.int32))
