"""Diffusion and flow models on 2-D toy distributions with known densities.

  python -m lab.run --config experiments/diffusion_toy.py:method=edm,dist=checkerboard \
      --workdir runs/toy_edm

Variants (after ':', comma-separated):
  method=M  ddpm | vp | ve | edm | flow (default edm); each gets its own sampler default:
            ddpm ancestral, vp ode, ve pc, edm heun, flow euler (override with --config.sample.*).
  pred=P    ddpm and vp: eps | v | x0 (default eps).
  dist=D    gmm | checkerboard | moons (default gmm): lab/data/toy2d.py.
  tiny      a few-second run for tests.
A residual MLP denoiser (lab/models/mlp_denoiser.py), batch 512, AdamW 1e-3 with cosine decay.
The sample hook draws sample.num points and reports the sliced Wasserstein distance to fresh
samples of the true distribution; a scatter plot goes to the workdir.
"""
import ml_collections

from lab.config import parse_variant
from lab.objectives.diffusion import DEFAULT_SAMPLER, default_args


def get_config(arg=None):
  variant = parse_variant(arg)
  unknown = set(variant) - {'method', 'pred', 'dist', 'tiny'}
  if unknown:
    raise ValueError(f'diffusion_toy variant {sorted(unknown)}; expected method=, pred=, dist=, '
                     'tiny')
  method = variant.get('method', 'edm')
  if method not in DEFAULT_SAMPLER:
    raise ValueError(f'diffusion_toy method={method!r}; expected one of {sorted(DEFAULT_SAMPLER)}')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = 'diffusion'
  c.objective_args = default_args(method, variant.get('pred', 'eps'), ve_sigma_max=10.0,
                                  sigma_data=1.0, label_dropout=0.0)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)
  c.sharding_rules = {}
  c.data = dict(name='toy2d', distribution=variant.get('dist', 'gmm'), eval_batches=4)
  c.model = dict(name='mlp_denoiser', channels=2, width=256, depth=4, num_classes=0,
                 noise_max_period=10000.0, dropout=0.0)
  c.train = dict(steps=3000, batch_size=512, grad_accum=1, lr=1e-3, min_lr=1e-5, warmup_steps=100,
                 schedule='cosine', decay_steps=0, wsd_decay_fraction=0.2, b1=0.9, b2=0.999,
                 eps=1e-8, weight_decay=0.0, clip_norm=1.0, ema_decay=0.999,
                 compute_dtype='float32', loss_scale_init=2.0**15, loss_scale_period=2000,
                 nonfinite='stop', log_every=100, eval_every=1000, sample_every=1000,
                 checkpoint_every=1000, keep_checkpoints=2)
  sampler, steps = DEFAULT_SAMPLER[method]
  c.sample = dict(sampler=sampler, steps=steps, num=2000, guidance_scale=1.0, eta=0.0,
                  clip_x0=0.0)
  if 'tiny' in variant:
    c.model.update(width=64, depth=2)
    c.train.update(steps=30, batch_size=64, warmup_steps=2, log_every=10, eval_every=15,
                   sample_every=30, checkpoint_every=15, ema_decay=0.0)
    c.sample.update(num=64, steps=min(steps, 10))
  return c
