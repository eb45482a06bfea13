"""Training Medusa heads on a decoder (Cai et al. 2024, sec. 2.2).

Medusa-1: the backbone is frozen, L = sum_{k=1}^M decay^k CE_k, head k predicting token t+k+1.
The backbone is held as model state, not as a parameter, so neither gradients nor the
optimizer's weight decay touch it. Medusa-2: backbone and heads train jointly,
L = L_LM + lambda_0 sum_k decay^k CE_k (the paper's combined loss; its separate learning rates
for heads and backbone, and the heads-only warmup, are not reproduced here).

config.objective_args: mode ('medusa1' | 'medusa2'), num_heads (M), decay, lambda_0,
backbone_workdir (the workdir of a trained lab.objectives.lm run of the same model and data,
loaded with lab.train.restore; its (EMA) params are the backbone and its LM head is copied
into every head's output projection; '' starts Medusa-2 from a fresh backbone drawn from
config.seed), moe_balance_weight (Medusa-2 with MoE blocks), sample_tree (widths of the
Cartesian tree the sample hook decodes with, greedily).
Batches are {'tokens': int32[B, T + 1]}, as for lm. The model must be lab.models.transformer.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import transformer
from lab.nn import param_spec as ps
from lab.objectives.lm import cross_entropy
from lab.sampling import medusa, tree_attention
from lab.train import init_from, precision
from lab.train.task import Task

MODES = ('medusa1', 'medusa2')
_BACKBONE_KEY = 7
# Fields that may differ between the backbone's run and this one: they change no parameter.
_FREE_MODEL_FIELDS = ('attention_backend', 'remat', 'dropout')


def validate(config) -> None:
  args, s = config.objective_args, config.sample
  require(config.model.name == 'transformer',
          f'model.name={config.model.name!r}; Medusa training expects "transformer"')
  require(args.mode in MODES, f'objective_args.mode={args.mode!r}; expected one of {MODES}')
  require(args.num_heads >= 1, f'objective_args.num_heads={args.num_heads}; expected >= 1')
  require(args.decay > 0, f'objective_args.decay={args.decay}; expected > 0')
  require(args.lambda_0 >= 0, f'objective_args.lambda_0={args.lambda_0}; expected >= 0')
  require(args.mode == 'medusa2' or args.backbone_workdir,
          "objective_args.backbone_workdir=''; Medusa-1 freezes the backbone, so it expects the "
          'workdir of a trained decoder')
  require(config.data.block_size > args.num_heads,
          f'data.block_size={config.data.block_size}; expected more than objective_args.'
          f'num_heads={args.num_heads} so that every head has a target')
  widths = tuple(args.sample_tree)
  require(1 <= len(widths) <= args.num_heads and min(widths) >= 1,
          f'objective_args.sample_tree={widths}; expected 1..{args.num_heads} positive widths')
  require(len(s.prompt) + s.length + len(widths) <= config.model.max_len,
          f'sample.length={s.length} plus the {len(s.prompt)}-character prompt and the tree '
          f'depth {len(widths)} exceeds model.max_len={config.model.max_len}')


def load_backbone(config):
  """The backbone's params: restored from objective_args.backbone_workdir, or fresh."""
  cfg, workdir = config.model, config.objective_args.backbone_workdir
  if not workdir:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _BACKBONE_KEY)
    return jax.device_get(ps.init(transformer.param_specs(cfg), key))
  return init_from.restored_params(workdir, cfg, _FREE_MODEL_FIELDS)


def make_task(config, data) -> Task:
  cfg, args, s = config.model, config.objective_args, config.sample
  frozen = args.mode == 'medusa1'
  backbone = load_backbone(config)
  head_specs = medusa.head_specs(medusa.transformer_lm_head(cfg, backbone), args.num_heads)
  if frozen:
    specs = {'heads': head_specs}
  else:
    backbone_specs = init_from.constant_specs(transformer.param_specs(cfg), backbone)
    specs = {'backbone': backbone_specs, 'heads': head_specs}

  def loss_fn(params, state, batch, rng, train):
    tokens_BT1 = batch['tokens']
    if frozen:
      dtype = jax.tree.leaves(params['heads'])[0].dtype
      net = jax.lax.stop_gradient(precision.cast_floats(state['backbone'], dtype))
      h_BTD, aux = transformer.forward_hidden(cfg, net, tokens_BT1[:, :-1])
    else:
      net = params['backbone']
      h_BTD, aux = transformer.forward_hidden(cfg, net, tokens_BT1[:, :-1], rng=rng, train=train)
    ce_M, accuracy_M = medusa.head_cross_entropies(medusa.apply_heads(params['heads'], h_BTD),
                                                   tokens_BT1)
    heads_loss = medusa.medusa1_loss(ce_M, args.decay)
    metrics = {'heads_loss': heads_loss}
    for k in range(args.num_heads):
      metrics |= {f'head{k + 1}_ce': ce_M[k], f'head{k + 1}_accuracy': accuracy_M[k]}
    if frozen:
      loss = heads_loss
    else:
      lm_ce = cross_entropy(transformer.unembed(cfg, net, h_BTD), tokens_BT1[:, 1:])
      loss = medusa.medusa2_loss(lm_ce, ce_M, args.decay, args.lambda_0)
      metrics['lm_loss'] = lm_ce
      if aux:
        loss = loss + args.moe_balance_weight * aux['load_balance_loss'].mean()
    return loss, (dict(metrics, loss=loss), state)

  tree = tree_attention.cartesian(tuple(args.sample_tree))
  generate = jax.jit(functools.partial(medusa.medusa_generate, medusa.transformer_decoder(cfg),
                                       num_new=s.length, tree=tree))
  prompt_ids = data.encode(s.prompt) if data.encode and s.prompt else None

  def sample(params, state, rng):
    del state, rng  # greedy; a frozen backbone is the closure's
    net = backbone if frozen else params['backbone']
    prompt_BT = jnp.asarray(prompt_ids, jnp.int32)[None].repeat(s.num, axis=0)
    tokens_BT, stats = jax.device_get(generate(net, params['heads'], prompt_BT))
    texts = {f'sample_{i}': data.decode(row) for i, row in enumerate(tokens_BT)}
    per_step = stats['advanced_N'].sum() / max(int(stats['steps']), 1)
    return texts | {'tokens_per_step': f'{per_step:.2f} tokens per verification step '
                                       f'({int(stats["steps"])} steps)'}

  return Task(param_specs=specs,
              init_state=(lambda key: {'backbone': backbone}) if frozen else (lambda key: {}),
              loss_fn=loss_fn, sample=sample if s.num and prompt_ids is not None else None)
