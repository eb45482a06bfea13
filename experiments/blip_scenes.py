"""BLIP (Li et al. 2022, arXiv:2201.12086) on generated scenes with captions, and CapFilt.

  python -m lab.run --config experiments/blip_scenes.py:noisy --workdir runs/blip_noisy
  python -m lab.eval.capfilt --run runs/blip_noisy --out runs/blip_noisy/capfilt.npz
  python -m lab.run --config experiments/blip_scenes.py:cleaned --workdir runs/blip_cleaned \
      --config.data.pairs_path=runs/blip_noisy/capfilt.npz
  python -m lab.eval.blip_retrieval --run runs/blip_cleaned

The model (lab/models/blip.py) is a ViT image encoder and a BERT-style text transformer with
cross-attention, trained with ITC + ITM + LM (lab/objectives/blip.py).
Variants (after ':', comma-separated):
  (none)   clean captions of 8192 training scenes (up to 2 objects on a 3 x 3 grid, 32 x 32).
  noisy    40% of the training captions swapped between scenes (data.noise_fraction = 0.4).
  cleaned  train on the pairs CapFilt kept (lab/data/image_text_cleaned.py; set
           data.pairs_path), the same model and budget as the others.
  tiny     a few-second config for tests (combine as 'tiny,noisy').
"""
import ml_collections

from lab.config import parse_variant


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'noisy', 'cleaned', 'tiny'}
  if unknown:
    raise ValueError(f'blip_scenes variant {sorted(unknown)}; expected noisy, cleaned, tiny')
  if 'noisy' in variant and 'cleaned' in variant:
    raise ValueError('blip_scenes: noisy and cleaned exclude each other; cleaned trains on '
                     "CapFilt's output of a noisy run")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'blip'
  c.objective_args = dict(label_smoothing=0.1)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='image_text', task='caption', seed=0, image_size=32, grid=3, max_objects=2,
                digit_fraction=0.25, glyphs='digits', data_dir='', n_train=8192, n_eval=512,
                holdout=(), eval_split='test', noise_fraction=0.4 if 'noisy' in variant else 0.0,
                text_len=24, n_tiles=0, eval_batches=8)
  if 'cleaned' in variant:
    c.data.name = 'image_text_cleaned'
    c.data.pairs_path = ''
  c.model = dict(name='blip', image_size=0, channels=0, vocab_size=0, vocab_multiple=8,
                 max_len=24, embed_dim=64, attention_backend='auto',
                 vision=dict(patch_size=8, d_model=64, n_layers=2, n_heads=4, mlp_dim=128),
                 text=dict(d_model=64, n_layers=2, n_heads=4, mlp_dim=128))
  c.train = dict(steps=1000, batch_size=64, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_steps=50,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.999,
                 eps=1e-8, weight_decay=0.05, clip_norm=1.0, ema_decay=0.0,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=50, eval_every=250, sample_every=500,
                 checkpoint_every=500, keep_checkpoints=1)
  c.sample = dict(num=4, top_p=0.9, temperature=1.0)
  if 'tiny' in variant:
    c.data.update(n_train=64, n_eval=32, eval_batches=1)
    c.model.update(embed_dim=16, vision=dict(patch_size=8, d_model=16, n_layers=1, n_heads=2,
                                             mlp_dim=32),
                   text=dict(d_model=16, n_layers=1, n_heads=2, mlp_dim=32))
    c.train.update(steps=6, batch_size=8, warmup_steps=1, log_every=2, eval_every=3,
                   sample_every=6, checkpoint_every=3)
    c.sample.update(num=2)
  return c
