"""What a data module hands the trainer."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
  """make_train_iter() -> a checkpointable (get_state/set_state) iterator of host-local batches.

  eval_batches: a fixed list of batches. config_updates: fields the data decides, e.g.
  {'model.vocab_size': 65}, written into the config before it is validated and locked.
  decode: ids -> text (or None for non-text data).
  """
  make_train_iter: Callable[[], Iterator[dict[str, np.ndarray]]]
  eval_batches: list[dict[str, np.ndarray]]
  config_updates: dict[str, Any]
  encode: Callable[[str], np.ndarray] | None = None
  decode: Callable[[Any], str] | None = None
