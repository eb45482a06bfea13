"""Receptive fields of a single-path stack of convolution and pooling layers, analytic and measured.

Araujo, Norris & Sim 2019, "Computing Receptive Fields of Convolutional Neural Networks", Distill
(doi 10.23915/distill.00021). With a dilated layer's effective kernel d (k - 1) + 1, the field
size r, the jump j (distance in input pixels between neighbouring outputs, the effective stride)
and the centre c of output 0's field follow, from r_0 = 1, j_0 = 1, c_0 = 0, the recurrences
  r_l = r_{l-1} + (k_l - 1) d_l j_{l-1},   j_l = j_{l-1} s_l,
  c_l = c_{l-1} + (d_l (k_l - 1) / 2 - p_l) j_{l-1},
the forward form of the paper's eqs. 1-2 and of its start formula u_0 = -sum_l p_l j_{l-1}
(c = u_0 + (r - 1) / 2). Output u of the stack sees input pixels c + u j +- (r - 1) / 2 (pixel
i's centre at coordinate i; pixels outside the image are padding). The measured field is the set
of input pixels with non-zero gradient for one output unit of an actual stack with positive
weights. It never leaves the analytic interval; it can have holes (dilation, or a kernel smaller
than its stride), and it can miss border pixels whose every path runs through padding; when the
interval lies inside the image and every kernel covers its stride (d = 1, k >= s) it is the whole
interval.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lab.nn import conv


class Layer(NamedTuple):
  """One convolution or pooling layer (the field depends only on its geometry), square: kernel k,
  stride s, padding p on each side, dilation d."""
  kernel: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1


class Field(NamedTuple):
  """size r, jump j (effective stride) and centre c of output 0's field, in input pixels."""
  size: int
  jump: int
  start: float


def _check(layers: Sequence[Layer]) -> None:
  for i, l in enumerate(layers):
    if l.kernel < 1 or l.stride < 1 or l.dilation < 1 or l.padding < 0:
      raise ValueError(f'layers[{i}]={l}; expected kernel, stride, dilation >= 1, padding >= 0')


def receptive_field(layers: Sequence[Layer]) -> Field:
  """Field of the last layer's outputs by the recurrences of the module docstring (Araujo et al.
  2019, eqs. 1-2 and the start formula)."""
  _check(layers)
  size, jump, start = 1, 1, 0.0
  for l in layers:
    size += (l.kernel - 1) * l.dilation * jump
    start += (l.dilation * (l.kernel - 1) / 2 - l.padding) * jump
    jump *= l.stride
  return Field(size, jump, start)


def field_interval(field: Field, index: int) -> tuple[float, float]:
  """First and last input pixel seen by output `index`: c + index j -+ (r - 1) / 2."""
  centre = field.start + index * field.jump
  return centre - (field.size - 1) / 2, centre + (field.size - 1) / 2


def output_size(layers: Sequence[Layer], size: int) -> int:
  """Spatial size after the stack: n_l = floor((n_{l-1} + 2 p - d (k - 1) - 1) / s) + 1."""
  _check(layers)
  for l in layers:
    size = (size + 2 * l.padding - l.dilation * (l.kernel - 1) - 1) // l.stride + 1
  return size


def measured_field(layers: Sequence[Layer], size: int, index: tuple[int, int]) -> np.ndarray:
  """The (size, size) boolean mask of input pixels x with d y[index] / d x != 0, for the stack run
  through lab.nn.conv.conv2d on one size x size single-channel image with all-ones kernels (and
  the layers' dilations), so no terms can cancel. A pooling layer is measured as this sum-pool: average pooling
  up to a positive scale, and max pooling's field (its gradient reaches only the arg-max)."""
  n_out = output_size(layers, size)
  if n_out < 1 or not all(0 <= i < n_out for i in index):
    raise ValueError(f'measured_field index={index} with a {size}-pixel input; expected indices '
                     f'in [0, {n_out}) of the {n_out}-pixel output')

  def unit(x_XY, kernels):
    y_BXYC = x_XY[None, :, :, None]
    for l, w_XYCO in zip(layers, kernels):
      y_BXYC = conv.conv2d({'w': w_XYCO}, y_BXYC, stride=l.stride, padding=l.padding,
                           dilation=l.dilation)
    return y_BXYC[0, index[0], index[1], 0]

  # The kernels are arguments, not constants: XLA's CPU compiler aborts on some folded ones.
  kernels = [np.ones((l.kernel, l.kernel, 1, 1), np.float32) for l in layers]
  grad_XY = jax.jit(jax.grad(unit))(jnp.ones((size, size), jnp.float32), kernels)
  return np.asarray(grad_XY) != 0
