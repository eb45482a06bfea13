"""Shardings of the whole train state and of batches, derived from the ParamSpecs and rules.

Parameters (and their EMA) follow their logical axes; optimizer moments mirror the parameter
they belong to (`optax.tree_map_params`), so FSDP shards Adam's m and v with the weights (ZeRO-3);
scalars (step, RNG, loss scale, counters) are replicated. Batches are split over the mesh axes
that 'batch' maps to.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lab.nn import param_spec
from lab.parallel import rules as rules_lib


def param_shardings(specs, mesh, rules):
  """NamedSharding of every parameter; a dim its mesh axes do not divide is a ConfigError."""
  for path, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=param_spec.is_spec):
    rules_lib.check_divisible('param ' + jax.tree_util.keystr(path), s.shape, s.axes, mesh, rules)
  return param_spec.shardings(specs, mesh, rules)


def state_shardings(abstract_state, specs, optimizer: optax.GradientTransformation, mesh, rules):
  """A TrainState-shaped tree of NamedShardings for `abstract_state` (from jax.eval_shape)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  params = param_shardings(specs, mesh, rules)
  opt_state = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_state.opt_state, params,
      transform_non_params=lambda _: replicated)
  everything_else = jax.tree.map(lambda _: replicated, abstract_state)
  return everything_else.replace(
      params=params, opt_state=opt_state,
      ema_params=None if abstract_state.ema_params is None else params)


def batch_sharding(mesh, rules) -> NamedSharding:
  """Leading (batch) dim over the mesh axes of the logical name 'batch'."""
  return rules_lib.sharding(('batch',), mesh, rules)


def global_batch(local_batch: dict, mesh, rules) -> dict:
  """Assembles each process's host-local batch into global arrays sharded over 'batch'."""
  def put(x):
    x = np.asarray(x)
    spec = rules_lib.spec(('batch',) + (None,) * (x.ndim - 1), rules)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  return jax.tree.map(put, local_batch)


def global_batch_from_full(full_batch: dict, mesh, rules) -> dict:
  """Global arrays sharded over 'batch' from a batch every process holds in full (eval data)."""
  def put(x):
    x = np.asarray(x)
    spec = rules_lib.spec(('batch',) + (None,) * (x.ndim - 1), rules)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
  return jax.tree.map(put, full_batch)
