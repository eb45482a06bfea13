"""SimSiam: Siamese representation learning without negatives or a momentum encoder (Chen & He
2021, "Exploring Simple Siamese Representation Learning", arXiv:2011.10566).

Two views x1, x2 of an image go through the same encoder f (backbone + projection MLP) and a
prediction MLP h: z_i = f(x_i), p_i = h(z_i). With the negative cosine similarity
  D(p, z) = -p / ||p|| . z / ||z||                                                (eq. 1)
the loss is symmetrised with a stop-gradient on the targets:
  L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2,                           (eq. 2)
averaged over the batch. objective_args.stop_gradient=False removes the stop-gradient, which
collapses the representation (sec. 4.1, fig. 2): every output becomes the same vector, and the
std of z / ||z|| over the batch (lab.eval.collapse.normalized_std, the metric 'z_std') falls to
0 instead of staying near 1 / sqrt(d).
Heads (sec. 4, "Baseline settings"): projector [Linear-BN-ReLU] x 2, Linear-BN (BN on every
layer including the output, no ReLU there; hidden and output width d = proj_dim); predictor
Linear(d_h)-BN-ReLU, Linear(d) with the bottleneck d_h = d / 4 (the paper's 2048 and 512).
Augmentations: the paper's (MoCo v2 / SimCLR) recipe, a crop with scale (0.2, 1) (the authors'
code), flip, colour jitter (0.4, 0.4, 0.4, 0.1) p = 0.8, grayscale p = 0.2, blur p = 0.5; both
views from the same recipe.
Batch norm: each view goes through the network as its own batch, as the authors' code does.
Optimizer (experiment_defaults): SGD with momentum 0.9, weight decay 1e-4 and lr = 0.05 B / 256
on a cosine schedule, as the paper; the paper's constant learning rate of the predictor is not
reproduced (the shared optimizer has one schedule).
Letters: V the two views.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import collapse, ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives.contrastive_losses import l2_normalize
from lab.train.task import Task

BASE_LR, BASE_BATCH = 0.05, 256


def experiment_defaults(method: str) -> dict:
  """The paper's SGD recipe (lr scaled by B / 256 for the shared batch of 128, no warmup) and its
  4 : 1 predictor bottleneck at a width scaled to a width-16 ResNet."""
  del method
  return {'objective_args': dict(proj_dim=256, pred_hidden=64, stop_gradient=True,
                                 crop_scale=(0.2, 1.0)),
          'train': dict(optimizer='sgd', lr=BASE_LR * 128 / BASE_BATCH, b1=0.9,
                        weight_decay=1e-4, warmup_steps=0)}


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'simsiam', f'objective_args.method={a.method!r}; expected "simsiam"')
  for key in ('proj_dim', 'pred_hidden'):
    require(a[key] >= 1, f'objective_args.{key}={a[key]}; expected a positive integer')
  require(isinstance(a.stop_gradient, bool),
          f'objective_args.stop_gradient={a.stop_gradient!r}; expected a bool')
  lo_hi = tuple(a.crop_scale)
  require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
          f'objective_args.crop_scale={lo_hi}; expected (lo, hi) with 0 < lo <= hi <= 1')
  backbone.validate(config.model)


def negative_cosine(p_BD: jax.Array, z_BD: jax.Array) -> jax.Array:
  """D(p, z) = -mean_b p_b . z_b / (||p_b|| ||z_b||) (eq. 1), in at least float32."""
  return -jnp.mean(jnp.sum(l2_normalize(p_BD) * l2_normalize(z_BD), axis=-1))


def simsiam_loss(p1_BD, p2_BD, z1_BD, z2_BD, stop_gradient: bool = True) -> jax.Array:
  """L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 (eq. 2); sg is the identity when stop_gradient
  is False (the collapsing ablation of sec. 4.1)."""
  sg = jax.lax.stop_gradient if stop_gradient else (lambda z: z)
  return negative_cosine(p1_BD, sg(z2_BD)) / 2 + negative_cosine(p2_BD, sg(z1_BD)) / 2


def view_spec(size: int, scale) -> augment.ViewSpec:
  """The views of the module docstring at size x size."""
  return augment.ViewSpec(size, tuple(scale), jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8,
                          p_gray=0.2, p_blur=0.5)


def make_task(config, data) -> Task:
  del data
  cfg, a = config.model, config.objective_args
  projector = mlp_head.layers((a.proj_dim,) * 3, bn_hidden=True, bn_last=True)
  predictor = mlp_head.layers((a.pred_hidden, a.proj_dim), bn_hidden=True)
  specs = {'encoder': backbone.param_specs(cfg),
           'projector': mlp_head.head_specs(backbone.feature_dim(cfg), projector),
           'predictor': mlp_head.head_specs(a.proj_dim, predictor)}

  def init_state(key):
    del key
    return {'encoder': backbone.init_state(cfg),
            'projector': mlp_head.init_head_state(projector),
            'predictor': mlp_head.init_head_state(predictor)}

  def forward(params, state, x_BXYC, train, rng):
    """(z_BD, p_BD, new_state) of one view."""
    h_BD, enc = backbone.features(cfg, params['encoder'], state['encoder'], x_BXYC, train=train,
                                  rng=rng)
    z_BD, proj = mlp_head.head(params['projector'], state['projector'], projector, h_BD,
                               train=train)
    p_BD, pred = mlp_head.head(params['predictor'], state['predictor'], predictor, z_BD,
                               train=train)
    return z_BD, p_BD, {'encoder': enc, 'projector': proj, 'predictor': pred}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    spec = view_spec(x_BXYC.shape[1], a.crop_scale)
    key = jax.random.key(0) if rng is None else jax.random.fold_in(rng, 0)
    keys_B = augment.example_keys(key, x_BXYC.shape[0])
    two_views = lambda k, x: jax.vmap(lambda kv: augment.view(spec, kv, x))(jax.random.split(k))
    x_BVXYC = jax.vmap(two_views)(keys_B, x_BXYC)
    x1_BXYC, x2_BXYC = x_BVXYC[:, 0], x_BVXYC[:, 1]
    rngs = (None, None) if rng is None else (jax.random.fold_in(rng, 1),
                                             jax.random.fold_in(rng, 2))
    z1_BD, p1_BD, state = forward(params, state, x1_BXYC, train, rngs[0])
    z2_BD, p2_BD, state = forward(params, state, x2_BXYC, train, rngs[1])
    loss = simsiam_loss(p1_BD, p2_BD, z1_BD, z2_BD, a.stop_gradient)
    metrics = {'loss': loss, 'z_std': collapse.normalized_std(jax.lax.stop_gradient(z1_BD))}
    return loss, (metrics, state)

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['encoder'], state['encoder'], images_BXYC,
                             train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn,
              sample=ssl_monitor.make_monitor(config, features, config.sample.n_bank,
                                              config.sample.n_query), features=features)
