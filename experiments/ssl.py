"""Self-supervised pre-training of an image encoder: one experiment, the method chosen by name.

  python -m lab.run --config experiments/ssl.py:method=simclr --workdir runs/ssl_simclr
  python -m lab.eval.ssl_table --out runs/ssl_table --run runs/ssl_simclr ...

Variants (after ':', comma-separated):
  method=M    instdisc | cpc | cmc | moco_v1 | moco_v2 | moco_v3 | simclr | swav | byol |
              simsiam | dino | mae (lab/objectives/<module>.py, METHODS below), or supervised
              (the same encoder with a linear classifier on the labels: the table's upper
              reference).
  encoder=E   resnet (default: a ResNet with one basic block per stage, width 16, CIFAR stem) |
              vit (width 64, 4 layers; patch 4 on MNIST's 28 x 28, patch 2 on the 8 x 8 digits;
              MAE and MoCo v3 default to it).
  source=S    mnist (default, from the TFDS data dir) | digits (scikit-learn, no download).
  tiny        a few-second run for tests (digits, a width-4 encoder, 3 steps).
Every method trains with the same encoder, data, batch and number of steps unless its objective
module's experiment_defaults(method) changes the training recipe the paper prescribes (e.g.
SimCLR's LARS); the sample hook reports a k-NN monitor (lab.eval.ssl_monitor) every
train.sample_every steps.
"""
import importlib

import ml_collections

from lab.config import parse_variant

METHODS = {'instdisc': 'instdisc', 'cpc': 'cpc', 'cmc': 'cmc', 'moco_v1': 'moco',
           'moco_v2': 'moco', 'moco_v3': 'moco_v3', 'simclr': 'simclr', 'swav': 'swav',
           'byol': 'byol', 'simsiam': 'simsiam', 'dino': 'dino', 'mae': 'mae',
           'supervised': 'classify'}
VIT_FIRST = ('moco_v3', 'mae')


def encoder(name: str, tiny: bool, source: str) -> dict:
  if name == 'resnet':
    return dict(name='resnet', stage_depths=(1, 1) if tiny else (1, 1, 1, 1), block='basic',
                width=4 if tiny else 16, stem='cifar', channels=0, num_classes=0,
                zero_init_residual=False, bn_momentum=0.9, bn_eps=1e-5)
  if name == 'vit':
    patch = 2 if tiny or source == 'digits' else 4
    return dict(name='vit', image_size=0, patch_size=patch, channels=0,
                d_model=8 if tiny else 64, n_layers=1 if tiny else 4, n_heads=2 if tiny else 4,
                mlp_dim=16 if tiny else 128, pooling='cls', class_token=True, pos_embed='learned',
                num_classes=0, attention_backend='auto', mlp_activation='gelu', norm_eps=1e-6,
                dropout=0.0, drop_path=0.0)
  raise ValueError(f'ssl encoder={name!r}; expected resnet or vit')


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'method', 'encoder', 'source', 'tiny'}
  if unknown:
    raise ValueError(f'ssl variant {sorted(unknown)}; expected method=, encoder=, source=, tiny')
  method = variant.get('method', 'simclr')
  if method not in METHODS:
    raise ValueError(f'ssl method={method!r}; expected one of {sorted(METHODS)}')
  tiny = 'tiny' in variant
  source = variant.get('source', 'digits' if tiny else 'mnist')
  if source not in ('mnist', 'digits'):
    raise ValueError(f'ssl source={source!r}; expected mnist or digits')
  name = variant.get('encoder', 'vit' if method in VIT_FIRST else 'resnet')
  defaults = importlib.import_module(f'lab.objectives.{METHODS[method]}').experiment_defaults(
      method)

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = METHODS[method]
  c.objective_args = dict(method=method, **defaults.get('objective_args', {}))
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='images', source=source, data_dir='', image_size=0,
                eval_batches=1 if tiny else 4)
  c.model = encoder(name, tiny, source)
  c.model.update(defaults.get('model', {}).get(name, {}))
  c.train = dict(steps=600, batch_size=128, grad_accum=1, optimizer='adamw', lr=1e-3,
                 min_lr=1e-5, warmup_steps=50, schedule='cosine', decay_steps=0,
                 wsd_decay_fraction=0.2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4,
                 clip_norm=0.0, ema_decay=0.0, compute_dtype='float32',
                 loss_scale_init=2.0**15, loss_scale_period=2000, nonfinite='stop',
                 log_every=20, eval_every=200, sample_every=200, checkpoint_every=200,
                 keep_checkpoints=1)
  c.train.update(defaults.get('train', {}))
  c.sample = dict(n_bank=2000, n_query=500)
  if tiny:
    c.train.update(steps=3, batch_size=16, warmup_steps=1, log_every=1, eval_every=3,
                   sample_every=0, checkpoint_every=3)
    c.sample.update(n_bank=64, n_query=32)
  return c
