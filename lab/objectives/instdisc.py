"""Instance Discrimination (InstDisc): Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination", arXiv:1805.01978.

Every training image i is its own class. The network embeds an augmented view of x_i as
f_i = normalize(W h(x_i) + b) (encoder h, a linear layer to 128 dims, sec. 3.1), and a memory
bank V = {v_j} in the state holds one unit vector per training example. The non-parametric
softmax (eq. 2) P(i | f) = exp(v_i . f / tau) / sum_j exp(v_j . f / tau) is trained by
noise-contrastive estimation (sec. 3.2) with m noise indices from P_n = 1/n:
  P(i | f) = exp(v_i . f / tau) / Z                                               (eq. 4)
  h(i, f)  = P(i | f) / (P(i | f) + m P_n(i))                                      (eq. 5)
  J_NCE    = -E_{P_d}[log h(i, f)] - m E_{P_n}[log(1 - h(j, f))]                   (eq. 6)
  Z        ~ n E_j[exp(v_j . f / tau)] ~ (n / m) sum_k exp(v_{j_k} . f / tau)       (eq. 7)
Z is treated as a constant (no gradient). With objective_args.z_estimate='first_batch' (the
default: the paper's "approximation derived from initial batches", as the authors' code) it is
estimated once, from the noise scores of the first training batch, and kept in the state;
'every_step' re-estimates it by eq. 7 on every batch, which keeps P(i | f) normalised once the
bank holds trained features (with a first-batch Z, estimated on the random bank, the loss rises
as features of same-class images become similar, most visibly on 10-class digits). The bank is
written with the batch's features after they are scored, mixed with momentum 0.5 as in the authors'
code: v_i <- normalize(0.5 v_i + 0.5 f_i) (sec. 3.1's plain v_i <- f_i is momentum 0); the
proximal term of sec. 3.3 is not used. The bank starts as the authors' code sets it: entries
uniform on [-sqrt(3 / d), sqrt(3 / d)], so that E ||v||^2 = 1.

Choices at this scale, stated: the m noise indices are drawn once per step and shared by the
batch (each example still sees m i.i.d. uniform indices, so the estimator of eq. 6 is the same
in expectation; the authors draw m per example); m = 4096 as the paper; tau = 0.07. Views are
the authors' augmentation (random resized crop with scale (0.2, 1), flip, colour jitter 0.4 with
p = 1, random grayscale p = 0.2; on grey digits the jitter is brightness and contrast only).
Eval batches (test images, which have no bank row) score their own feature as the positive.
The k-NN monitor reads the encoder's pooled features h (eval mode).

Letters beyond lab's: N the bank rows (the paper's n training examples), M the noise samples
(the paper's m).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.data import images as images_lib
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives.contrastive_losses import l2_normalize
from lab.train.task import Task

EVAL_KEY = 0  # the fixed augmentation key when the loop passes no rng
Z_ESTIMATES = ('first_batch', 'every_step')


def experiment_defaults(method: str) -> dict:
  """The paper's objective: 128-d embedding, tau = 0.07, m = 4096, bank momentum 0.5, Z from the
  first batch. Training keeps the shared AdamW: the paper's SGD (lr 0.03, momentum 0.9) is the
  optimizer of its time, not part of the method, and trains far slower in 600 steps."""
  del method
  return {'objective_args': dict(embed_dim=128, temperature=0.07, noise_samples=4096,
                                 bank_momentum=0.5, z_estimate='first_batch')}


def view_spec(size: int) -> augment.ViewSpec:
  """The authors' training view: crop scale (0.2, 1), flip, jitter 0.4 (p = 1), grayscale 0.2."""
  return augment.ViewSpec(size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0,
                          p_gray=0.2)


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'instdisc', f'objective_args.method={a.method!r}; expected "instdisc"')
  require(a.embed_dim > 0, f'objective_args.embed_dim={a.embed_dim}; expected a positive integer')
  require(a.temperature > 0, f'objective_args.temperature={a.temperature}; expected > 0')
  require(a.noise_samples > 0,
          f'objective_args.noise_samples={a.noise_samples}; expected a positive integer')
  require(0.0 <= a.bank_momentum < 1.0,
          f'objective_args.bank_momentum={a.bank_momentum}; expected a value in [0, 1)')
  require(a.z_estimate in Z_ESTIMATES,
          f'objective_args.z_estimate={a.z_estimate!r}; expected one of {Z_ESTIMATES}')
  backbone.validate(config.model)


def init_bank(key: jax.Array, n: int, d: int) -> jax.Array:
  """bank_ND uniform on [-sqrt(3 / d), sqrt(3 / d)] (E ||v||^2 = 1), the authors' init."""
  bound = math.sqrt(3.0 / d)
  return jax.random.uniform(key, (n, d), jnp.float32, -bound, bound)


def estimate_z(f_BD: jax.Array, noise_MD: jax.Array, temperature, n: int) -> jax.Array:
  """Eq. 7: Z = n mean_{b, k} exp(v_{j_k} . f_b / tau), the Monte-Carlo estimate of the
  normaliser over the batch and its noise samples (no gradient)."""
  scores_BM = jnp.einsum('BD,MD->BM', f_BD, noise_MD) / temperature
  return jax.lax.stop_gradient(n * jnp.mean(jnp.exp(scores_BM)))


def nce_loss(f_BD: jax.Array, positive_BD: jax.Array, noise_MD: jax.Array, temperature, z,
             n: int):
  """J_NCE of eq. 6 with P(i | f) = exp(v_i . f / tau) / Z (eq. 4) and h of eq. 5, averaged over
  the batch: L = -1/B sum_b [log h(i_b, f_b) + sum_k log(1 - h(j_k, f_b))], with
  log h = log P - log(P + m / n) and log(1 - h) = log(m / n) - log(P + m / n) in log space.
  positive_BD holds each example's bank row v_i, noise_MD the m noise rows v_{j_k}.
  Returns (L, {'positive_h': mean h(i_b, f_b), 'noise_h': mean h(j_k, f_b)})."""
  if f_BD.shape != positive_BD.shape or noise_MD.shape[1:] != f_BD.shape[1:]:
    raise ValueError(f'nce_loss: f {f_BD.shape}, positives {positive_BD.shape}, noise '
                     f'{noise_MD.shape}; expected [B, D], [B, D], [M, D]')
  log_noise = math.log(noise_MD.shape[0] / n)  # log m P_n(i)
  log_z = jnp.log(z)
  log_p_pos_B = jnp.einsum('BD,BD->B', f_BD, positive_BD) / temperature - log_z
  log_p_noise_BM = jnp.einsum('BD,MD->BM', f_BD, noise_MD) / temperature - log_z
  log_h_pos_B = log_p_pos_B - jnp.logaddexp(log_p_pos_B, log_noise)
  log_1mh_noise_BM = log_noise - jnp.logaddexp(log_p_noise_BM, log_noise)
  loss = -jnp.mean(log_h_pos_B + log_1mh_noise_BM.sum(-1))
  return loss, {'positive_h': jnp.mean(jnp.exp(log_h_pos_B)),
                'noise_h': 1.0 - jnp.mean(jnp.exp(log_1mh_noise_BM))}


def update_bank(bank_ND: jax.Array, index_B: jax.Array, f_BD: jax.Array, momentum) -> jax.Array:
  """v_i <- normalize(momentum v_i + (1 - momentum) f_i) at the rows index_B (no gradient)."""
  mixed_BD = momentum * bank_ND[index_B] + (1.0 - momentum) * jax.lax.stop_gradient(f_BD)
  return bank_ND.at[index_B].set(l2_normalize(mixed_BD).astype(bank_ND.dtype))


def make_task(config, data) -> Task:
  del data  # batches carry 'index', the row of the bank (lab.data.images)
  a, cfg = config.objective_args, config.model
  n = images_lib.train_size(config.data.source, config.data.data_dir)
  head = mlp_head.layers((a.embed_dim,), bn_hidden=False)

  def embed(params, state, x_BXYC, train, rng):
    h_BD, enc_state = backbone.features(cfg, params['encoder'], state['encoder'], x_BXYC,
                                        train=train, rng=rng)
    f_BD, _ = mlp_head.head(params['head'], state['head'], head, h_BD, train=train)
    return l2_normalize(f_BD), enc_state

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    B, spec = x_BXYC.shape[0], view_spec(x_BXYC.shape[1])
    key = rng if rng is not None else jax.random.key(EVAL_KEY)
    k_view, k_noise, k_enc = jax.random.split(key, 3)
    views = jax.vmap(lambda k, x: augment.view(spec, k, x))(
        augment.example_keys(k_view, B), x_BXYC)
    f_BD, enc_state = embed(params, state, views, train, k_enc)
    noise_MD = state['bank'][jax.random.randint(k_noise, (a.noise_samples,), 0, n)]
    z = estimate_z(f_BD, noise_MD, a.temperature, n)
    if a.z_estimate == 'first_batch':
      z = jnp.where(state['z'] > 0, state['z'], z)  # 0: not estimated yet
    positive_BD = state['bank'][batch['index']] if train else jax.lax.stop_gradient(f_BD)
    loss, metrics = nce_loss(f_BD, positive_BD, noise_MD, a.temperature, z, n)
    if not train:
      return loss, (dict(metrics, loss=loss), state)
    new_state = dict(state, encoder=enc_state, z=z,
                     bank=update_bank(state['bank'], batch['index'], f_BD, a.bank_momentum))
    return loss, (dict(metrics, loss=loss, log_z=jnp.log(z)), new_state)

  def init_state(key):
    return {'encoder': backbone.init_state(cfg), 'head': mlp_head.init_head_state(head),
            'bank': init_bank(key, n, a.embed_dim), 'z': jnp.zeros((), jnp.float32)}

  def features(params, state, x_BXYC):
    return backbone.features(cfg, params['encoder'], state['encoder'], x_BXYC, train=False)[0]

  specs = {'encoder': backbone.param_specs(cfg),
           'head': mlp_head.head_specs(backbone.feature_dim(cfg), head)}
  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn,
              sample=ssl_monitor.make_monitor(config, features, **config.sample), features=features)
