"""A finished (or running) experiment back from its workdir: config, task, data and state.

  run = restore.load('runs/mnist_edm')
  params = run.params            # the EMA parameters when the run kept an EMA
Used by evaluations that sample a trained model (sampler tables, reflow pairs, notebooks).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from lab.train import checkpoint, loop


@dataclasses.dataclass(frozen=True)
class Run:
  config: ml_collections.FrozenConfigDict
  task: Any
  data: Any
  state: Any
  step: int

  @property
  def params(self):
    return self.state.params if self.state.ema_params is None else self.state.ema_params


def load(workdir: str, step: int | None = None, overrides: dict | None = None) -> Run:
  """Restores the latest (or given) checkpoint of workdir with the config saved beside it;
  `overrides` ({'a.b': value}) change fields that do not affect the state (e.g. sample.*)."""
  from lab import run as run_lib
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found; expected the workdir of a lab.run experiment')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  config, task, data = run_lib.prepare(config)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir!r}')
  setup = loop.setup(config, task)
  state = ckpt.restore_state(step, setup.abstract_state)
  ckpt.close()
  return Run(config=config, task=task, data=data, state=state, step=step)
