"""Supervised image classification: a backbone (lab.models.backbone: resnet, efficientnet or vit)
and a linear classifier on its pooled features, trained with softmax cross-entropy,

  logits_BV = z_BD W_DV + b_V,   L = -1/B sum_b log softmax(logits_b)[y_b]

(the supervised pre-training of ViT, Dosovitskiy et al. 2021, arXiv:2010.11929, sec. 4.1, and of
LiT's locked towers, Zhai et al. 2022, arXiv:2111.07991). The classifier is zero-initialised, as
big_vision's heads, so training starts at the uniform prediction, L = log V.

The classifier belongs to the objective, not to the network: params are {'backbone': the
network's (model.num_classes = 0), 'head': {'w', 'b'}}, and state is the backbone's (batch-norm
statistics; {} for ViT), so another run can take params['backbone'] as a pre-trained tower
(lab.objectives.contrastive's LiT). Batches: lab.data.images' {'image': f32[B, X, Y, C],
'label': i32[B]}. Metrics: loss and accuracy (top-1).

config.objective_args: num_classes (V); experiments/ssl.py adds method='supervised' as the label.
Letters beyond DESIGN.md's: V classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.models import backbone
from lab.nn import param_spec as ps
from lab.train.task import Task


def experiment_defaults(method: str) -> dict:
  """experiments/ssl.py's supervised baseline (method='supervised'): the shared recipe (AdamW,
  warmup-cosine), ten digit classes; the objective's only field is num_classes."""
  require(method == 'supervised', f'objective_args.method={method!r}; expected supervised')
  return {'objective_args': {'num_classes': 10}}


def validate(config) -> None:
  backbone.validate(config.model)
  require(config.objective_args.num_classes >= 2, f'objective_args.num_classes='
          f'{config.objective_args.num_classes}; expected at least 2 classes')
  require(config.data.name == 'images',
          f'data.name={config.data.name!r}; classification reads lab.data.images ("images")')


def head_specs(feature_dim: int, num_classes: int) -> dict:
  """The zero-initialised linear classifier: w_DV, b_V."""
  return {'w': ps.ParamSpec((feature_dim, num_classes), ps.zeros, ('embed', 'vocab')),
          'b': ps.ParamSpec((num_classes,), ps.zeros, ('vocab',))}


def cross_entropy(logits_BV: jax.Array, labels_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean_b logsumexp(logits_b) - logits_b[y_b], mean_b [argmax logits_b == y_b]) in float32."""
  logits_BV = logits_BV.astype(jnp.promote_types(logits_BV.dtype, jnp.float32))
  picked_B = jnp.take_along_axis(logits_BV, labels_B[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits_BV, axis=1) - picked_B)
  return loss, jnp.mean(jnp.argmax(logits_BV, axis=1) == labels_B)


def make_task(config, data) -> Task:
  del data  # the batches carry everything
  cfg = config.model
  specs = {'backbone': backbone.param_specs(cfg),
           'head': head_specs(backbone.feature_dim(cfg), config.objective_args.num_classes)}

  def loss_fn(params, state, batch, rng, train):
    z_BD, new_state = backbone.features(cfg, params['backbone'], state, batch['image'],
                                        train=train, rng=rng)
    logits_BV = jnp.einsum('BD,DV->BV', z_BD, params['head']['w']) + params['head']['b']
    loss, accuracy = cross_entropy(logits_BV, batch['label'])
    return loss, ({'loss': loss, 'accuracy': accuracy}, new_state)

  def features(params, state, images_BXYC):
    return backbone.features(cfg, params['backbone'], state, images_BXYC, train=False)[0]

  return Task(param_specs=specs, init_state=lambda key: backbone.init_state(cfg), loss_fn=loss_fn,
              features=features)
