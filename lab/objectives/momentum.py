"""Slow-moving target networks of self-supervised methods: the exponential moving average and
its momentum schedules.

  xi <- m xi + (1 - m) theta                      (MoCo eq. 2; BYOL eq. 1; DINO eq. 2)
BYOL (Grill et al. 2020, sec. 3.2) and DINO (Caron et al. 2021, sec. 3.1) raise m from its base
value to 1 with a cosine over training:
  m_k = 1 - (1 - m_base) (cos(pi k / K) + 1) / 2,
MoCo v1/v2 keep m constant (0.999). Applied in Task.after_step, on the updated online params.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ema(target, online, momentum):
  """m target + (1 - m) online, leaf by leaf, in the target's dtypes."""
  return jax.tree.map(lambda t, o: (momentum * t + (1.0 - momentum) * o).astype(t.dtype),
                      target, online)


def cosine_momentum(base: float, step, total_steps: int):
  """m_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2 at step k of K (clipped at K): base at k = 0,
  1 at k = K."""
  if not 0.0 <= base <= 1.0:
    raise ValueError(f'momentum base={base}; expected a value in [0, 1]')
  if total_steps < 1:
    raise ValueError(f'total_steps={total_steps}; expected at least 1')
  k = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
  return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * k / total_steps) + 1.0) / 2.0
