"""Diffusion and flow models on small images: scikit-learn digits (8x8, no download) or MNIST.

  python -m lab.run --config experiments/diffusion_images.py:method=edm,source=mnist \
      --workdir runs/mnist_edm

Variants (after ':', comma-separated):
  method=M   ddpm | vp | ve | edm | flow (default edm), samplers as in diffusion_toy.py.
  pred=P     ddpm and vp: eps | v | x0 (default eps).
  net=N      unet (default; ADM-style, lab/models/unet.py) | dit (lab/models/dit.py).
  source=S   digits (default) | mnist (from the TFDS data dir, ../shared/tfds).
  cond       class-conditional with 10% label dropout, for classifier-free guidance.
  reflow     with method=flow: train on (sample, noise) pairs of a trained flow (rectified flow's
             reflow); write them with `python -m lab.sampling.reflow` and pass
             --config.data.pairs_path=PATH, and --config.objective_args.init_workdir=FLOW_RUN to
             fine-tune the 1-rectified flow as Liu et al. do rather than start from scratch.
  tiny       a few-second run for tests.
"""
import ml_collections

from lab.config import parse_variant
from lab.objectives.diffusion import DEFAULT_SAMPLER, default_args


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'method', 'pred', 'net', 'source', 'cond', 'reflow', 'tiny'}
  if unknown:
    raise ValueError(f'diffusion_images variant {sorted(unknown)}; expected method=, pred=, '
                     'net=, source=, cond, reflow, tiny')
  method, net = variant.get('method', 'edm'), variant.get('net', 'unet')
  if method not in DEFAULT_SAMPLER:
    raise ValueError(f'diffusion_images method={method!r}; expected one of '
                     f'{sorted(DEFAULT_SAMPLER)}')
  if net not in ('unet', 'dit'):
    raise ValueError(f'diffusion_images net={net!r}; expected unet or dit')
  mnist = variant.get('source', 'digits') == 'mnist'
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'diffusion'
  c.objective_args = default_args(method, variant.get('pred', 'eps'), ve_sigma_max=50.0,
                                  sigma_data=0.5, label_dropout=0.1 if 'cond' in variant else 0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='images', source='mnist' if mnist else 'digits', data_dir='', image_size=0,
                eval_batches=4)
  if 'reflow' in variant:
    if method != 'flow':
      raise ValueError(f'diffusion_images reflow needs method=flow, not {method!r}')
    c.data = dict(name='reflow_pairs', pairs_path='', source=c.data.source, data_dir='',
                  image_size=0, eval_batches=4)
  common = dict(image_size=0, channels=0, num_classes=10 if 'cond' in variant else 0,
                dropout=0.0, attention_backend='auto', noise_max_period=10000.0)
  if net == 'unet':
    c.model = dict(name='unet', base_channels=16 if mnist else 32, channel_mults=(1, 2),
                   blocks_per_level=1, attention_resolutions=(14,) if mnist else (4,),
                   heads=2 if mnist else 4, norm_groups=8, **common)
  else:
    c.model = dict(name='dit', patch_size=4 if mnist else 2, d_model=128, n_layers=6 if mnist else 4,
                   n_heads=4, mlp_ratio=4, **common)
  c.train = dict(steps=2500 if mnist else 4000, batch_size=64, grad_accum=1, lr=1e-3,
                 min_lr=2e-5, warmup_steps=100, schedule='cosine', decay_steps=0,
                 wsd_decay_fraction=0.2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 clip_norm=1.0, ema_decay=0.999, compute_dtype='float32',
                 loss_scale_init=2.0**15, loss_scale_period=2000, nonfinite='stop',
                 log_every=100, eval_every=1000, sample_every=2000, checkpoint_every=1000,
                 keep_checkpoints=2)
  sampler, steps = DEFAULT_SAMPLER[method]
  c.sample = dict(sampler=sampler, steps=steps, num=64, guidance_scale=2.0 if 'cond' in variant
                  else 1.0, eta=0.0, clip_x0=1.0)
  if 'tiny' in variant:
    if net == 'unet':
      c.model.update(base_channels=8, channel_mults=(1, 2), blocks_per_level=1,
                     attention_resolutions=(14,) if mnist else (4,), heads=2, norm_groups=4)
    else:
      c.model.update(d_model=32, n_layers=2, n_heads=2)
    c.train.update(steps=6, batch_size=8, warmup_steps=1, log_every=2, eval_every=3,
                   sample_every=6, checkpoint_every=3, ema_decay=0.0)
    c.data.update(eval_batches=1)
    c.sample.update(num=4, steps=min(steps, 4))
  return c
