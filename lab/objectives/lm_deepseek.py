"""DeepSeek-V3's training objective (arXiv 2412.19437 §2.1.2, §2.2) for lab.models.deepseek.

  loss = CE + balance_alpha * sum over MoE layers of L_Bal / alpha (eqs. 17-20) + L_MTP
  L_MTP = lambda / D * sum_{k=1..D} L^k_MTP                                           (eq. 25)
  L^k_MTP = -1/T sum_{i: t_{i+k+1} exists} log P^k_i[t_{i+k+1}]                        (eq. 24)
with CE the next-token cross-entropy of lab.objectives.lm over the T input positions; L^k sums
the T - k positions whose target exists and divides by T, as eq. 24 does. In training the
routing bias of every MoE layer (the model state) moves by gamma * sign(mean load - load_i)
from this step's loads, outside the gradient (`lab.models.deepseek.update_state`); with
train.grad_accum > 1 it moves once per micro-batch.
Batches are {'tokens': int32[B, T + 1]} as for lm. Metrics: loss (the CE, comparable to lm's),
mtp_loss (L_MTP), total_loss, moe_balance_loss (sum_i f_i P_i averaged over the main MoE
layers, 1 when balanced), moe_max_vio (MaxVio = max_i load_i / mean load - 1 of each main MoE
layer on this batch, averaged over layers; Wang et al. 2024 eq. 4), moe_dropped.

A separate objective rather than a branch of lm: the GPT path stays stateless and short, and
this one reads top to bottom. There is no sampling hook: Task.sample(params, rng) gets no model
state, and routing without the trained bias would not be the trained model; decode with
lab.models.deepseek.generate instead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import deepseek
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
  require(block <= cfg.max_len,
          f'data.block_size={block} exceeds model.max_len={cfg.max_len}')
  require(block > cfg.mtp_depth,
          f'data.block_size={block}; expected more than model.mtp_depth={cfg.mtp_depth} '
          'so that every MTP module has a target')


def make_task(config, data) -> Task:
  del data
  cfg = config.model

  def loss_fn(params, state, batch, rng, train):
    tokens_BT1 = batch['tokens']
    next_BT = tokens_BT1[:, 1:]
    logits_BTV, aux = deepseek.forward_with_aux(cfg, params, state, tokens_BT1[:, :-1], rng=rng,
                                                train=train)
    ce = cross_entropy(logits_BTV, next_BT)
    routing = {'blocks': aux['moe']}
    metrics = {'loss': ce}
    loss = ce
    if cfg.mtp_depth:
      mtp_logits, routing['mtp'] = deepseek.mtp_logits(cfg, params, state, aux['hidden_BTD'],
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
      new_state = deepseek.update_state(cfg, state, {k: r['load_E'] for k, r in routing.items()})
    return loss, (metrics, new_state)

  return Task(param_specs=deepseek.param_specs(cfg),
              init_state=lambda key: deepseek.init_state(cfg), loss_fn=loss_fn)
