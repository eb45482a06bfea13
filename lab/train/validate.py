"""Checks of config.train that must hold before any device work."""
from lab.config import require
from lab.train import optimizers, precision


def validate(cfg) -> None:
  for key in ('steps', 'batch_size', 'grad_accum', 'log_every', 'checkpoint_every',
              'keep_checkpoints'):
    require(cfg[key] > 0, f'train.{key}={cfg[key]}; expected a positive integer')
  require(cfg.batch_size % cfg.grad_accum == 0,
          f'train.batch_size={cfg.batch_size} is not divisible by train.grad_accum={cfg.grad_accum}')
  require(cfg.warmup_steps >= 0, f'train.warmup_steps={cfg.warmup_steps}; expected >= 0')
  require(cfg.lr > 0, f'train.lr={cfg.lr}; expected > 0')
  require(cfg.schedule != 'cosine' or cfg.warmup_steps < (cfg.decay_steps or cfg.steps),
          f'train.warmup_steps={cfg.warmup_steps}; the cosine schedule expects fewer than '
          f'train.decay_steps or train.steps={cfg.decay_steps or cfg.steps}')
  require(0.0 <= cfg.ema_decay < 1.0, f'train.ema_decay={cfg.ema_decay}; expected 0 <= decay < 1')
  require(cfg.nonfinite in ('stop', 'skip'),
          f'train.nonfinite={cfg.nonfinite!r}; expected "stop" or "skip"')
  require(cfg.schedule in optimizers.SCHEDULES,
          f'train.schedule={cfg.schedule!r}; expected one of {optimizers.SCHEDULES}')
  require(cfg.get('optimizer', 'adamw') in optimizers.OPTIMIZERS,
          f'train.optimizer={cfg.get("optimizer")!r}; expected one of {optimizers.OPTIMIZERS}')
  precision.compute_dtype(cfg.compute_dtype)
  if cfg.compute_dtype == 'float16':
    require(cfg.loss_scale_init >= 1, f'train.loss_scale_init={cfg.loss_scale_init}; expected >= 1')
