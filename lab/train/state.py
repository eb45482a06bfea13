"""The train state: everything a checkpoint must hold to resume bit-exactly."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax

from lab.train.precision import LossScale


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32: number of completed steps
  params: Any                  # float32 parameter pytree
  opt_state: Any               # optax state
  model_state: Any             # non-parameter model state ({} if none)
  ema_params: Any              # EMA of params, or None when train.ema_decay == 0
  loss_scale: LossScale | None  # dynamic loss scale for float16, else None
  rng: jax.Array               # raw uint32 root key; per-step keys are folded from it
