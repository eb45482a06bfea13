"""The one training loop: init or resume, jitted steps, eval, samples, checkpoints, logging.

Every experiment reaches it through a `Task` (what to optimise) and a `Dataset` (what to read).
A run killed at any point resumes from its last checkpoint and continues bit-exactly; SIGTERM
saves at the next step boundary and returns cleanly.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lab.config import ConfigError
from lab.eval import image_grid
from lab.nn import param_spec
from lab.parallel import mesh as mesh_lib
from lab.parallel import rules as rules_lib
from lab.parallel import sharding
from lab.train import checkpoint, metrics_log, optimizers, precision, preemption, progress, step
from lab.train.state import TrainState

_INIT_KEY, _SAMPLE_KEY = 2, 3


class NonFiniteLossError(FloatingPointError):
  pass


def init_state(config, task, optimizer) -> TrainState:
  """A fresh TrainState; parameters are created from the task's ParamSpecs under jit."""
  root = jax.random.PRNGKey(config.seed)
  init_key = jax.random.fold_in(root, _INIT_KEY)
  params = param_spec.init(task.param_specs, init_key)
  cfg = config.train
  loss_scale = None
  if cfg.compute_dtype == 'float16':
    loss_scale = precision.LossScale.create(cfg.loss_scale_init, cfg.loss_scale_period)
  return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    model_state=task.init_state(jax.random.fold_in(init_key, 1)),
                    ema_params=jax.tree.map(jnp.copy, params) if cfg.ema_decay > 0 else None,
                    loss_scale=loss_scale, rng=root)


def evaluate(eval_step, state, batches) -> dict:
  """Mean of each metric over the fixed eval batches, named eval_<metric>."""
  totals = None
  for batch in batches:
    m = jax.device_get(eval_step(state, batch))
    totals = m if totals is None else {k: totals[k] + m[k] for k in m}
  return {f'eval_{k}': float(v) / len(batches) for k, v in totals.items()}


def _config_json(config) -> dict:
  return json.loads(config.to_json())


def _check_same_model(saved: dict, current: dict, workdir: str) -> None:
  """Resuming into a different model would fail deep in orbax; say which keys differ instead."""
  diff = sorted(k for k in saved['model'].keys() | current['model'].keys()
                if saved['model'].get(k) != current['model'].get(k))
  if diff:
    raise ConfigError(f'workdir {workdir!r} holds a checkpoint of a different model (model.'
                      + ', model.'.join(f'{k}: saved {saved["model"].get(k)!r} vs '
                                        f'{current["model"].get(k)!r}' for k in diff)
                      + '); use a new workdir')


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a run needs that depends on config, task and mesh: the sharded state layout, a jitted
  init that creates the state in that layout, and the jitted train and eval steps."""
  mesh: jax.sharding.Mesh
  rules: tuple
  abstract_state: TrainState      # ShapeDtypeStructs carrying their shardings
  init: Callable[[], TrainState]
  train_step: Callable            # (state, global batch) -> (state, metrics)
  eval_step: Callable             # (state, global batch) -> metrics

  def global_batch(self, local_batch: dict) -> dict:
    return sharding.global_batch(local_batch, self.mesh, self.rules)


def setup(config, task, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """The mesh comes from config.mesh unless given; parameters, optimizer state and batches are
  sharded by the logical-axis rules (lab.parallel.rules with config.sharding_rules)."""
  mesh = mesh or mesh_lib.make_mesh(config.mesh, config.get('mesh_dcn'))
  rules = rules_lib.make_rules(config.get('sharding_rules'))
  optimizer = optimizers.make(config.train)
  init = functools.partial(init_state, config, task, optimizer)
  abstract = jax.eval_shape(init)
  shardings = sharding.state_shardings(abstract, task.param_specs, optimizer, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return Setup(
      mesh=mesh, rules=rules,
      abstract_state=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings),
      init=jax.jit(init, out_shardings=shardings),
      train_step=jax.jit(step.make_train_step(config.train, task, optimizer),
                         out_shardings=(shardings, replicated), donate_argnums=0),
      eval_step=jax.jit(step.make_eval_step(config.train, task), out_shardings=replicated))


def train(config, task, data, workdir: str, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains to config.train.steps (or until SIGTERM) and returns the final state."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
  ckpt = checkpoint.Checkpointer(workdir, config.train.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    _check_same_model(ckpt.restore_config(start), _config_json(config), workdir)
  run = setup(config, task, mesh)
  train_iter = data.make_train_iter()
  with rules_lib.activate(run.mesh, run.rules):
    if start:
      state = ckpt.restore(start, run.abstract_state, train_iter)
    else:
      state = run.init()
    eval_batches = [sharding.global_batch_from_full(b, run.mesh, run.rules)
                    for b in data.eval_batches]
    return _run(config, task, state, run, eval_batches, train_iter, ckpt, workdir, start)


def _run(config, task, state, run: Setup, eval_batches, train_iter, ckpt, workdir, start):
  """Steps start+1 .. train.steps with logging, eval, samples, checkpoints and SIGTERM."""
  cfg = config.train
  primary = jax.process_index() == 0
  log = metrics_log.MetricsLog(workdir, resume_step=start, primary=primary)
  bar = progress.Progress(start, cfg.steps, cfg.log_every, primary=primary)

  def save(at: int):
    ckpt.save(at, state, train_iter, _config_json(config))

  def show_samples(at: int):
    """Text samples go to samples.txt and the terminal; arrays (images, points) to PNGs."""
    if task.sample is None:
      return
    params = state.ema_params if state.ema_params is not None else state.params
    outputs = task.sample(params, state.model_state,
                          step.step_key(state.rng, at, _SAMPLE_KEY))
    if not primary:
      return
    for name, value in outputs.items():
      if not isinstance(value, str):
        image_grid.save_samples(value, os.path.join(workdir, f'samples_{name}_{at:06d}.png'))
        continue
      with open(os.path.join(workdir, 'samples.txt'), 'a') as f:
        f.write(f'--- step {at} {name}\n{value}\n')
      bar.write(f'--- step {at} {name}\n{value}')

  with preemption.PreemptionFlag() as preempted:
    for at in range(start + 1, cfg.steps + 1):
      state, metrics = run.train_step(state, run.global_batch(next(train_iter)))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(metrics['loss']) and cfg.nonfinite == 'stop':
        raise NonFiniteLossError(f'loss is {metrics["loss"]} at step {at}; stopping '
                                 '(set train.nonfinite="skip" to skip such steps)')
      if at % cfg.log_every == 0 or at == cfg.steps:
        log.write(at, metrics)
      if cfg.eval_every and (at % cfg.eval_every == 0 or at == cfg.steps):
        eval_metrics = evaluate(run.eval_step, state, eval_batches)
        log.write(at, eval_metrics)
        bar.write(f'step {at}: ' + ' '.join(f'{k}={v:.4f}' for k, v in eval_metrics.items()))
      if cfg.sample_every and (at % cfg.sample_every == 0 or at == cfg.steps):
        show_samples(at)
      bar.update(at, metrics)
      if preempted.requested:
        save(at)
        bar.write(f'SIGTERM: saved step {at} to {workdir}; exiting')
        break
      if at % cfg.checkpoint_every == 0 or at == cfg.steps:
        save(at)
  bar.close()
  ckpt.close()
  log.plot()
  log.close()
  return state
