"""DINO: self-distillation with no labels (Caron, Touvron, Misra, Jegou, Mairal, Bojanowski &
Joulin 2021, "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294).

A student g_s and a teacher g_t of the same architecture (encoder + DINO head) see crops of one
image; the student learns to match the teacher's sharpened, centred distribution (Algorithm 1):
  P_s(x) = softmax(g_s(x) / tau_s)                                          (eq. 1)
  P_t(x) = softmax((g_t(x) - c) / tau_t)            (centring and sharpening, sec. 3.1)
  L = mean over pairs (x in global crops, x' in all crops, x' != x) of H(P_t(x), P_s(x')),
  H(a, b) = -sum_j a_j log b_j, averaged over the batch                      (eqs. 2-3)
Eq. 3 writes a sum over the pairs; Algorithm 1 and the authors' code divide it by the number of
pairs, as here. The teacher gets no gradient: it lives in the STATE and follows the student by
  theta_t <- lam theta_t + (1 - lam) theta_s,  lam cosine from 0.996 to 1   (sec. 3.1)
in after_step (lab.objectives.momentum; the update after optimizer step k uses lam at k - 1,
as the code's per-iteration schedule does). The teacher starts as a copy of the student: until
the first after_step the loss uses the student's parameters as the teacher's (stop-gradient),
and returns that copy in the state. The centre follows the teacher outputs of the batch,
  c <- m c + (1 - m) mean_b g_t(x_b),  m = 0.9                               (eq. 4)
updated in loss_fn's returned state after the loss used the old centre (Algorithm 1 order; with
train.grad_accum > 1 it moves once per micro-batch). tau_t is 0.04, optionally warmed up
linearly from warmup_teacher_temp over warmup_teacher_temp_steps (the paper's 0.04 -> 0.07);
tau_s = 0.1.

DINO head (sec. 3.1, appendix; the code's DINOHead without BN): a 3-layer MLP with GELU (hidden
2048, bottleneck 256 at paper scale; lab.nn.mlp_head), an L2 normalisation, and a
weight-normalised linear layer without bias (Salimans & Kingma 2016, arXiv:1602.07868)
w_j = g v_j / ||v_j|| with g fixed to 1, computed in the forward from the direction v_RJ.

Crops (augment.dino_multicrop): 2 global crops at the image size, n_local local crops at
local_size (0: the paper's 96/224 of the image size, rounded to a multiple of the ViT patch).
Batch norm (ResNet encoders) follows the code's MultiCropWrapper: the student runs its global
crops as one 2B batch and its local crops as one n_local B batch (statistics per resolution);
the teacher, built without stochastic layers as in the code, runs its 2B global crops with batch
statistics in training and keeps its own running statistics in the state. The k-NN monitor and
`features` use the teacher encoder in eval mode (the paper evaluates the teacher, sec. 5.1).

Letters beyond DESIGN.md's: G global crops, A all crops (G + n_local), L local crops, R the
head's bottleneck width, J the head's output dimension (the paper's K).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy.special import entr

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.nn import param_spec as ps
from lab.objectives import momentum
from lab.objectives.contrastive_losses import l2_normalize
from lab.train.task import Task

LOCAL_TO_GLOBAL = 96 / 224  # the paper's local / global crop sizes
STOCHASTIC = ('dropout', 'drop_path', 'drop_connect_rate')  # absent from the teacher (code)
FIELDS = ('out_dim', 'head_hidden', 'head_bottleneck', 'n_local', 'local_size', 'global_scale',
          'local_scale', 'student_temp', 'teacher_temp', 'warmup_teacher_temp',
          'warmup_teacher_temp_steps', 'momentum_base', 'center_momentum')


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def experiment_defaults(method: str) -> dict:
  """The paper's recipe at MNIST scale and a shared 2-core CPU: head 512 / 256 -> 4096 outputs
  (paper 2048 / 256 -> 65536 for 384-wide ViT-S features), 2 local crops (the paper's
  multi-crop ablation runs 2 x 224 + 2 x 96; code default 8), AdamW with weight decay 0.04 (the
  start of the paper's 0.04 -> 0.4 cosine), gradient clipping at 3.0 (the code), lr
  5e-4 B / 256 (implementation details)."""
  del method
  return {'objective_args': dict(
              out_dim=4096, head_hidden=512, head_bottleneck=256, n_local=2, local_size=0,
              global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), student_temp=0.1,
              teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=0,
              momentum_base=0.996, center_momentum=0.9),
          'train': dict(optimizer='adamw', lr=5e-4 * 128 / 256, min_lr=1e-6, weight_decay=0.04,
                        clip_norm=3.0)}


def head_layers(args) -> tuple[mlp_head.Layer, ...]:
  """The DINO MLP: Linear-GELU, Linear-GELU, Linear to the bottleneck (no BN, as the code)."""
  return mlp_head.layers((args.head_hidden, args.head_hidden, args.head_bottleneck),
                         bn_hidden=False, act='gelu')


def local_size(config, image_size: int) -> int:
  """objective_args.local_size, or (when 0) round(image_size 96 / 224) to a multiple of the ViT
  patch size (1 for convolutional encoders), at least one multiple."""
  if config.objective_args.local_size:
    return config.objective_args.local_size
  multiple = config.model.patch_size if config.model.name == 'vit' else 1
  return max(multiple, multiple * round(image_size * LOCAL_TO_GLOBAL / multiple))


def validate(config) -> None:
  """One-line ConfigErrors for the DINO fields and the encoder, before any device work."""
  args = config.objective_args
  missing = [k for k in FIELDS if k not in args]
  require(not missing, f'objective_args lacks {missing}; DINO needs {list(FIELDS)}')
  backbone.validate(config.model)
  for key in ('out_dim', 'head_hidden', 'head_bottleneck'):
    require(args[key] >= 1, f'objective_args.{key}={args[key]}; expected a positive integer')
  require(args.n_local >= 0, f'objective_args.n_local={args.n_local}; expected >= 0')
  require(args.local_size >= 0, f'objective_args.local_size={args.local_size}; expected 0 '
          '(derived from the image size) or a positive size')
  if config.model.name == 'vit':
    size, p = local_size(config, config.model.image_size), config.model.patch_size
    require(size % p == 0, f'objective_args.local_size={size}; expected a multiple of '
            f'model.patch_size={p}')
  for key in ('global_scale', 'local_scale'):
    scale = tuple(args[key])
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, f'objective_args.{key}={scale}; '
            'expected (lo, hi) with 0 < lo <= hi <= 1')
  for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
    require(args[key] > 0, f'objective_args.{key}={args[key]}; expected > 0')
  require(0 <= args.warmup_teacher_temp_steps <= config.train.steps,
          f'objective_args.warmup_teacher_temp_steps={args.warmup_teacher_temp_steps}; expected '
          f'0 .. train.steps={config.train.steps}')
  require(0.0 <= args.momentum_base <= 1.0,
          f'objective_args.momentum_base={args.momentum_base}; expected a value in [0, 1]')
  require(0.0 <= args.center_momentum < 1.0,
          f'objective_args.center_momentum={args.center_momentum}; expected a value in [0, 1)')


def head_specs(d_in: int, args) -> dict:
  """ParamSpecs of the DINO head: mlp (lab.nn.mlp_head) and the direction v_RJ of the
  weight-normalised last layer (LeCun normal; its scale is divided out in the forward)."""
  R, J = args.head_bottleneck, args.out_dim
  return {'mlp': mlp_head.head_specs(d_in, head_layers(args)),
          'last': ps.ParamSpec((R, J), ps.normal(1.0 / math.sqrt(R)), ('embed', 'vocab'))}


def head(p: dict, args, z_BD: jax.Array) -> jax.Array:
  """logits_BJ = normalize(MLP(z)) (v / ||v||) of the DINO head (module docstring): the
  bottleneck is L2-normalised, each output column of v has unit norm (weight norm, g = 1)."""
  layers = head_layers(args)
  y_BR, _ = mlp_head.head(p['mlp'], mlp_head.init_head_state(layers), layers, z_BD, train=False)
  w_RJ = l2_normalize(_at_least_f32(p['last']).T).T
  return jnp.einsum('BR,RJ->BJ', l2_normalize(y_BR), w_RJ)


def teacher_probs(t_BJ: jax.Array, center_J: jax.Array, temp) -> jax.Array:
  """P_t = softmax((g_t(x) - c) / tau_t) over J (float32 at least): centring and sharpening
  (sec. 3.1)."""
  return jax.nn.softmax((_at_least_f32(t_BJ) - center_J) / temp, axis=-1)


def dino_loss(t_GBJ: jax.Array, s_ABJ: jax.Array, center_J: jax.Array, teacher_temp,
              student_temp) -> jax.Array:
  """mean over pairs (i < G, v < A, v != i) of mean_b H(P_t(x_i), P_s(x_v)) (eqs. 1-3): the
  teacher's crop i is the student's crop i, so same-view pairs are skipped. No gradient reaches
  the teacher outputs t_GBJ."""
  G, A = t_GBJ.shape[0], s_ABJ.shape[0]
  if G < 1 or A < 2 or G > A or t_GBJ.shape[1:] != s_ABJ.shape[1:]:
    raise ValueError(f'teacher outputs {t_GBJ.shape} and student outputs {s_ABJ.shape}; expected '
                     '[G, B, J] and [A, B, J] with 1 <= G <= A, A >= 2')
  p_GBJ = jax.lax.stop_gradient(teacher_probs(t_GBJ, center_J, teacher_temp))
  logp_ABJ = jax.nn.log_softmax(_at_least_f32(s_ABJ) / student_temp, axis=-1)
  h_GA = -jnp.einsum('GBJ,ABJ->GA', p_GBJ, logp_ABJ) / t_GBJ.shape[1]
  pairs_GA = 1.0 - jnp.eye(G, A)
  return (h_GA * pairs_GA).sum() / pairs_GA.sum()


def update_center(center_J: jax.Array, t_GBJ: jax.Array, m) -> jax.Array:
  """c <- m c + (1 - m) mean over the G B teacher outputs (eq. 4), without gradient."""
  batch_J = jax.lax.stop_gradient(_at_least_f32(t_GBJ)).mean(axis=(0, 1))
  return m * center_J + (1.0 - m) * batch_J


def teacher_temperature(args, step) -> jax.Array:
  """tau_t at step k: linear from warmup_teacher_temp to teacher_temp over the first
  warmup_teacher_temp_steps steps, teacher_temp after (the code's warmup, per step)."""
  n = args.warmup_teacher_temp_steps
  if not n:
    return jnp.float32(args.teacher_temp)
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / n, 1.0)
  return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * frac


def teacher_config(cfg) -> ml_collections.FrozenConfigDict:
  """The encoder config with every stochastic rate (dropout, stochastic depth) set to 0: the
  code builds the teacher without drop path."""
  c = ml_collections.ConfigDict(cfg.to_dict())
  for key in STOCHASTIC:
    if key in c:
      c[key] = 0.0
  return ml_collections.FrozenConfigDict(c)


def teacher_params(params, state):
  """The teacher's parameters, no gradient: the student's until the first after_step (the
  teacher starts as a copy), the state's EMA after."""
  first = state['step'] == 0
  return jax.lax.stop_gradient(jax.tree.map(
      lambda p, t: jnp.where(first, p, t).astype(t.dtype), params, state['teacher']))


def crops(config, images_BXYC: jax.Array, key: jax.Array):
  """(global_GBXYC, local_LBXYC): dino_multicrop of every example (one key per example)."""
  args = config.objective_args
  size = images_BXYC.shape[1]

  def one(k, x_XYC):
    return augment.dino_multicrop(k, x_XYC, size, local_size(config, size), args.n_local,
                                  tuple(args.global_scale), tuple(args.local_scale))

  keys_B = augment.example_keys(key, images_BXYC.shape[0])
  global_BGXYC, local_BLXYC = jax.vmap(one)(keys_B, images_BXYC)
  return jnp.swapaxes(global_BGXYC, 0, 1), jnp.swapaxes(local_BLXYC, 0, 1)


def _flat(x_GB___: jax.Array) -> jax.Array:
  return x_GB___.reshape(-1, *x_GB___.shape[2:])


def features(config, params, state, images_BXYC: jax.Array) -> jax.Array:
  """z_BD: the teacher encoder's pooled features in eval mode (the k-NN monitor's encoder)."""
  teacher = teacher_params(params, state)
  z_BD, _ = backbone.features(config.model, teacher['encoder'], state['teacher_state'],
                              images_BXYC, train=False)
  return z_BD


def make_task(config, data) -> Task:
  del data
  cfg, args = config.model, config.objective_args
  t_cfg = teacher_config(cfg)
  specs = {'encoder': backbone.param_specs(cfg),
           'head': head_specs(backbone.feature_dim(cfg), args)}

  def init_state(key):
    del key  # the teacher is the student's copy until the first after_step (teacher_params)
    return {'student': backbone.init_state(cfg),
            'teacher': jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), specs,
                                    is_leaf=ps.is_spec),
            'teacher_state': backbone.init_state(cfg),
            'center': jnp.zeros((args.out_dim,), jnp.float32),
            'step': jnp.zeros((), jnp.int32)}

  def loss_fn(params, state, batch, rng, train):
    if train and rng is None:
      raise ValueError('dino loss_fn with train=True needs an rng for the crops')
    key = rng if train else jax.random.key(0)  # fixed crops in eval: comparable losses
    crop_key, global_key, local_key = jax.random.split(key, 3)
    global_GBXYC, local_LBXYC = crops(config, batch['image'], crop_key)
    G, B = global_GBXYC.shape[:2]
    z_GD, student = backbone.features(cfg, params['encoder'], state['student'],
                                      _flat(global_GBXYC), train=train, rng=global_key)
    z_AD = z_GD
    if args.n_local:
      z_LD, student = backbone.features(cfg, params['encoder'], student, _flat(local_LBXYC),
                                        train=train, rng=local_key)
      z_AD = jnp.concatenate([z_GD, z_LD])
    s_ABJ = head(params['head'], args, z_AD).reshape(-1, B, args.out_dim)
    teacher = teacher_params(params, state)
    y_GD, teacher_state = backbone.features(t_cfg, teacher['encoder'], state['teacher_state'],
                                            _flat(global_GBXYC), train=train)
    t_GBJ = head(teacher['head'], args, y_GD).reshape(G, B, args.out_dim)
    tau_t = teacher_temperature(args, state['step'])
    loss = dino_loss(t_GBJ, s_ABJ, state['center'], tau_t, args.student_temp)
    p_GBJ = teacher_probs(t_GBJ, state['center'], tau_t)
    entropy = entr(p_GBJ).sum(-1).mean()  # h(P_t): loss = h(P_t) + KL
    metrics = {'loss': loss, 'teacher_entropy': entropy, 'kl': loss - entropy,
               'teacher_temp': tau_t}
    if not train:
      return loss, (metrics, state)
    new_state = dict(state, student=student, teacher=teacher, teacher_state=teacher_state,
                     center=update_center(state['center'], t_GBJ, args.center_momentum))
    return loss, (metrics, new_state)

  def after_step(params, state, step):
    lam = momentum.cosine_momentum(args.momentum_base, step - 1, config.train.steps)
    return dict(state, teacher=momentum.ema(state['teacher'], params, lam),
                step=jnp.asarray(step, jnp.int32))

  encode = lambda params, state, x_BXYC: features(config, params, state, x_BXYC)
  monitor = ssl_monitor.make_monitor(config, encode, n_bank=config.sample.n_bank,
                                     n_query=config.sample.n_query)
  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn, sample=monitor,
              after_step=after_step, features=encode)
