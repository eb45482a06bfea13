"""Image backbones behind one interface, for the methods that train or probe an encoder
(self-supervised learning, linear probes, LiT towers): `config.model.name` picks the network.

  features(cfg, params, state, images_BXYC, *, train, rng) -> (z_BD, new_state)
returns the pooled features (the network's num_classes must be 0) and the new non-parameter
state (batch-norm statistics for ResNet and EfficientNet, {} for ViT).
"""
from __future__ import annotations

import importlib

import jax

from lab.config import require

NAMES = ('resnet', 'efficientnet', 'vit')


def module(cfg):
  """The model module of cfg.name (lab.models.resnet | efficientnet | vit)."""
  require(cfg.name in NAMES, f'model.name={cfg.name!r}; expected a backbone, one of {NAMES}')
  return importlib.import_module(f'lab.models.{cfg.name}')


def validate(cfg) -> None:
  module(cfg).validate(cfg)
  require(not cfg.get('num_classes', 0), f'model.num_classes={cfg.get("num_classes")}; a '
          'backbone returns pooled features, expected 0 (no classifier head)')


def param_specs(cfg):
  return module(cfg).param_specs(cfg)


def init_state(cfg):
  return module(cfg).init_state(cfg)


def feature_dim(cfg) -> int:
  return module(cfg).feature_dim(cfg)


def features(cfg, params, state, images_BXYC: jax.Array, *, train: bool,
             rng: jax.Array | None = None):
  """(z_BD, new_state): pooled features of images_BXYC; rng drives stochastic layers in train."""
  m = module(cfg)
  forward = m.forward_with_state if cfg.name == 'vit' else m.forward
  return forward(cfg, params, state, images_BXYC, train=train, rng=rng)
