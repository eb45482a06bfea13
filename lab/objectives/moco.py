"""MoCo v1 and v2: momentum contrast against a queue of keys.

MoCo v1: He, Fan, Wu, Xie & Girshick 2019, "Momentum Contrast for Unsupervised Visual
  Representation Learning", arXiv 1911.05722 (Algorithm 1).
MoCo v2: Chen, Fan, Girshick & He 2020, "Improved Baselines with Momentum Contrastive Learning",
  arXiv 2003.04297: an MLP projection head, tau 0.2, blur in the augmentation, cosine lr.

A query encoder f_q (params: the backbone and its projection g) and a key encoder f_k of the same
shape (state) embed two views of every image:
  q = normalize(f_q(x_q)),  k = normalize(f_k(x_k)), no gradient through k
  L = -1/B sum_b log exp(q_b . k_b / tau) / (exp(q_b . k_b / tau) + sum_n exp(q_b . u_n / tau))
                                                                            (eq. 1)
with u_n the N keys of the queue (earlier batches; lab.objectives.contrastive_losses.info_nce).
After the optimizer step: theta_k <- m theta_k + (1 - m) theta_q (eq. 2), and the batch's keys
replace the oldest B of the queue (FIFO; N a multiple of B).

Order of the momentum update: Algorithm 1 updates f_k after the SGD step, the authors' code at the
start of the next forward; both give the same sequence of key encoders, because f_k starts as a
copy of f_q. lab does it in Task.after_step, on the updated f_q. Task.init_state cannot see the
parameters, so the state's key encoder is a placeholder until the first step: loss_fn then uses a
copy of f_q (`momentum_network`) and stores it, and after_step's first update starts from it.

Shuffling BN (sec. 3.3): the paper's 8 GPUs each normalise their 32 queries by the statistics of
their own sub-batch, and the keys are computed on a batch shuffled across GPUs, so a query and its
positive key never share batch statistics (which the model would otherwise exploit). On one device
lab simulates this: both encoders normalise over `bn_groups` sub-batches of B / G examples (vmap
over G), the key encoder after a random permutation of the batch, undone on its output. The
running statistics take the mean of the groups' updates (the code keeps rank 0's). With G = 1 the
shuffle changes nothing (one batch, the same statistics) and BN leaks as without it.

Augmentation, per the authors' code: crop of scale (0.2, 1), flip, grayscale p = 0.2, and colour
jitter (0.4, 0.4, 0.4, 0.4) always (v1), or jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8 and Gaussian
blur sigma ~ U(0.1, 2) with p = 0.5 (v2). (The v1 code converts to grey before the jitter; lab
jitters first: saturation and hue are the identity on grey pixels, brightness and contrast commute
with the luma, so only the clipping differs.) Grey images (C = 1) get brightness and contrast only.

config.objective_args: method ('moco_v1' | 'moco_v2'), temperature, momentum, queue_size (N),
dim (output width of g), mlp_hidden (v2's hidden width; 0 = the backbone's feature width, as the
code's 2048 for ResNet-50), bn_groups (G).
Letters beyond DESIGN.md's: N the queue's keys, G the BN groups.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.nn import param_spec as ps
from lab.objectives import contrastive_losses, momentum
from lab.train.task import Task

METHODS = ('moco_v1', 'moco_v2')
BASE_LR, BASE_BATCH, BATCH = 0.03, 256, 128  # SGD lr 0.03 per 256 images (sec. 4), lab's batch


def experiment_defaults(method: str) -> dict:
  """The papers' recipe at lab's batch of 128: SGD (momentum 0.9, weight decay 1e-4) with the
  linear lr rule 0.03 B / 256 and no warmup; tau 0.07 (v1) / 0.2 (v2), m = 0.999, 128-d keys.
  v1 decays the lr by 10x at 60% and 80% of training (120 and 160 of 200 epochs); lab has no
  multi-step schedule, so v1 uses the nearest shape, WSD: flat for 60%, then linear to lr / 100.
  v2 uses the cosine schedule to 0. The queue: N = 4096, not ImageNet's 65536, so that the 600
  steps of 128 images refill it 18 times (the paper's fig. 3 trains N from 256 to 65536).
  G = 4 BN groups of 32 images, the paper's 32 per GPU."""
  require(method in METHODS, f'objective_args.method={method!r}; expected one of {METHODS}')
  v2 = method == 'moco_v2'
  train = dict(optimizer='sgd', lr=BASE_LR * BATCH / BASE_BATCH, b1=0.9, weight_decay=1e-4,
               warmup_steps=0, min_lr=0.0 if v2 else BASE_LR * BATCH / BASE_BATCH / 100,
               schedule='cosine' if v2 else 'wsd', wsd_decay_fraction=0.4)
  args = dict(temperature=0.2 if v2 else 0.07, momentum=0.999, queue_size=4096, dim=128,
              mlp_hidden=0, bn_groups=4)
  return {'objective_args': args, 'train': train}


def validate(config) -> None:
  args = config.objective_args
  require(args.method in METHODS, f'objective_args.method={args.method!r}; expected one of '
          f'{METHODS}')
  backbone.validate(config.model)
  require(args.temperature > 0, f'objective_args.temperature={args.temperature}; expected > 0')
  require(0.0 <= args.momentum <= 1.0,
          f'objective_args.momentum={args.momentum}; expected a value in [0, 1]')
  require(args.dim > 0, f'objective_args.dim={args.dim}; expected a positive width')
  require(args.mlp_hidden >= 0, f'objective_args.mlp_hidden={args.mlp_hidden}; expected >= 0 '
          '(0: the backbone feature width)')
  micro = config.train.batch_size // config.train.grad_accum
  require(args.bn_groups >= 1 and micro % args.bn_groups == 0,
          f'objective_args.bn_groups={args.bn_groups}; expected a divisor of the micro-batch '
          f'{micro}')
  require(args.queue_size > 0 and args.queue_size % micro == 0,
          f'objective_args.queue_size={args.queue_size}; expected a positive multiple of the '
          f'micro-batch {micro}')


def view_spec(method: str, size: int) -> augment.ViewSpec:
  """The augmentation of both views (module docstring), output size x size."""
  if method == 'moco_v1':
    return augment.ViewSpec(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0)
  return augment.ViewSpec(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), p_blur=0.5)


def head_layers(method: str, d_in: int, dim: int, mlp_hidden: int) -> tuple[mlp_head.Layer, ...]:
  """g: v1 the encoder's last fc layer, Linear(dim); v2 Linear(hidden)-ReLU-Linear(dim), hidden
  = mlp_hidden or the feature width d_in."""
  if method == 'moco_v1':
    return (mlp_head.Layer(dim, act=None),)
  return mlp_head.layers((mlp_hidden or d_in, dim), bn_hidden=False)


def two_views(spec: augment.ViewSpec, key: jax.Array, x_BXYC: jax.Array):
  """(x_q, x_k), each [B, size, size, C]: two independent views of every image, keyed per
  example (augment.example_keys)."""
  def pair(k, x_XYC):
    return (augment.view(spec, jax.random.fold_in(k, 0), x_XYC),
            augment.view(spec, jax.random.fold_in(k, 1), x_XYC))
  return jax.vmap(pair)(augment.example_keys(key, x_BXYC.shape[0]), x_BXYC)


def grouped_features(cfg, params, state, x_BXYC: jax.Array, groups: int, *, train: bool,
                     rng: jax.Array | None):
  """(z_BD, new_state): backbone.features with batch norm over G = groups consecutive sub-batches
  of B / G images each (one GPU's batch in the paper); the new running statistics are the mean of
  the G groups' updates. G = 1 is the plain call."""
  if groups == 1:
    return backbone.features(cfg, params, state, x_BXYC, train=train, rng=rng)
  B = x_BXYC.shape[0]
  x_GBXYC = x_BXYC.reshape(groups, B // groups, *x_BXYC.shape[1:])
  run = lambda x, r: backbone.features(cfg, params, state, x, train=train, rng=r)
  if rng is None:
    z_GBD, state_G = jax.vmap(lambda x: run(x, None))(x_GBXYC)
  else:
    z_GBD, state_G = jax.vmap(run)(x_GBXYC, jax.random.split(rng, groups))
  return z_GBD.reshape(B, -1), jax.tree.map(lambda s: s.mean(0), state_G)


def shuffled(embed, x_BXYC: jax.Array, key: jax.Array):
  """(y_BD, aux) = embed(x[pi]) with the random permutation pi undone on the rows: y_b belongs
  to x_b, but x_b was normalised with other images than in an unshuffled call (Shuffling BN)."""
  perm_B = jax.random.permutation(key, x_BXYC.shape[0])
  y_BD, aux = embed(x_BXYC[perm_B])
  return y_BD[jnp.argsort(perm_B)], aux


def enqueue(queue_ND: jax.Array, ptr: jax.Array, keys_BD: jax.Array):
  """(queue_ND, ptr): MoCo's dictionary as the authors' ring buffer. The B new keys overwrite
  rows ptr .. ptr + B - 1, the oldest ones (dequeue and enqueue of Algorithm 1), and
  ptr <- (ptr + B) mod N; rows ptr .. N - 1, 0 .. ptr - 1 are then oldest to newest."""
  N, B = queue_ND.shape[0], keys_BD.shape[0]
  if keys_BD.ndim != 2 or keys_BD.shape[1] != queue_ND.shape[1] or N % B:
    raise ValueError(f'enqueue: keys of shape {keys_BD.shape} into a queue of shape '
                     f'{queue_ND.shape}; expected [B, {queue_ND.shape[1]}] with B dividing {N}')
  queue_ND = jax.lax.dynamic_update_slice(queue_ND, keys_BD.astype(queue_ND.dtype), (ptr, 0))
  return queue_ND, (ptr + B) % N


def init_queue(key: jax.Array, size: int, dim: int) -> jax.Array:
  """queue_ND of random unit vectors (the authors' code: randn, normalised per key)."""
  return contrastive_losses.l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))


def placeholder(specs):
  """Zeros shaped like `specs`: the momentum network before its first step (momentum_network)."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), ps.shapes(specs))


def momentum_network(target, online, synced: jax.Array):
  """The momentum network theta_k to use now: `target` once synced (after the first after_step),
  before that a copy of the online theta_q without gradient, in the target's dtypes; loss_fn
  stores what it returns, so the first update is m theta_q^(0) + (1 - m) theta_q^(1)."""
  return jax.tree.map(
      lambda t, o: jnp.where(synced, t, jax.lax.stop_gradient(o).astype(t.dtype)), target, online)


def cast_like(tree, like):
  """Every leaf of tree cast to the dtype of the matching leaf of `like` (the compute dtype)."""
  return jax.tree.map(lambda t, o: t.astype(o.dtype), tree, like)


def make_task(config, data) -> Task:
  del data  # batches arrive in loss_fn; the monitor reads its own fixed subset
  args, cfg = config.objective_args, config.model
  d_feat = backbone.feature_dim(cfg)
  spec = head_layers(args.method, d_feat, args.dim, args.mlp_hidden)
  specs = {'encoder': backbone.param_specs(cfg), 'projector': mlp_head.head_specs(d_feat, spec)}
  groups = args.bn_groups

  def net_state():
    return {'encoder': backbone.init_state(cfg), 'projector': mlp_head.init_head_state(spec)}

  def init_state(key):
    return {'online': net_state(), 'target': {'params': placeholder(specs), 'state': net_state()},
            'synced': jnp.asarray(False), 'queue': init_queue(key, args.queue_size, args.dim),
            'queue_ptr': jnp.asarray(0, jnp.int32)}

  def embed(p, s, x_BXYC, *, train, rng):
    """(normalize(g(f(x))), new state) of one network (params p, state s)."""
    z_BD, enc_state = grouped_features(cfg, p['encoder'], s['encoder'], x_BXYC, groups,
                                       train=train, rng=rng)
    h_BD, head_state = mlp_head.head(p['projector'], s['projector'], spec, z_BD, train=train)
    return contrastive_losses.l2_normalize(h_BD), {'encoder': enc_state, 'projector': head_state}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    key = jax.random.key(0) if rng is None else rng
    k_view, k_shuffle, k_q, k_k = jax.random.split(key, 4)
    x_q, x_k = two_views(view_spec(args.method, x_BXYC.shape[1]), k_view, x_BXYC)
    drop = lambda k: k if train else None
    q_BD, online_state = embed(params, state['online'], x_q, train=train, rng=drop(k_q))
    target = momentum_network(state['target']['params'], params, state['synced'])
    k_BD, target_state = shuffled(
        lambda x: embed(cast_like(target, params), state['target']['state'], x, train=train,
                        rng=drop(k_k)), x_k, k_shuffle)
    k_BD = jax.lax.stop_gradient(k_BD)
    loss, metrics = contrastive_losses.info_nce(q_BD, k_BD, args.temperature,
                                                negatives_ND=state['queue'])
    metrics = {'loss': loss, **metrics}
    if not train:
      return loss, (metrics, state)
    queue, ptr = enqueue(state['queue'], state['queue_ptr'], k_BD)
    return loss, (metrics, {'online': online_state, 'synced': state['synced'],
                            'target': {'params': target, 'state': target_state},
                            'queue': queue, 'queue_ptr': ptr})

  def after_step(params, state, step):
    del step  # MoCo's m is constant
    target = momentum.ema(state['target']['params'], params, args.momentum)
    return {**state, 'target': {**state['target'], 'params': target},
            'synced': jnp.asarray(True)}

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['encoder'], state['online']['encoder'], images_BXYC,
                             train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn, after_step=after_step,
              sample=ssl_monitor.make_monitor(config, features, n_bank=config.sample.n_bank,
                                              n_query=config.sample.n_query), features=features)
