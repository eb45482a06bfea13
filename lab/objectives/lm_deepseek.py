"""DeepSeek-V3's training objective (arXiv 2412.19437 §2.1.2, §2.2) for lab.models.deepseek.

  loss = CE + balance_alpha * sum over MoE layers of L_Bal / alpha (eqs. 17-20) + L_MTP
  L_MTP = lambda / D * sum_{k=1..D} L^k_MTP                                           (eq. 25)
  L^k_MTP = -1/T sum_{i: t_{i+k+1} exists} log P^k_i[t_{i+k+1}]                        (eq. 24)
with CE the next-token cross-entropy of lab.objectives.lm over the T input positions; L^k sums
the T - k positions whose target exists and divides by T, as eq. 24 does.

Auxiliary-loss-free balancing (§2.1.2): the task state is {'bias': the model's routing biases
(lab.models.deepseek.init_state), 'load': tokens routed to each expert so far this step}. The
loss adds each micro-batch's loads to 'load' (bias unchanged, so every micro-batch of a step
routes alike); once per optimizer step the after_step hook moves the bias by
gamma * sign(mean load - load_i) from the step's summed loads, outside the gradient, and
clears 'load'. With train.grad_accum = 1 that is the paper's per-step update on this batch.

Batches are {'tokens': int32[B, T + 1]} as for lm. Metrics: loss (the CE, comparable to lm's),
mtp_loss (L_MTP), total_loss, moe_balance_loss (sum_i f_i P_i averaged over the main MoE
layers, 1 when balanced), moe_max_vio (MaxVio = max_i load_i / mean load - 1 of each main MoE
layer on this batch, averaged over layers; Wang et al. 2024 eq. 4), moe_dropped.
config.sample (num, length, prompt, temperature, top_k, top_p) drives the sampling hook, which
decodes with the trained routing bias through lab.models.deepseek.generate.

A separate objective rather than a branch of lm: the GPT path stays stateless and short, and
this one reads top to bottom.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import deepseek
from lab.objectives import lm
from lab.objectives.lm import cross_entropy
from lab.train.task import Task


def mtp_loss(logits, next_tokens_BT: jax.Array, mtp_lambda: float) -> jax.Array:
  """lambda / D sum_k L^k (eqs. 24-25) from `deepseek.mtp_logits`' logits (logits[k-1] is
  [B, T-k+1, V], position i predicting t_{i+k+1} = next_tokens_BT[:, i+k]); float32."""
  B, T = next_tokens_BT.shape
  total = jnp.zeros((), jnp.float32)
  for k, logits_BSV in enumerate(logits, start=1):
    S = T - k  # positions whose target exists
    total = total + cross_entropy(logits_BSV[:, :S], next_tokens_BT[:, k:]) * S / T
  return mtp_lambda / len(logits) * total


def validate(config) -> None:
  cfg, block = config.model, config.data.block_size
  require(cfg.name == 'deepseek',
          f'model.name={cfg.name!r}; objective lm_deepseek expects "deepseek"')
  require(block > cfg.mtp_depth,
          f'data.block_size={block}; expected more than model.mtp_depth={cfg.mtp_depth} '
          'so that every MTP module has a target')
  lm.validate(config)


def init_state(cfg) -> dict:
  """{'bias': routing biases (zeros), 'load': this step's loads so far (zeros), same shapes}."""
  bias = deepseek.init_state(cfg)
  return {'bias': bias, 'load': jax.tree.map(jnp.zeros_like, bias)}


def after_step(cfg, params, state: dict, step) -> dict:
  """The step's bias update from its summed loads (lab.models.deepseek.update_state)."""
  del params, step
  return {'bias': deepseek.update_state(cfg, state['bias'], state['load']),
          'load': jax.tree.map(jnp.zeros_like, state['load'])}


def make_task(config, data) -> Task:
  cfg = config.model

  def loss_fn(params, state, batch, rng, train):
    tokens_BT1 = batch['tokens']
    next_BT = tokens_BT1[:, 1:]
    bias = state['bias']
    logits_BTV, aux = deepseek.forward_with_aux(cfg, params, bias, tokens_BT1[:, :-1], rng=rng,
                                                train=train)
    ce = cross_entropy(logits_BTV, next_BT)
    routing = {'blocks': aux['moe']}
    metrics = {'loss': ce}
    loss = ce
    if cfg.mtp_depth:
      mtp_logits, routing['mtp'] = deepseek.mtp_logits(cfg, params, bias, aux['hidden_BTD'],
                                                       next_BT)
      metrics['mtp_loss'] = mtp_loss(mtp_logits, next_BT, cfg.mtp_lambda)
      loss = loss + metrics['mtp_loss']
    balance = sum(r['load_balance_loss'].sum() for r in routing.values())
    loss = loss + cfg.balance_alpha * balance
    metrics |= {'total_loss': loss,
                'moe_balance_loss': aux['moe']['load_balance_loss'].mean(),
                'moe_max_vio': aux['moe']['max_vio'].mean(),
                'moe_dropped': sum(r['dropped'].sum() for r in routing.values()
                                   ).astype(jnp.float32)}
    new_state = state
    if train:
      load = {k: state['load'][k] + jax.lax.stop_gradient(r['load_E']).astype(jnp.float32)
              for k, r in routing.items()}
      new_state = {'bias': bias, 'load': load}
    return loss, (metrics, new_state)

  s = config.sample
  prompt_ids = data.encode(s.prompt) if s.num and s.prompt and data.encode else None
  generate = jax.jit(functools.partial(deepseek.generate, cfg, num_new=s.length,
                                       temperature=s.temperature, top_k=s.top_k, top_p=s.top_p))

  def sample(params, state, rng):
    prompt_BT = jnp.asarray(prompt_ids, jnp.int32)[None].repeat(s.num, axis=0)
    tokens_BT = jax.device_get(generate(params, state['bias'], prompt_BT, rng=rng))
    return {f'sample_{i}': data.decode(row) for i, row in enumerate(tokens_BT)}

  return Task(param_specs=deepseek.param_specs(cfg), init_state=lambda key: init_state(cfg),
              loss_fn=loss_fn, after_step=functools.partial(after_step, cfg),
              sample=sample if s.num and prompt_ids is not None else None)
