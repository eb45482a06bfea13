"""SimCLR: Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive Learning
of Visual Representations", arXiv 2002.05709 (Algorithm 1).

Two views of every image, h = f(x) the backbone's features, z = g(h) the projection:
  g(h) = W2 ReLU(W1 h)                                   (sec. 2.1; projector 'v1', 128 out)
  L = NT-Xent(z) over the 2B views at temperature tau    (eq. 1; contrastive_losses.nt_xent)
Projector 'v2' is SimCLR v2's deeper head with BN (Chen et al. 2020b, arXiv 2006.10029, sec. 2):
[Linear-BN-ReLU] x 2, Linear-BN (lab's BN keeps both affine parameters; the v2 code drops the
final BN's bias). Hidden widths default to the feature width (2048 on ResNet-50 in the paper).

Batch norm, the paper's global BN (sec. 2.2): the two views go through the encoder as one batch of
2B (views 1 then views 2, the order nt_xent expects), so every BN normalises over both views of
every image; under jit with the batch sharded the statistics are global over devices too.

Augmentation (appendix A; lab.data.augment.simclr_views): crop of scale (0.08, 1), flip, colour
jitter of strength s with p = 0.8, grayscale p = 0.2, blur with p = p_blur. The defaults are the
CIFAR-10 recipe of appendix B.9 (s = 0.5, no blur), since MNIST's 28 x 28 digits are small images
too; ImageNet's is s = 1, p_blur = 0.5. Grey images (C = 1) get brightness and contrast only.

config.objective_args: method ('simclr'), temperature, projector ('v1' | 'v2'), dim (output
width), mlp_hidden (0 = the feature width), strength (s), p_blur.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives import contrastive_losses
from lab.train.task import Task

METHODS = ('simclr',)
PROJECTORS = ('v1', 'v2')
BASE_LR, BASE_BATCH, BATCH = 0.3, 256, 128  # LARS lr 0.3 B / 256 (sec. 2.3, default setting)


def experiment_defaults(method: str) -> dict:
  """The paper's recipe at lab's batch of 128: LARS (momentum 0.9) with lr = 0.3 B / 256 and
  weight decay 1e-6, a linear warmup over the first 10% of training (10 of 100 epochs; here 60 of
  600 steps), then cosine to 0. tau = 0.5, as the paper's CIFAR-10 runs at small batches
  (appendix B.9); its ImageNet choice 0.1 is tuned for batches of 4096 (table 5)."""
  require(method in METHODS, f'objective_args.method={method!r}; expected one of {METHODS}')
  return {'objective_args': dict(temperature=0.5, projector='v1', dim=128, mlp_hidden=0,
                                 strength=0.5, p_blur=0.0),
          'train': dict(optimizer='lars', lr=BASE_LR * BATCH / BASE_BATCH, weight_decay=1e-6,
                        b1=0.9, warmup_steps=60, min_lr=0.0, schedule='cosine')}


def validate(config) -> None:
  args = config.objective_args
  require(args.method in METHODS, f'objective_args.method={args.method!r}; expected one of '
          f'{METHODS}')
  backbone.validate(config.model)
  require(args.temperature > 0, f'objective_args.temperature={args.temperature}; expected > 0')
  require(args.projector in PROJECTORS,
          f'objective_args.projector={args.projector!r}; expected one of {PROJECTORS}')
  require(args.dim > 0, f'objective_args.dim={args.dim}; expected a positive width')
  require(args.mlp_hidden >= 0, f'objective_args.mlp_hidden={args.mlp_hidden}; expected >= 0 '
          '(0: the backbone feature width)')
  require(args.strength >= 0, f'objective_args.strength={args.strength}; expected >= 0')
  require(0.0 <= args.p_blur <= 1.0,
          f'objective_args.p_blur={args.p_blur}; expected a probability in [0, 1]')


def projector_layers(projector: str, hidden: int, dim: int) -> tuple[mlp_head.Layer, ...]:
  """g: 'v1' Linear(hidden)-ReLU-Linear(dim); 'v2' [Linear-BN-ReLU] x 2, Linear(dim)-BN."""
  if projector == 'v1':
    return mlp_head.layers((hidden, dim), bn_hidden=False)
  return mlp_head.layers((hidden, hidden, dim), bn_hidden=True, bn_last=True)


def make_task(config, data) -> Task:
  del data  # batches arrive in loss_fn; the monitor reads its own fixed subset
  args, cfg = config.objective_args, config.model
  d_feat = backbone.feature_dim(cfg)
  spec = projector_layers(args.projector, args.mlp_hidden or d_feat, args.dim)
  specs = {'encoder': backbone.param_specs(cfg), 'projector': mlp_head.head_specs(d_feat, spec)}

  def init_state(key):
    del key  # only batch-norm statistics, deterministic
    return {'encoder': backbone.init_state(cfg), 'projector': mlp_head.init_head_state(spec)}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    key = jax.random.key(0) if rng is None else rng
    k_view, k_drop = jax.random.split(key)
    x1_BXYC, x2_BXYC = jax.vmap(
        lambda k, x: augment.simclr_views(k, x, x_BXYC.shape[1], args.strength, args.p_blur))(
            augment.example_keys(k_view, x_BXYC.shape[0]), x_BXYC)
    x_2BXYC = jnp.concatenate([x1_BXYC, x2_BXYC])
    h_2BD, enc_state = backbone.features(cfg, params['encoder'], state['encoder'], x_2BXYC,
                                         train=train, rng=k_drop if train else None)
    z_2BD, head_state = mlp_head.head(params['projector'], state['projector'], spec, h_2BD,
                                      train=train)
    loss, metrics = contrastive_losses.nt_xent(z_2BD, args.temperature)
    new_state = {'encoder': enc_state, 'projector': head_state} if train else state
    return loss, ({'loss': loss, **metrics}, new_state)

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['encoder'], state['encoder'], images_BXYC,
                             train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn,
              sample=ssl_monitor.make_monitor(config, features, n_bank=config.sample.n_bank,
                                              n_query=config.sample.n_query), features=features)
