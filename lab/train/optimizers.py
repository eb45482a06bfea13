"""Learning-rate schedules and the optimizer (AdamW, LARS or SGD) from config.train."""
from __future__ import annotations

import jax
import optax

from lab.config import ConfigError

SCHEDULES = ('cosine', 'wsd', 'constant')
OPTIMIZERS = ('adamw', 'lars', 'sgd')


def schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to cfg.lr over cfg.warmup_steps, then
  cosine: half-cosine to cfg.min_lr at cfg.decay_steps (0: the last step), flat after (nanoGPT);
  wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at lr, then linear to min_lr over the
       last cfg.wsd_decay_fraction of the steps;
  constant: flat at lr.
  """
  if cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                              cfg.decay_steps or cfg.steps, cfg.min_lr)
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  if cfg.schedule == 'constant':
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
  if cfg.schedule == 'wsd':
    decay_start = int(round(cfg.steps * (1.0 - cfg.wsd_decay_fraction)))
    if decay_start < cfg.warmup_steps:
      raise ConfigError(f'train.wsd_decay_fraction={cfg.wsd_decay_fraction} starts the decay at '
                        f'step {decay_start}, inside the warmup of {cfg.warmup_steps} steps')
    return optax.join_schedules(
        [warmup, optax.constant_schedule(cfg.lr),
         optax.linear_schedule(cfg.lr, cfg.min_lr, cfg.steps - decay_start)],
        [cfg.warmup_steps, decay_start])
  raise ConfigError(f'train.schedule={cfg.schedule!r}; expected one of {SCHEDULES}')


def _decay_mask(params):
  """Weight decay on matrices and embeddings only, not on biases and norm scales (nanoGPT)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(cfg) -> optax.GradientTransformation:
  """Global-norm clipping (if cfg.clip_norm > 0), then cfg.optimizer (default 'adamw'):
  adamw  AdamW (Loshchilov & Hutter 2019), betas b1, b2;
  lars   LARS (You et al. 2017) with momentum b1 and trust coefficient 0.001, biases and norm
         scales excluded from both the weight decay and the trust-ratio scaling (SimCLR, Chen et
         al. 2020, appendix B.1);
  sgd    SGD with momentum b1 and decoupled weight decay on matrices.
  """
  name = cfg.get('optimizer', 'adamw')
  if name == 'adamw':
    opt = optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=_decay_mask)
  elif name == 'lars':
    opt = optax.lars(schedule(cfg), weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
                     trust_ratio_mask=_decay_mask, momentum=cfg.b1)
  elif name == 'sgd':
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, _decay_mask),
                      optax.sgd(schedule(cfg), momentum=cfg.b1))
  else:
    raise ConfigError(f'train.optimizer={name!r}; expected one of {OPTIMIZERS}')
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt
