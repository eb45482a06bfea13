"""EfficientNet compound scaling (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", arXiv:1905.11946): the B0 block table and its B1..B7 scale-ups.

Compound scaling (sec. 3.3, eq. 3): depth d = alpha^phi, width w = beta^phi, resolution
r = gamma^phi, with alpha beta^2 gamma^2 ~ 2 so that FLOPs grow by about 2^phi; the grid search
of sec. 4 found alpha = 1.2, beta = 1.1, gamma = 1.15. The released B1..B7 use rounded
coefficients (VARIANTS, from the official implementation's efficientnet_params), not exactly
alpha^phi, so the named variants read VARIANTS while `compound_coefficients` gives the rule.

A stage's width c becomes round_filters(c w): the nearest multiple of the divisor 8 (at least 8),
bumped up by one divisor when that rounds c w down by more than 10%; its repeats n become
ceil(d n). Stem (32) and head (1280) widths are rounded the same way; their depth is 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224
STEM_CHANNELS, HEAD_CHANNELS, DIVISOR = 32, 1280, 8


class Stage(NamedTuple):
  """One row of Table 1: MBConv<expand_ratio>, kernel x kernel, `repeats` blocks; the first has
  stride `stride` and maps c_in to c_out channels, the others keep c_out at stride 1. A plain
  tuple (kernel, stride, expand_ratio, c_in, c_out, repeats) in a config means the same."""
  kernel: int
  stride: int
  expand_ratio: int
  c_in: int
  c_out: int
  repeats: int


# Table 1 stages 2..8 (stage 1 is the stem conv, stage 9 the head conv + pool + FC).
B0_STAGES = (Stage(3, 1, 1, 32, 16, 1), Stage(3, 2, 6, 16, 24, 2), Stage(5, 2, 6, 24, 40, 2),
             Stage(3, 2, 6, 40, 80, 3), Stage(5, 1, 6, 80, 112, 3), Stage(5, 2, 6, 112, 192, 4),
             Stage(3, 1, 6, 192, 320, 1))


@dataclasses.dataclass(frozen=True)
class Variant:
  """Width and depth coefficients, input resolution and classifier dropout of a released model."""
  width: float
  depth: float
  resolution: int
  dropout: float


VARIANTS = {'b0': Variant(1.0, 1.0, 224, 0.2), 'b1': Variant(1.0, 1.1, 240, 0.2),
            'b2': Variant(1.1, 1.2, 260, 0.3), 'b3': Variant(1.2, 1.4, 300, 0.3),
            'b4': Variant(1.4, 1.8, 380, 0.4), 'b5': Variant(1.6, 2.2, 456, 0.4),
            'b6': Variant(1.8, 2.6, 528, 0.5), 'b7': Variant(2.0, 3.1, 600, 0.5)}
DROP_CONNECT_RATE = 0.2  # the official stochastic-depth rate of the last block, every variant


def compound_coefficients(phi: float) -> tuple[float, float, float]:
  """(d, w, resolution) = (alpha^phi, beta^phi, 224 gamma^phi) of eq. 3."""
  return ALPHA ** phi, BETA ** phi, BASE_RESOLUTION * GAMMA ** phi


def round_filters(c: int, width: float, divisor: int = DIVISOR) -> int:
  """c * width to a multiple of divisor (>= divisor), never more than 10% below c * width."""
  scaled = c * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * scaled else rounded


def round_repeats(n: int, depth: float) -> int:
  """ceil(depth * n) blocks."""
  return int(math.ceil(depth * n))


def scaled_stages(width: float, depth: float, stages=B0_STAGES,
                  divisor: int = DIVISOR) -> tuple[Stage, ...]:
  """The stages with widths rounded by round_filters and repeats by round_repeats."""
  return tuple(Stage(*s)._replace(c_in=round_filters(s[3], width, divisor),
                                  c_out=round_filters(s[4], width, divisor),
                                  repeats=round_repeats(s[5], depth)) for s in stages)


def model_fields(name: str) -> dict:
  """lab.models.efficientnet config fields of a released variant ('b0'..'b7'); the input
  resolution is VARIANTS[name].resolution (a data setting, the network is size-agnostic)."""
  if name not in VARIANTS:
    raise ValueError(f'EfficientNet variant {name!r}; expected one of {sorted(VARIANTS)}')
  v = VARIANTS[name]
  return dict(width_coefficient=v.width, depth_coefficient=v.depth, dropout=v.dropout,
              drop_connect_rate=DROP_CONNECT_RATE)
