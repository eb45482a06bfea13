"""2-D convolution over channels-last images, with its parameter spec.

y[b, x, y, o] = sum_{i, j, c} x_pad[b, s x + i, s y + j, c] w[i, j, c, o] + b[o]
(cross-correlation, as every deep-learning library computes it).
"""
import math

import jax

from lab.nn import param_spec as ps


def conv_specs(kernel: int, c_in: int, c_out: int, *, bias: bool = True,
               std: float | None = None) -> dict:
  """Parameters: w_XYCO (kernel, kernel, c_in, c_out) and b_O; the default std is LeCun normal,
  1 / sqrt(fan_in) with fan_in = kernel^2 c_in."""
  std = 1.0 / math.sqrt(kernel * kernel * c_in) if std is None else std
  specs = {'w': ps.ParamSpec((kernel, kernel, c_in, c_out), ps.normal(std),
                             (None, None, 'conv_in', 'conv_out'))}
  if bias:
    specs['b'] = ps.ParamSpec((c_out,), ps.zeros, ('conv_out',))
  return specs


def conv2d(p: dict, x_BXYC: jax.Array, *, stride: int = 1, padding: str | int = 'SAME',
           groups: int = 1, dilation: int = 1) -> jax.Array:
  """x_BXYC (*) w_XYCO + b_O. padding: 'SAME', 'VALID' or a symmetric int. groups = C gives a
  depthwise convolution (w then has shape (k, k, 1, C * multiplier)). dilation d spaces the
  kernel's taps d pixels apart (atrous convolution, Yu & Koltun 2016)."""
  pad = padding if isinstance(padding, str) else [(padding, padding)] * 2
  y_BXYO = jax.lax.conv_general_dilated(
      x_BXYC, p['w'].astype(x_BXYC.dtype), window_strides=(stride, stride), padding=pad,
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)
  return y_BXYO + p['b'].astype(x_BXYC.dtype) if 'b' in p else y_BXYO
