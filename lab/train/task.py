"""The contract between an experiment's objective and the one training loop."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
  """param_specs: pytree of ParamSpec. init_state(key): model state that is not a parameter
  (batch-norm statistics, routing biases; {} if none).
  loss_fn(params, state, batch, rng, train) -> (loss, (metrics, new_state)); metrics are scalars.
  sample(params, rng) -> {name: text or array}: an optional hook the loop calls to show progress;
  text goes to samples.txt, arrays ([B, X, Y, C] images or [N, 2] points) to PNGs in the workdir.
  """
  param_specs: Any
  init_state: Callable[[Any], Any]
  loss_fn: Callable[..., Any]
  sample: Callable[[Any, Any], dict[str, Any]] | None = None
