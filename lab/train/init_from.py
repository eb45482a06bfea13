"""Starting a run from another run's trained parameters (fine-tuning, frozen towers).

`restored_params(workdir, model_cfg)` restores a finished run's (EMA) parameters after checking
that it trained the same network (every model field but `free` ones must match);
`constant_specs(specs, params)` turns a ParamSpec tree into one whose initialisers return those
arrays, so the trainer creates the run's parameters from them in their sharded layout.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp

from lab.config import ConfigError
from lab.nn import param_spec as ps


def restored_params(workdir: str, model_cfg, free: Iterable[str] = ()):
  """The (EMA) params of the run in workdir, on the host; a ConfigError names every model field
  (outside `free`) where that run's config differs from model_cfg."""
  from lab.train import restore
  run = restore.load(workdir)
  free = set(free)
  diff = sorted(k for k in set(run.config.model) | set(model_cfg)
                if k not in free and run.config.model.get(k) != model_cfg.get(k))
  if diff:
    raise ConfigError(f'{workdir!r} holds a different model ('
                      + ', '.join(f'model.{k}: saved {run.config.model.get(k)!r} vs '
                                  f'{model_cfg.get(k)!r}' for k in diff) + ')')
  return jax.device_get(run.params)


def _constant(value) -> ps.Initializer:
  return lambda key, shape, dtype: jnp.asarray(value, dtype)


def constant_specs(specs, params):
  """specs with each initialiser replaced by one returning the matching array of params (same
  tree, same shapes: a mismatch is a ValueError naming the parameter)."""
  def replace(path, spec, value):
    if tuple(value.shape) != tuple(spec.shape):
      raise ValueError(f'parameter {jax.tree_util.keystr(path)} has shape {value.shape}; the '
                       f'specs expect {spec.shape}')
    return dataclasses.replace(spec, init=_constant(value))
  return jax.tree_util.tree_map_with_path(replace, specs, params, is_leaf=ps.is_spec)
