"""A supervised ViT classifier on small digit images: the pre-trained tower that LiT locks.

  python -m lab.run --config experiments/vit_digits.py --workdir runs/vit_digits
  python -m lab.run --config experiments/clip_scenes.py:data=digits,lit --workdir runs/lit \
      --config.objective_args.image_tower_workdir=runs/vit_digits

The ViT (lab.models.vit through lab.models.backbone, num_classes = 0) and a zero-initialised
linear classifier (lab.objectives.classify) train with cross-entropy on the images' labels.
clip_scenes.py builds its digit image towers from TOWER below, so a LiT run on the same source
finds exactly this architecture.

Variants (after ':', comma-separated):
  source=S   digits (default; scikit-learn's 8x8 digits, no download) | mnist (28x28, from the
             TFDS data dir).
  tiny       a few-second run for tests.
"""
import ml_collections

from lab.config import parse_variant

# The ViT of both sources: patches of 2 (digits, 16 patches) or 4 pixels (MNIST, 49 patches).
TOWER = dict(d_model=64, n_layers=2, n_heads=4, mlp_dim=128, pooling='cls', class_token=True,
             pos_embed='learned', mlp_activation='gelu', norm_eps=1e-6, dropout=0.0,
             drop_path=0.0)
PATCH = {'digits': 2, 'mnist': 4}


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'source', 'tiny'}
  if unknown:
    raise ValueError(f'vit_digits variant {sorted(unknown)}; expected source=, tiny')
  source = variant.get('source', 'digits')
  if source not in PATCH:
    raise ValueError(f'vit_digits source={source!r}; expected one of {sorted(PATCH)}')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'classify'
  c.objective_args = dict(num_classes=10)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='images', source=source, data_dir='', image_size=0, eval_batches=4)
  c.model = dict(name='vit', image_size=0, channels=0, patch_size=PATCH[source], num_classes=0,
                 attention_backend='auto', **TOWER)
  c.train = dict(steps=1500 if source == 'digits' else 2000, batch_size=64, grad_accum=1,
                 lr=1e-3, min_lr=1e-5, warmup_steps=100, schedule='cosine', decay_steps=0,
                 wsd_decay_fraction=0.2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                 clip_norm=1.0, ema_decay=0.0, compute_dtype='float32', loss_scale_init=2.0**15,
                 loss_scale_period=2000, nonfinite='stop', log_every=50, eval_every=500,
                 sample_every=0, checkpoint_every=500, keep_checkpoints=1)
  if 'tiny' in variant:
    c.model.update(d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
    c.train.update(steps=4, batch_size=16, warmup_steps=1, log_every=2, eval_every=4,
                   checkpoint_every=4)
    c.data.update(eval_batches=1)
  return c
