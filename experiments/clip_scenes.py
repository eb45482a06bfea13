"""CLIP, SigLIP and LiT on generated image-text data: scenes of coloured shapes with held-out
colour-shape compositions, or digit images with CLIP-style prompts.

  python -m lab.run --config experiments/clip_scenes.py:loss=clip --workdir runs/clip_scenes
  python -m lab.run --config experiments/clip_scenes.py:loss=siglip,arch=clip \
      --workdir runs/siglip_scenes
  python -m lab.eval.zero_shot_eval --run runs/clip_scenes
LiT (a locked, supervised ViT from vit_digits.py; only the text tower and heads train):
  python -m lab.run --config experiments/vit_digits.py --workdir runs/vit_digits
  python -m lab.run --config experiments/clip_scenes.py:data=digits,lit --workdir runs/lit \
      --config.objective_args.image_tower_workdir=runs/vit_digits

Variants (after ':', comma-separated):
  loss=L   clip (default; softmax, learnable temperature) | siglip (sigmoid, temperature + bias).
  arch=A   the towers' flavour (lab.models.clip), default the loss's: clip (causal text pooled at
           <eos>, CLIP's pre-norm and class token, heads without bias) | siglip (bidirectional
           text pooled at the last position, MAP image pooling, no image head). loss=siglip,
           arch=clip compares the two losses with the same towers, as the SigLIP paper does.
  data=D   scenes (default; captions of 1-2 objects, 5 colour-shape pairs held out of training)
           | digits (scikit-learn's 8x8 digits) | mnist (28x28, from the TFDS data dir).
           Digit towers are vit_digits.py's ViT (no CLIP pre-norm, cls pooling, whatever arch)
           so that LiT and from-scratch runs share one architecture.
  lit      lock the image tower of objective_args.image_tower_workdir (set it on the command
           line) and train the text tower from scratch; no image head (big_vision's LiT).
  tiny     a few-second run for tests (with lit: on vit_digits.py:tiny's tower).
"""
import os

import ml_collections

from lab import config as config_lib
from lab.data.word_tokenizer import SPECIALS

HOLDOUT = ('red circle', 'green square', 'blue triangle', 'yellow cross', 'magenta diamond')
TEXT_LEN = {'scenes': 24, 'digits': 12, 'mnist': 12}
_HERE = os.path.dirname(os.path.abspath(__file__))


def image_tower(arch: str, data: str, tiny: bool) -> dict:
  """model.image: the scenes' ViT of the arch, or vit_digits.py's for digit data."""
  if data != 'scenes':
    digits = config_lib.load(os.path.join(_HERE, 'vit_digits.py') + f':source={data}'
                             + (',tiny' if tiny else '')).model
    fields = ('patch_size', 'd_model', 'n_layers', 'n_heads', 'mlp_dim', 'pooling', 'class_token',
              'pos_embed', 'mlp_activation', 'norm_eps', 'dropout', 'drop_path')
    return dict({k: digits[k] for k in fields}, pre_norm=False)
  clip = arch == 'clip'
  tower = dict(patch_size=4, d_model=64, n_layers=2, n_heads=4, mlp_dim=256,
               pooling='cls' if clip else 'map', class_token=clip, pos_embed='learned',
               mlp_activation='quick_gelu' if clip else 'gelu_tanh',
               norm_eps=1e-5 if clip else 1e-6, dropout=0.0, drop_path=0.0, pre_norm=clip)
  if tiny:
    tower.update(d_model=16, n_layers=1, n_heads=2, mlp_dim=32)
  return tower


def get_config(arg=None):
  variant = config_lib.parse_variant(arg)
  unknown = set(variant) - {'loss', 'arch', 'data', 'lit', 'tiny'}
  if unknown:
    raise ValueError(f'clip_scenes variant {sorted(unknown)}; expected loss=, arch=, data=, '
                     'lit, tiny')
  loss = variant.get('loss', 'clip')
  arch, data = variant.get('arch', loss), variant.get('data', 'scenes')
  for name, value, options in (('loss', loss, ('clip', 'siglip')),
                               ('arch', arch, ('clip', 'siglip')), ('data', data, tuple(TEXT_LEN))):
    if value not in options:
      raise ValueError(f'clip_scenes {name}={value!r}; expected one of {options}')
  tiny, lit = 'tiny' in variant, 'lit' in variant
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'contrastive'
  c.objective_args = dict(loss=loss, image_tower_workdir='', lock_image_tower=lit)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='image_text', task={'scenes': 'caption', 'digits': 'digits_captions',
                                         'mnist': 'mnist_captions'}[data],
                seed=0, image_size=32 if data == 'scenes' else 0, grid=3, max_objects=2,
                digit_fraction=0.2, glyphs='digits', data_dir='', n_train=20000, n_eval=512,
                holdout=HOLDOUT if data == 'scenes' else (), eval_split='test',
                noise_fraction=0.0, text_len=TEXT_LEN[data], n_tiles=4, eval_batches=4)
  tower = image_tower(arch, data, tiny)
  width = 16 if tiny else 64
  c.model = dict(
      name='clip', flavour=arch, embed_dim=tower['d_model'], image_head=arch == 'clip' and not lit,
      image_size=0, channels=0, vocab_size=0, attention_backend='auto', image=tower,
      text=dict(max_len=TEXT_LEN[data], d_model=width, n_layers=1 if tiny else 2,
                n_heads=2 if tiny else 4, mlp_dim=4 * width,
                mlp_activation='quick_gelu' if arch == 'clip' else 'gelu_tanh',
                norm_eps=1e-5 if arch == 'clip' else 1e-6, dropout=0.0,
                pooling='eos' if arch == 'clip' else 'last', eos_id=SPECIALS.index('<eos>')))
  # CLIP's AdamW (sec. 2.5: b2 = 0.98, eps = 1e-6, decoupled weight decay, cosine schedule).
  c.train = dict(steps=1500, batch_size=128, grad_accum=1, lr=1e-3, min_lr=1e-5,
                 warmup_steps=100, schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2,
                 b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=50, eval_every=500, sample_every=0,
                 checkpoint_every=500, keep_checkpoints=1)
  if tiny:
    c.data.update(n_train=64, n_eval=32, eval_batches=1)
    c.train.update(steps=6, batch_size=16, warmup_steps=1, log_every=2, eval_every=6,
                   checkpoint_every=6)
  return c
