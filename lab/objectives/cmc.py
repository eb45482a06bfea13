"""Contrastive Multiview Coding (CMC): Tian, Krishnan & Isola 2019, "Contrastive Multiview
Coding", arXiv:1906.05849.

Two views V1, V2 of one image go through two SEPARATE encoders (each the backbone of
config.model, with its own batch norm) and linear heads to L2-normalised 128-d embeddings
z^1 = normalize(W_1 f_1(v^1)), z^2 = normalize(W_2 f_2(v^2)) (sec. 3.2: the critic
h(v^1, v^2) = exp(z^1 . z^2 / tau)). The two-view objective (eqs. 2-3, and the full graph of sec.
3.3 for M = 2 views) is symmetric,
  L(V1, V2) = L_contrast^{V1,V2} + L_contrast^{V2,V1},
  L_contrast^{V1,V2} = -E_i log [h(v^1_i, v^2_i) / sum_j h(v^1_i, v^2_j)],
an anchor of view 1 picking its own view 2 among the k + 1 candidates v^2_j. The candidates here
are the batch's other view-2 embeddings (in-batch InfoNCE, lab.objectives.contrastive_losses,
k = B - 1), the exact softmax form of eq. 2; the paper approximates the same loss with a memory
bank of k = 16384 entries and NCE or a softmax over it (sec. 3.4). In-batch candidates are chosen
on purpose: 600 steps are 1.3 epochs of MNIST, so a memory bank would hold its random
initialisation for most of training.

The views, stated and justified. The paper splits a Lab image into L (luminance) and ab
(colour): two channel groups of the same pixels that share the scene's content but little
low-level signal. Digits have one channel, so the split is spatial: V1 = the top half and V2 =
the bottom half of the (augmented) image. Neither half is a function of the other (unlike an
image and its Sobel map, which an encoder can match by its edges); what they share is the
digit's identity and writing style (slant, stroke width), the information CMC means to keep.
Both halves come from one augmentation of the image (the paper crops and flips the RGB image
once, then converts it to Lab): random resized crop with scale (0.2, 1) and a flip, CMC's
ImageNet recipe (no colour jitter: the paper's L / ab split has none).
The k-NN monitor reads the concatenation [f_1(top); f_2(bottom)] of both encoders' pooled
features of the un-augmented image (the paper evaluates the concatenated L and ab features).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import backbone
from lab.nn import mlp_head
from lab.objectives.contrastive_losses import info_nce, l2_normalize
from lab.train.task import Task

CONV_ENCODERS = ('resnet', 'efficientnet')  # encoders that take the non-square halves
VIEWS = ('top', 'bottom')


def experiment_defaults(method: str) -> dict:
  """128-d embeddings and tau = 0.07 (sec. 4); the shared AdamW (the paper's SGD, lr 0.03, is the
  optimizer of its memory-bank setup)."""
  del method
  return {'objective_args': dict(embed_dim=128, temperature=0.07)}


def validate(config) -> None:
  a = config.objective_args
  require(a.method == 'cmc', f'objective_args.method={a.method!r}; expected "cmc"')
  require(a.embed_dim > 0, f'objective_args.embed_dim={a.embed_dim}; expected a positive integer')
  require(a.temperature > 0, f'objective_args.temperature={a.temperature}; expected > 0')
  require(config.model.name in CONV_ENCODERS, f'model.name={config.model.name!r}; CMC encodes '
          f'half images, expected a convolutional encoder, one of {CONV_ENCODERS}')
  backbone.validate(config.model)


def view_spec(size: int) -> augment.ViewSpec:
  """CMC's augmentation of the whole image: crop scale (0.2, 1), flip p = 0.5, nothing else."""
  return augment.ViewSpec(size, scale=(0.2, 1.0), p_jitter=0.0, p_gray=0.0)


def split_views(x_BXYC: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(top_BXYC, bottom_BXYC): rows [0, X // 2) and [X - X // 2, X) (the middle row of an odd X
  belongs to neither)."""
  if x_BXYC.ndim != 4 or x_BXYC.shape[1] < 2:
    raise ValueError(f'split_views: images of shape {x_BXYC.shape}; expected [B, X, Y, C], X >= 2')
  half = x_BXYC.shape[1] // 2
  return x_BXYC[:, :half], x_BXYC[:, x_BXYC.shape[1] - half:]


def cmc_loss(z1_BD: jax.Array, z2_BD: jax.Array, temperature):
  """L(V1, V2) = L^{V1,V2} + L^{V2,V1} (eq. 3), each the in-batch InfoNCE of eq. 2 with
  h = exp(z^1 . z^2 / tau) on L2-normalised embeddings; positives on the diagonal.
  Returns (L, {'accuracy_12', 'accuracy_21'}): how often the anchor's own other view wins."""
  l12, m12 = info_nce(z1_BD, z2_BD, temperature)
  l21, m21 = info_nce(z2_BD, z1_BD, temperature)
  return l12 + l21, {'accuracy_12': m12['accuracy'], 'accuracy_21': m21['accuracy']}


def make_task(config, data) -> Task:
  del data
  a, cfg = config.objective_args, config.model
  head = mlp_head.layers((a.embed_dim,), bn_hidden=False)

  head_state = mlp_head.init_head_state(head)

  def encode(params, state, name, x_BXYC, train, rng):
    """(h_BD, new encoder state) of the view's own encoder."""
    return backbone.features(cfg, params[name]['encoder'], state[name], x_BXYC, train=train,
                             rng=rng)

  def loss_fn(params, state, batch, rng, train):
    x_BXYC = batch['image']
    B, spec = x_BXYC.shape[0], view_spec(x_BXYC.shape[1])
    key = rng if rng is not None else jax.random.key(0)
    k_view, *k_enc = jax.random.split(key, 3)
    views = jax.vmap(lambda k, x: augment.view(spec, k, x))(augment.example_keys(k_view, B),
                                                            x_BXYC)
    z, new_state = {}, {}
    for name, v_BXYC, k in zip(VIEWS, split_views(views), k_enc):
      h_BD, new_state[name] = encode(params, state, name, v_BXYC, train, k)
      f_BD, _ = mlp_head.head(params[name]['head'], head_state, head, h_BD, train=train)
      z[name] = l2_normalize(f_BD)
    loss, metrics = cmc_loss(z['top'], z['bottom'], a.temperature)
    return loss, (dict(metrics, loss=loss), new_state if train else state)

  def features(params, state, x_BXYC):
    return jnp.concatenate([encode(params, state, name, v, False, None)[0]
                            for name, v in zip(VIEWS, split_views(x_BXYC))], axis=-1)

  d = backbone.feature_dim(cfg)
  specs = {name: {'encoder': backbone.param_specs(cfg), 'head': mlp_head.head_specs(d, head)}
           for name in VIEWS}
  return Task(param_specs=specs,
              init_state=lambda key: {name: backbone.init_state(cfg) for name in VIEWS},
              loss_fn=loss_fn, sample=ssl_monitor.make_monitor(config, features, **config.sample),
              features=features)
