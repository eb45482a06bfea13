"""Next-token prediction (causal language modelling).

loss = -1/(B T) sum_{b,t} log p(x_{b,t+1} | x_{b,<=t})   (Bengio et al. 2003; Radford et al. 2018)
plus, for MoE models, config.objective_args.moe_balance_weight times the mean over layers of
the load-balancing loss (Switch, Fedus et al. 2021, eq. 4).
Batches are {'tokens': int32[B, T + 1]}; inputs are tokens[:, :-1], targets tokens[:, 1:].
config.sample (num, length, prompt, temperature, top_k, top_p) drives the sampling hook.
"""
from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from lab.config import require
from lab.sampling import decode
from lab.train.task import Task


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean negative log-likelihood in float32 (nats per token): logsumexp(z) - z[target].

  The target logit is picked with a one-hot product rather than a gather, so that logits sharded
  over the vocabulary (tensor parallelism) reduce with one psum instead of being replicated.
  """
  logits_BTV = logits_BTV.astype(jnp.float32)
  target_BT = jnp.einsum('BTV,BTV->BT', logits_BTV,
                         jax.nn.one_hot(targets_BT, logits_BTV.shape[-1], dtype=jnp.float32))
  return (jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT).mean()


def moe_metrics(aux: dict) -> dict:
  """Routing health from per-layer MoE stats: the balance loss, dropped assignments, and the
  maximal violation MaxVio = max_e load_e / mean_e load_e - 1 (Wang et al. 2024), layer mean."""
  load_LE = aux['load_E'].astype(jnp.float32)
  max_vio_L = load_LE.max(-1) / load_LE.mean(-1) - 1.0
  return {'moe_balance_loss': aux['load_balance_loss'].mean(),
          'moe_dropped': aux['dropped'].sum().astype(jnp.float32), 'moe_max_vio': max_vio_L.mean()}


def validate(config) -> None:
  s = config.sample
  require(0.0 < s.top_p <= 1.0, f'sample.top_p={s.top_p}; expected 0 < top_p <= 1')
  require(s.temperature >= 0.0, f'sample.temperature={s.temperature}; expected >= 0')
  require(len(s.prompt) + s.length <= config.model.max_len,
          f'sample.length={s.length} plus the {len(s.prompt)}-character prompt exceeds '
          f'model.max_len={config.model.max_len}')
  require(config.data.block_size <= config.model.max_len,
          f'data.block_size={config.data.block_size} exceeds model.max_len={config.model.max_len}')


def make_task(config, data) -> Task:
  model = importlib.import_module(f'lab.models.{config.model.name}')
  cfg = config.model

  def loss_fn(params, state, batch, rng, train):
    tokens_BT1 = batch['tokens']
    logits_BTV, aux = model.forward_with_aux(cfg, params, tokens_BT1[:, :-1], rng=rng,
                                             train=train)
    loss = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
    metrics = {'loss': loss}
    if aux:
      balance = aux['load_balance_loss'].mean()
      metrics |= moe_metrics(aux)
      loss = loss + config.objective_args.moe_balance_weight * balance
    return loss, (metrics, state)

  s = config.sample
  prompt_ids = data.encode(s.prompt) if data.encode and s.prompt else None
  generate = jax.jit(functools.partial(decode.generate, model, cfg, num_new=s.length,
                                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))

  def sample(params, state, rng):
    del state  # the GPT has no model state
    prompt_BT = jnp.asarray(prompt_ids, jnp.int32)[None].repeat(s.num, axis=0)
    tokens_BT = jax.device_get(generate(params, prompt_BT, rng=rng))
    return {f'sample_{i}': data.decode(row) for i, row in enumerate(tokens_BT)}

  return Task(param_specs=model.param_specs(cfg), init_state=lambda key: {}, loss_fn=loss_fn,
              sample=sample if s.num and prompt_ids is not None else None)
