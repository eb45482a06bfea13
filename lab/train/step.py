"""The train and eval steps, built once per run from config.train and the task.

One step: per-step key = fold_in(root, step); gradients over `grad_accum` micro-batches (scanned,
summed, averaged); the loss is scaled for float16; the update (AdamW, clipping) and then the
task's after_step hook (on the new params) are applied only when every gradient is finite,
otherwise params, optimizer and model state stay as they were.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lab.train import optimizers, precision
from lab.train.state import TrainState

_TRAIN_KEY, _EVAL_KEY = 0, 1


def step_key(root: jax.Array, step: jax.Array, purpose: int) -> jax.Array:
  """The key of one step and purpose: a resumed run draws exactly the same numbers."""
  return jax.random.fold_in(jax.random.fold_in(root, step), purpose)


def _split_micro(batch, n: int):
  return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)


def make_train_step(train_cfg, task, optimizer):
  """Returns step(state, batch) -> (state, metrics)."""
  dtype = precision.compute_dtype(train_cfg.compute_dtype)
  accum = train_cfg.grad_accum
  lr_schedule = optimizers.schedule(train_cfg)

  def grads_of(params, model_state, batch, rng, scale):
    def scaled_loss(p):
      loss, (metrics, new_state) = task.loss_fn(precision.cast_floats(p, dtype), model_state,
                                                batch, rng, True)
      return loss.astype(jnp.float32) * scale, (metrics, new_state)
    grads, (metrics, new_state) = jax.grad(scaled_loss, has_aux=True)(params)
    return grads, metrics, new_state

  def accumulate(params, model_state, batch, rng, scale):
    if accum == 1:
      return grads_of(params, model_state, batch, rng, scale)

    def body(carry, xs):
      grads_sum, metrics_sum, state = carry
      micro, i = xs
      grads, metrics, state = grads_of(params, state, micro, jax.random.fold_in(rng, i), scale)
      return (jax.tree.map(jnp.add, grads_sum, grads),
              jax.tree.map(jnp.add, metrics_sum, metrics), state), None

    micro = _split_micro(batch, accum)
    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape = jax.eval_shape(lambda: grads_of(params, model_state, first, rng, scale)[1])
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape), model_state)
    (grads, metrics, state), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
    mean = lambda t: jax.tree.map(lambda x: x / accum, t)
    return mean(grads), mean(metrics), state

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng = step_key(state.rng, state.step, _TRAIN_KEY)
    scale = state.loss_scale.scale if state.loss_scale is not None else jnp.float32(1.0)
    grads, metrics, new_model_state = accumulate(state.params, state.model_state, batch, rng, scale)
    grads = jax.tree.map(lambda g: g / scale, grads)
    finite = precision.all_finite(grads) & jnp.isfinite(metrics['loss'])
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(new_params, state.params)
    if task.after_step is not None:
      new_model_state = task.after_step(params, new_model_state, state.step + 1)
    ema = state.ema_params
    if ema is not None:
      d = train_cfg.ema_decay
      ema = keep(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params), ema)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=lr_schedule(state.step),
                   skipped=(~finite).astype(jnp.int32))
    loss_scale = state.loss_scale
    if loss_scale is not None:
      metrics['loss_scale'] = loss_scale.scale
      loss_scale = loss_scale.update(finite)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=keep(new_opt_state, state.opt_state),
                         model_state=keep(new_model_state, state.model_state), ema_params=ema,
                         loss_scale=loss_scale), metrics

  return step


def make_eval_step(train_cfg, task):
  """Returns eval_step(state, batch) -> metrics, on the EMA params when EMA is on."""
  dtype = precision.compute_dtype(train_cfg.compute_dtype)

  def eval_step(state: TrainState, batch) -> dict:
    params = state.ema_params if state.ema_params is not None else state.params
    _, (metrics, _) = task.loss_fn(precision.cast_floats(params, dtype), state.model_state, batch,
                                   step_key(state.rng, state.step, _EVAL_KEY), False)
    return metrics

  return eval_step
