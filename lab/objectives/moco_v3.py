"""MoCo v3: Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers", arXiv 2104.02057 (Algorithm 1).

The online network is the backbone f (a ViT by default), a projector g and a predictor h; the
momentum network is f_k, g_k (no predictor), an EMA of f, g. For two views x1, x2 of each image:
  q_i = h(g(f(x_i))),  k_i = g_k(f_k(x_i)), no gradient through k
  ctr(q, k) = 2 tau InfoNCE(normalize(q), normalize(k)) with the batch's other keys as negatives
  L = ctr(q1, k2) + ctr(q2, k1)                                   (Algorithm 1; InfoNCE eq. 1)
The 2 tau factor of Algorithm 1 makes the gradient's scale independent of tau. There is no
queue: the keys of the same batch are the negatives (the paper uses large batches instead).
After every optimizer step theta_k <- m theta_k + (1 - m) theta (eq. 2 of MoCo), with m raised
from 0.99 to 1 by a half cosine over training (the authors' code, --moco-m-cos;
lab.objectives.momentum.cosine_momentum). The momentum network starts as a copy of the online
one (lab.objectives.moco.momentum_network explains how, before the first step).

Heads (the authors' code): every Linear without bias; the projector has 3 layers on a ViT
(Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN) and 2 on a ResNet; the predictor 2 layers, with the
final BN on a ViT but not on a ResNet; every final BN has no affine parameters. Batch norm: each
view goes through a network separately (its own batch statistics, as the code's two calls per
network; the running statistics see view 1, then view 2); the paper's SyncBN makes them global
over devices, which lab's jit does too.

The ViT (sec. 4.2, random patch projection): with objective_args.freeze_patch the patch
projection stays at its random init, the code's --stop-grad-conv1. Frozen weights are not
parameters here: they live in the state (so neither the optimizer nor weight decay touch them),
drawn Xavier-uniform as in the code, U(-a, a) with a = sqrt(6 / (p^2 C + D)), bias 0. Positions
are the fixed 2-D sin-cos ones with a zero class-token position (model.pos_embed='sincos',
experiment_defaults), features the class token. The rest of the ViT init is lab's (big_vision's),
not the code's Xavier-uniform.

Augmentation: BYOL's two asymmetric views (crop scale (0.08, 1); lab.data.augment.byol_views).
config.objective_args: method ('moco_v3'), temperature (tau), momentum (base m), dim (output
width of g and h), mlp_hidden (hidden width of both), freeze_patch (bool; a ResNet has no
patch projection, so there it changes nothing and the same config serves encoder=resnet).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives import contrastive_losses, momentum, moco
from lab.train.task import Task

METHODS = ('moco_v3',)
BASE_LR, BASE_BATCH, BATCH = 1.5e-4, 256, 128  # AdamW lr 1.5e-4 per 256 images (sec. 5)


def experiment_defaults(method: str) -> dict:
  """The paper's ViT recipe at lab's batch of 128: AdamW with lr = 1.5e-4 B / 256, weight decay
  0.1, warmup for 40 of 300 epochs (here 80 of 600 steps), cosine to 0; tau 0.2, m from 0.99 by
  cosine to 1, sin-cos positions, frozen random patch projection. Head widths scaled down from
  the paper's 4096 hidden / 256 out (for a ViT-B of width 768) to 1024 / 256 for lab's width-64
  ViT."""
  require(method in METHODS, f'objective_args.method={method!r}; expected one of {METHODS}')
  return {'objective_args': dict(temperature=0.2, momentum=0.99, dim=256, mlp_hidden=1024,
                                 freeze_patch=True),
          'model': {'vit': dict(pos_embed='sincos')},
          'train': dict(optimizer='adamw', lr=BASE_LR * BATCH / BASE_BATCH, weight_decay=0.1,
                        warmup_steps=80, min_lr=0.0, schedule='cosine')}


def validate(config) -> None:
  args = config.objective_args
  require(args.method in METHODS, f'objective_args.method={args.method!r}; expected one of '
          f'{METHODS}')
  backbone.validate(config.model)
  require(args.temperature > 0, f'objective_args.temperature={args.temperature}; expected > 0')
  require(0.0 <= args.momentum <= 1.0,
          f'objective_args.momentum={args.momentum}; expected a value in [0, 1]')
  for key in ('dim', 'mlp_hidden'):
    require(args[key] > 0, f'objective_args.{key}={args[key]}; expected a positive width')
  require(isinstance(args.freeze_patch, bool),
          f'objective_args.freeze_patch={args.freeze_patch!r}; expected a bool')


def projector_layers(vit: bool, hidden: int, dim: int) -> tuple[mlp_head.Layer, ...]:
  """g: (3 on a ViT, 2 on a ResNet) layers, [Linear-BN-ReLU] x (n - 1), Linear-BN (no affine)."""
  n = 3 if vit else 2
  return (*(mlp_head.Layer(hidden, bias=False, bn=True) for _ in range(n - 1)),
          mlp_head.Layer(dim, bias=False, bn=True, bn_affine=False, act=None))


def predictor_layers(vit: bool, hidden: int, dim: int) -> tuple[mlp_head.Layer, ...]:
  """h: Linear-BN-ReLU, Linear, followed by a BN without affine on a ViT."""
  return (mlp_head.Layer(hidden, bias=False, bn=True),
          mlp_head.Layer(dim, bias=False, bn=vit, bn_affine=False, act=None))


def ctr(q_BD: jax.Array, k_BD: jax.Array, temperature) -> tuple[jax.Array, dict]:
  """2 tau InfoNCE(q / ||q||, k / ||k||) with in-batch negatives (Algorithm 1's ctr): logits
  q_b . k_s / tau, target s = b; the keys carry no gradient."""
  loss, metrics = contrastive_losses.info_nce(
      contrastive_losses.l2_normalize(q_BD),
      jax.lax.stop_gradient(contrastive_losses.l2_normalize(k_BD)), temperature)
  return 2 * temperature * loss, metrics


def symmetric_loss(q1_BD, q2_BD, k1_BD, k2_BD, temperature) -> tuple[jax.Array, dict]:
  """L = ctr(q1, k2) + ctr(q2, k1) (Algorithm 1); accuracy: the mean of the two directions."""
  l12, m12 = ctr(q1_BD, k2_BD, temperature)
  l21, m21 = ctr(q2_BD, k1_BD, temperature)
  return l12 + l21, {'accuracy': (m12['accuracy'] + m21['accuracy']) / 2}


def frozen_patch(key: jax.Array, p: int, c: int, d: int) -> dict:
  """The random patch projection {'w': w_XYCO, 'b': b_O}: Xavier-uniform U(-a, a) with
  a = sqrt(6 / (p^2 c + d)), the code's init of the patch embedding as a linear layer; b = 0."""
  a = math.sqrt(6.0 / (p * p * c + d))
  return {'w': jax.random.uniform(key, (p, p, c, d), jnp.float32, -a, a),
          'b': jnp.zeros((d,), jnp.float32)}


def make_task(config, data) -> Task:
  del data  # batches arrive in loss_fn; the monitor reads its own fixed subset
  args, cfg = config.objective_args, config.model
  vit = cfg.name == 'vit'
  d_feat = backbone.feature_dim(cfg)
  proj = projector_layers(vit, args.mlp_hidden, args.dim)
  pred = predictor_layers(vit, args.mlp_hidden, args.dim)
  frozen = args.freeze_patch and vit
  encoder_specs = backbone.param_specs(cfg)
  if frozen:
    encoder_specs = {k: v for k, v in encoder_specs.items() if k != 'patch'}
  net_specs = {'encoder': encoder_specs, 'projector': mlp_head.head_specs(d_feat, proj)}
  specs = {**net_specs, 'predictor': mlp_head.head_specs(args.dim, pred)}

  def net_state():
    return {'encoder': backbone.init_state(cfg), 'projector': mlp_head.init_head_state(proj)}

  def momentum_part(params):
    """The online parameters the momentum network follows: encoder and projector."""
    return {'encoder': params['encoder'], 'projector': params['projector']}

  def init_state(key):
    state = {'online': {**net_state(), 'predictor': mlp_head.init_head_state(pred)},
             'target': {'params': moco.placeholder(net_specs), 'state': net_state()},
             'synced': jnp.asarray(False)}
    if frozen:
      state['patch'] = frozen_patch(key, cfg.patch_size, cfg.channels, cfg.d_model)
    return state

  def encoder_params(p, state, like):
    """The encoder's params, with the frozen patch projection from the state when there is one."""
    if not frozen:
      return p['encoder']
    dtype = jax.tree.leaves(like)[0].dtype
    return {**p['encoder'], 'patch': jax.tree.map(lambda a: a.astype(dtype), state['patch'])}

  def project(p, s, state, x_BXYC, *, train, rng):
    """(g(f(x)), new {'encoder', 'projector'} state) of one network (params p, state s)."""
    z_BD, enc_state = backbone.features(cfg, encoder_params(p, state, p), s['encoder'], x_BXYC,
                                        train=train, rng=rng)
    y_BD, proj_state = mlp_head.head(p['projector'], s['projector'], proj, z_BD, train=train)
    return y_BD, {'encoder': enc_state, 'projector': proj_state}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    key = jax.random.key(0) if rng is None else rng
    k_view, k_drop = jax.random.split(key)
    views = jax.vmap(lambda k, x: augment.byol_views(k, x, x_BXYC.shape[1]))(
        augment.example_keys(k_view, x_BXYC.shape[0]), x_BXYC)
    target = moco.momentum_network(state['target']['params'], momentum_part(params),
                                   state['synced'])
    target_c = moco.cast_like(target, momentum_part(params))
    online, tstate, q, k = state['online'], state['target']['state'], [], []
    for i, x_BXYC in enumerate(views):  # view 1, then view 2: separate BN batches
      drop = jax.random.fold_in(k_drop, i) if train else None
      y_BD, s = project(params, online, state, x_BXYC, train=train, rng=drop)
      q_BD, pred_state = mlp_head.head(params['predictor'], online['predictor'], pred, y_BD,
                                       train=train)
      online = {**s, 'predictor': pred_state}
      k_BD, tstate = project(target_c, tstate, state, x_BXYC, train=train, rng=drop)
      q.append(q_BD)
      k.append(k_BD)
    loss, metrics = symmetric_loss(q[0], q[1], k[0], k[1], args.temperature)
    metrics = {'loss': loss, **metrics}
    if not train:
      return loss, (metrics, state)
    return loss, (metrics, {**state, 'online': online,
                            'target': {'params': target, 'state': tstate}})

  def after_step(params, state, step):
    m = momentum.cosine_momentum(args.momentum, step, config.train.steps)
    target = momentum.ema(state['target']['params'], momentum_part(params), m)
    return {**state, 'target': {**state['target'], 'params': target},
            'synced': jnp.asarray(True)}

  def features(params, state, images_BXYC):
    return backbone.features(cfg, encoder_params(params, state, params),
                             state['online']['encoder'], images_BXYC, train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn, after_step=after_step,
              sample=ssl_monitor.make_monitor(config, features, n_bank=config.sample.n_bank,
                                              n_query=config.sample.n_query), features=features)
