"""The contract between an experiment's objective and the one training loop."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
  """param_specs: pytree of ParamSpec. init_state(key): model state that is not a parameter
  (batch-norm statistics, routing biases, EMA teachers, queues; {} if none).
  loss_fn(params, state, batch, rng, train) -> (loss, (metrics, new_state)); metrics are scalars.
  With train.grad_accum > 1 the state threads through the micro-batches in order.
  after_step(params, state, step) -> state: optional, called once per optimizer step on the
  updated params, outside the gradient, with the step just completed (1-based): momentum and EMA
  targets (BYOL, MoCo, DINO), DeepSeek's routing-bias update from the step's summed loads.
  sample(params, state, rng) -> {name: text or array}: an optional hook the loop calls to show
  progress; text goes to samples.txt, arrays ([B, X, Y, C] images or [N, 2] points) to PNGs.
  features(params, state, images_BXYC) -> z_BD: optional, the learned encoder in eval mode, for
  frozen-feature evaluation (k-NN, linear probes: lab.eval.ssl_table).
  """
  param_specs: Any
  init_state: Callable[[Any], Any]
  loss_fn: Callable[..., Any]
  sample: Callable[[Any, Any, Any], dict[str, Any]] | None = None
  after_step: Callable[[Any, Any, Any], Any] | None = None
  features: Callable[[Any, Any, Any], Any] | None = None
