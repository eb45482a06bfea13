"""SwAV: swapped prediction of online cluster codes (Caron, Misra, Mairal, Goyal, Bojanowski &
Joulin 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
arXiv:2006.09882).

Every crop x_v of an image goes through the encoder f and a projection head g (Linear-BN-ReLU-
Linear, sec. 4 / appendix A.1) and is L2-normalised: z_v = g(f(x_v)) / ||g(f(x_v))||. Its scores
against K prototypes c_k (the rows of a bias-free linear layer, L2-normalised) are s_vk = z_v . c_k.
The code q of each global crop is computed online from the batch by Sinkhorn-Knopp (eqs. 4-6,
lab.objectives.sinkhorn: eps = 0.05, 3 iterations, equal partition, no gradient), and every other
crop predicts it (the swapped prediction, eqs. 1-3 and multi-crop, sec. 3.2):
  l(z, q) = -sum_k q_k log p_k,   p_k = exp(z . c_k / tau) / sum_k' exp(z . c_k' / tau),  tau = 0.1,
  L = 1/2 sum_{i in {1, 2}} 1/(V - 1) sum_{v != i} l(z_v, q_i),
averaged over the batch, V = 2 + n_local crops, codes only from the two global crops (the
normalisation by the number of terms is the authors' code's).
Multi-crop (sec. 3.2): 2 global crops at the image size with scale (0.14, 1) and n_local small
crops at 96/224 of it with scale (0.05, 0.14) (the paper's main recipe has 6; its multi-crop
ablation's 2 x 160 + 4 x 96 has 4, our default, which keeps the CPU cost at about 1.4 times a
two-view method's), each with flip, colour distortion (jitter 0.8,
0.8, 0.8, 0.2 with p = 0.8, grayscale p = 0.2) and Gaussian blur p = 0.5 (the authors' code;
grey images get brightness/contrast jitter only, see lab.data.augment).
Batch norm: crops of one size go through the encoder together as one batch (the 2 global crops
as a 2B batch, the small ones as an n_local B batch), and the projection head sees all crops as
one batch, as the authors' code does.
Prototypes: the paper normalises the prototype parameter after every step. Task.after_step
returns only the state, so here the forward uses c_k = w_k / ||w_k|| of the raw parameter w. With
||w_k|| = 1, a step on w followed by renormalisation equals (to first order) the step along the
gradient of the normalised form, (I - c c^T) g / ||w_k||; the difference is that ||w_k|| drifts
here (it changes the effective step size) and the optimizer sees the tangential gradient. The
prototypes are frozen (no gradient) for the first freeze_prototypes_steps steps (the paper freezes
them for the first epoch); the step count is state.
Not implemented: the feature queue the paper adds for batches of 256 and fewer; with K = 30
prototypes and a batch of 128 each prototype gets about 4 examples per batch without it.
Letters: V crops, G global crops (2), L small crops, K prototypes, N = V B projections.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import collapse, ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.nn import param_spec as ps
from lab.objectives import sinkhorn
from lab.objectives.contrastive_losses import l2_normalize
from lab.train.task import Task

LOCAL_FRACTION = 96 / 224  # the paper's small-crop side relative to its 224-pixel global crops
N_GLOBAL = 2


def experiment_defaults(method: str) -> dict:
  """The paper's loss constants; head widths and K scaled to MNIST and a width-16 ResNet (the
  paper: 2048-2048-128 and K = 3000 for 1000 classes, here 512-64 and K = 30, the same 3 : 1
  ratio of prototypes to classes); AdamW instead of the paper's LARS (the shared default)."""
  del method
  return {'objective_args': dict(proj_hidden=512, proj_dim=64, n_prototypes=30, temperature=0.1,
                                 epsilon=0.05, sinkhorn_iters=3, n_local=4,
                                 global_scale=(0.14, 1.0), local_scale=(0.05, 0.14),
                                 freeze_prototypes_steps=50)}


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'swav', f'objective_args.method={a.method!r}; expected "swav"')
  for key in ('proj_hidden', 'proj_dim', 'n_prototypes', 'sinkhorn_iters'):
    require(a[key] >= 1, f'objective_args.{key}={a[key]}; expected a positive integer')
  for key in ('temperature', 'epsilon'):
    require(a[key] > 0, f'objective_args.{key}={a[key]}; expected > 0')
  require(a.n_local >= 0, f'objective_args.n_local={a.n_local}; expected a count >= 0')
  require(a.freeze_prototypes_steps >= 0,
          f'objective_args.freeze_prototypes_steps={a.freeze_prototypes_steps}; expected >= 0')
  for key in ('global_scale', 'local_scale'):
    lo_hi = tuple(a[key])
    require(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            f'objective_args.{key}={lo_hi}; expected (lo, hi) with 0 < lo <= hi <= 1')
  backbone.validate(config.model)


def local_size(cfg, size: int) -> int:
  """The side of the small crops: round(96/224 size), for a ViT a multiple of its patch size (at
  least one patch)."""
  unit = cfg.patch_size if cfg.name == 'vit' else 1
  return unit * max(1, round(size * LOCAL_FRACTION / unit))


def crop_specs(size: int, small: int, global_scale, local_scale):
  """(global, small) ViewSpecs of SwAV's multi-crop (module docstring)."""
  common = dict(jitter=(0.8, 0.8, 0.8, 0.2), p_jitter=0.8, p_gray=0.2, p_blur=0.5)
  return (augment.ViewSpec(size, tuple(global_scale), **common),
          augment.ViewSpec(small, tuple(local_scale), **common))


def multicrop(specs, n_local: int, key: jax.Array, x_BXYC: jax.Array):
  """(global_GBXYC, local_LBxyC): 2 global and n_local small crops of every image, crop-major;
  example b's crops depend only on fold_in(key, b)."""
  global_spec, local_spec = specs

  def crops(k, x_XYC):
    keys = jax.random.split(k, N_GLOBAL + n_local)
    views = lambda spec, ks: jax.vmap(lambda kv: augment.view(spec, kv, x_XYC))(ks)
    return views(global_spec, keys[:N_GLOBAL]), views(local_spec, keys[N_GLOBAL:])

  g_BGXYC, l_BLXYC = jax.vmap(crops)(augment.example_keys(key, x_BXYC.shape[0]), x_BXYC)
  return jnp.swapaxes(g_BGXYC, 0, 1), jnp.swapaxes(l_BLXYC, 0, 1)


def prototype_specs(d: int, k: int) -> ps.ParamSpec:
  """w_KD, one prototype per row (a bias-free Linear(D, K)), rows of expected norm 1."""
  return ps.ParamSpec((k, d), ps.normal(d ** -0.5), ('vocab', 'embed'))


def prototypes(w_KD: jax.Array, frozen) -> jax.Array:
  """c_KD = w_k / ||w_k|| per row; no gradient reaches w while `frozen` (a traced bool)."""
  w_KD = jnp.where(frozen, jax.lax.stop_gradient(w_KD), w_KD)
  return l2_normalize(w_KD)


def swapped_prediction_loss(scores_VBK: jax.Array, codes_GBK: jax.Array, temperature) -> jax.Array:
  """L = 1/G sum_i 1/(V - 1) sum_{v != i} 1/B sum_b l(z_vb, q_ib) with
  l(z, q) = -sum_k q_k log softmax(s / tau)_k (eqs. 1-3, multi-crop of sec. 3.2): crops
  i = 0 .. G - 1 of scores_VBK are the ones whose codes codes_GBK are given. In at least
  float32; no gradient reaches the codes."""
  V, B, _ = scores_VBK.shape
  G = codes_GBK.shape[0]
  if codes_GBK.shape[1:] != scores_VBK.shape[1:] or not 1 <= G <= V or V < 2:
    raise ValueError(f'swapped_prediction_loss: scores {scores_VBK.shape} and codes '
                     f'{codes_GBK.shape}; expected [V, B, K] and [G, B, K], 1 <= G <= V, V >= 2')
  dtype = jnp.promote_types(scores_VBK.dtype, jnp.float32)
  logp_VBK = jax.nn.log_softmax(scores_VBK.astype(dtype) / temperature, axis=-1)
  ce_GV = -jnp.einsum('GBK,VBK->GV', jax.lax.stop_gradient(codes_GBK), logp_VBK) / B
  other_GV = 1.0 - jnp.eye(G, V)
  return jnp.sum(ce_GV * other_GV) / (G * (V - 1))


def make_task(config, data) -> Task:
  del data
  cfg, a = config.model, config.objective_args
  head = mlp_head.layers((a.proj_hidden, a.proj_dim), bn_hidden=True)
  specs = {'encoder': backbone.param_specs(cfg),
           'projector': mlp_head.head_specs(backbone.feature_dim(cfg), head),
           'prototypes': prototype_specs(a.proj_dim, a.n_prototypes)}

  def init_state(key):
    del key
    return {'encoder': backbone.init_state(cfg), 'projector': mlp_head.init_head_state(head),
            'step': jnp.zeros((), jnp.int32)}

  def project(params, state, groups, train, rng):
    """(z_ND, new_state): each group of same-size crops is one encoder batch, the projector
    sees them all as one batch; z is L2-normalised."""
    feats, enc_state = [], state['encoder']
    for i, x_NXYC in enumerate(groups):
      key = None if rng is None else jax.random.fold_in(rng, i)
      f_ND, enc_state = backbone.features(cfg, params['encoder'], enc_state, x_NXYC,
                                          train=train, rng=key)
      feats.append(f_ND)
    h_ND, head_state = mlp_head.head(params['projector'], state['projector'], head,
                                     jnp.concatenate(feats), train=train)
    return l2_normalize(h_ND), {'encoder': enc_state, 'projector': head_state}

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    B, size = x_BXYC.shape[0], x_BXYC.shape[1]
    views = crop_specs(size, local_size(cfg, size), a.global_scale, a.local_scale)
    key = jax.random.key(0) if rng is None else jax.random.fold_in(rng, 0)
    g_GBXYC, l_LBXYC = multicrop(views, a.n_local, key, x_BXYC)
    groups = [g_GBXYC.reshape(-1, *g_GBXYC.shape[2:])]
    if a.n_local:
      groups.append(l_LBXYC.reshape(-1, *l_LBXYC.shape[2:]))
    z_ND, new_state = project(params, state, groups, train,
                              None if rng is None else jax.random.fold_in(rng, 1))
    c_KD = prototypes(params['prototypes'], state['step'] < a.freeze_prototypes_steps)
    scores_VBK = jnp.einsum('VBD,KD->VBK', z_ND.reshape(-1, B, z_ND.shape[-1]), c_KD)
    codes_GBK = jnp.stack([sinkhorn.codes(scores_VBK[i], a.epsilon, a.sinkhorn_iters)
                           for i in range(N_GLOBAL)])
    loss = swapped_prediction_loss(scores_VBK, codes_GBK, a.temperature)
    used_K = jnp.zeros(a.n_prototypes).at[jnp.argmax(codes_GBK[0], -1)].set(1.0)
    metrics = {'loss': loss, 'prototypes_used': used_K.mean(),
               'z_std': collapse.normalized_std(jax.lax.stop_gradient(z_ND[:B]))}
    return loss, (metrics, {**new_state, 'step': state['step']})

  def after_step(params, state, step):
    del params
    return {**state, 'step': jnp.asarray(step, jnp.int32)}

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['encoder'], state['encoder'], images_BXYC,
                             train=False)[0]

  return Task(param_specs=specs, init_state=init_state, loss_fn=loss_fn, after_step=after_step,
              sample=ssl_monitor.make_monitor(config, features, config.sample.n_bank,
                                              config.sample.n_query), features=features)
