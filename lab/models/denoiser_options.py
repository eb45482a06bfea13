"""The optional config fields that the diffusion denoisers (unet, dit, mlp_denoiser) share, their
defaults and their checks.

  num_classes       0: unconditional; otherwise labels lie in [0, num_classes], num_classes being
                    the null label of classifier-free guidance (lab.nn.timestep_embedding).
  dropout           0.0; the rate of the denoiser's dropout layers, in [0, 1).
  attention_backend 'auto'; lab.kernels.flash_attention's backend (denoisers with attention only).
  noise_max_period  10000.0; the sinusoidal noise embedding's max_period, > 0.
"""
from __future__ import annotations

from lab.config import require
from lab.kernels import available_backends

DEFAULTS = dict(num_classes=0, dropout=0.0, attention_backend='auto', noise_max_period=10_000.0)


def option(cfg, name: str):
  """cfg[name], or its default when the config leaves it out."""
  return cfg.get(name, DEFAULTS[name])


def validate_common(cfg, *, attention: bool) -> None:
  """One-line ConfigErrors for the shared fields; attention_backend only when `attention`."""
  dropout, num_classes = option(cfg, 'dropout'), option(cfg, 'num_classes')
  require(0.0 <= dropout < 1.0, f'model.dropout={dropout}; expected a value in [0, 1)')
  require(num_classes >= 0, f'model.num_classes={num_classes}; expected >= 0')
  if attention:
    backend = option(cfg, 'attention_backend')
    require(backend in available_backends(),
            f'model.attention_backend={backend!r}; expected one of {available_backends()}')
  max_period = option(cfg, 'noise_max_period')
  require(max_period > 0, f'model.noise_max_period={max_period}; expected > 0')
