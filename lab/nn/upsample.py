"""Learned upsampling over channels-last images: sub-pixel convolution and transposed convolution.

Sub-pixel convolution (Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using
an Efficient Sub-Pixel Convolutional Neural Network", arXiv 1609.05158, eq. 4) is a stride-1
convolution to r^2 C channels followed by the periodic shuffle PS, which moves channel
c r^2 + i r + j of low-resolution pixel (x, y) to channel c of pixel (x r + i, y r + j); this is
torch.nn.PixelShuffle's channel order. The transposed (fractionally strided) convolution
(Dumoulin & Visin 2016, "A guide to convolution arithmetic for deep learning", arXiv 1603.07285,
relationship 14) scatters every input pixel through the kernel onto an r-times finer grid; Shi
et al. 2016b ("Is the deconvolution layer the same as a convolutional layer?", arXiv 1609.07009)
show that the two are the same layer with rearranged kernels (`transposed_to_subpixel_kernel`).

Letters beyond DESIGN.md: O output channels; I, J the sub-pixel row and column offsets (0..r-1)
of a high-resolution pixel inside its r x r cell.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lab.nn import param_spec as ps


def pixel_shuffle(x_BXYC: jax.Array, r: int) -> jax.Array:
  """PS of Shi et al. 2016, eq. 4: (B, X, Y, C r^2) -> (B, X r, Y r, C) with
  y[b, x r + i, y r + j, c] = x[b, x, y, c r^2 + i r + j] (torch.nn.PixelShuffle's order)."""
  B, X, Y, Cr2 = x_BXYC.shape
  if r < 1 or Cr2 % (r * r):
    raise ValueError(f'pixel_shuffle r={r} with {Cr2} channels; expected r >= 1 with r^2 '
                     f'dividing the channels')
  x_BXYCIJ = x_BXYC.reshape(B, X, Y, Cr2 // (r * r), r, r)
  return x_BXYCIJ.transpose(0, 1, 4, 2, 5, 3).reshape(B, X * r, Y * r, Cr2 // (r * r))


def pixel_unshuffle(x_BXYC: jax.Array, r: int) -> jax.Array:
  """The inverse of `pixel_shuffle` (space-to-depth, torch.nn.PixelUnshuffle's order):
  (B, X r, Y r, C) -> (B, X, Y, C r^2), y[b, x, y, c r^2 + i r + j] = x[b, x r + i, y r + j, c]."""
  B, Xr, Yr, C = x_BXYC.shape
  if r < 1 or Xr % r or Yr % r:
    raise ValueError(f'pixel_unshuffle r={r} of a {Xr}x{Yr} image; expected r >= 1 dividing '
                     f'both spatial sizes')
  x_BXIYJC = x_BXYC.reshape(B, Xr // r, r, Yr // r, r, C)
  return x_BXIYJC.transpose(0, 1, 3, 5, 2, 4).reshape(B, Xr // r, Yr // r, C * r * r)


def conv_transpose_specs(kernel: int, c_in: int, c_out: int, *, stride: int = 1,
                         bias: bool = True, std: float | None = None) -> dict:
  """Parameters: w_XYCO (kernel, kernel, c_in, c_out), laid out as lab.nn.conv's (torch's
  ConvTranspose2d weight (c_in, c_out, k, k) is w_XYCO.transpose(2, 3, 0, 1)), and b_O. The default
  std is 1 / sqrt(fan_in) with fan_in = c_in ceil(kernel / stride)^2, the most input pixels that
  reach one output pixel."""
  fan_in = c_in * math.ceil(kernel / stride) ** 2
  std = 1.0 / math.sqrt(fan_in) if std is None else std
  specs = {'w': ps.ParamSpec((kernel, kernel, c_in, c_out), ps.normal(std),
                             (None, None, 'conv_in', 'conv_out'))}
  if bias:
    specs['b'] = ps.ParamSpec((c_out,), ps.zeros, ('conv_out',))
  return specs


def conv_transpose_size(size: int, kernel: int, *, stride: int, padding: int = 0,
                        output_padding: int = 0, dilation: int = 1) -> int:
  """Output length of a transposed convolution (Dumoulin & Visin 2016, relationship 14, with a
  dilated kernel): o = s (i - 1) + d (k - 1) + 1 - 2 p + output_padding, as torch computes it."""
  return stride * (size - 1) + dilation * (kernel - 1) + 1 - 2 * padding + output_padding


def _check_transpose_args(name: str, stride: int, padding: int, output_padding: int,
                          dilation: int) -> None:
  if stride < 1 or dilation < 1 or padding < 0:
    raise ValueError(f'{name} stride={stride} dilation={dilation} padding={padding}; expected '
                     f'stride, dilation >= 1 and padding >= 0')
  if not 0 <= output_padding < max(stride, dilation):
    raise ValueError(f'{name} output_padding={output_padding}; expected 0 <= it < '
                     f'max(stride, dilation) = {max(stride, dilation)}')


def conv_transpose2d(p: dict, x_BXYC: jax.Array, *, stride: int, padding: int = 0,
                     output_padding: int = 0, dilation: int = 1) -> jax.Array:
  """Transposed convolution, y[b, s x + d i - p, s y + d j - p, o] += x[b, x, y, c] w[i, j, c, o],
  plus b_O; `output_padding` extra rows and columns at the high end (torch.nn.ConvTranspose2d's
  semantics, channels last). Computed as relationship 14 of Dumoulin & Visin 2016: a stride-1
  convolution with the flipped kernel over the input with s - 1 zeros between pixels, padded by
  d (k - 1) - p (plus output_padding at the high end). x_BXYC -> y_BXYO."""
  k = p['w'].shape[0]
  _check_transpose_args('conv_transpose2d', stride, padding, output_padding, dilation)
  sizes = [conv_transpose_size(n, k, stride=stride, padding=padding,
                               output_padding=output_padding, dilation=dilation)
           for n in x_BXYC.shape[1:3]]
  if min(sizes) < 1:
    raise ValueError(f'conv_transpose2d of a {x_BXYC.shape[1:3]} input gives a {sizes} output; '
                     f'expected a positive size (padding={padding} is too large)')
  edge = dilation * (k - 1) - padding
  y_BXYO = jax.lax.conv_general_dilated(
      x_BXYC, p['w'][::-1, ::-1].astype(x_BXYC.dtype), window_strides=(1, 1),
      padding=[(edge, edge + output_padding)] * 2, lhs_dilation=(stride, stride),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y_BXYO + p['b'].astype(x_BXYC.dtype) if 'b' in p else y_BXYO


def _phases_and_offsets(kernel: int, stride: int, padding: int, dilation: int):
  """For each tap t of a 1-D transposed kernel: the output phase q_t in [0, s) it writes and the
  input offset e_t it reads, so that y[s m + q_t] gets x[m + e_t] w[t]. From s i + d t - p =
  s m + q: q_t = (d t - p) mod s and e_t = (q_t + p - d t) / s (s stride, d dilation, p padding)."""
  t = np.arange(kernel)
  q_t = (dilation * t - padding) % stride
  return q_t, (q_t + padding - dilation * t) // stride


def transposed_to_subpixel_kernel(w_XYCO: jax.Array, *, stride: int, padding: int = 0,
                                  output_padding: int = 0, dilation: int = 1):
  """Rearranges a transposed-convolution kernel into the stride-1 kernel of the equivalent
  sub-pixel convolution (Shi et al. 2016b, arXiv 1609.07009): returns w_sub_XYCO (k', k', C,
  O r^2) and the padding (lo, hi) of that convolution, so that with r = stride and L the
  transposed output size (`conv_transpose_size`),
    conv_transpose2d({'w': w, 'b': b}, x) ==
        pixel_shuffle(conv2d({'w': w_sub_XYCO, 'b': repeat(b, r^2)}, pad(x, lo, hi), 'VALID'),
                      r)[:, :L, :L]
  (the crop removes fewer than r trailing rows and columns, none when r divides L; a negative pad
  crops). Tap (i, j) of w moves to position (e_i + lo, e_j + lo) and channel o r^2 + q_i r + q_j of
  w_sub_XYCO, with the phase q and offset e of `_phases_and_offsets`; every other entry is zero."""
  _check_transpose_args('transposed_to_subpixel_kernel', stride, padding, output_padding,
                        dilation)
  k, _, C, O = w_XYCO.shape
  r = stride
  q_t, e_t = _phases_and_offsets(k, r, padding, dilation)
  lo = -int(e_t.min())
  k_sub = int(e_t.max()) + lo + 1
  # M = ceil(L / r) low-resolution outputs: M - (input size) = ceil((L - r (i - 1)) / r) - 1.
  extra = -((2 * padding - dilation * (k - 1) - output_padding - 1) // r) - 1
  hi = k_sub - 1 - lo + extra
  v_t = e_t + lo
  w_sub_XYIJCO = jnp.zeros((k_sub, k_sub, r, r, C, O), w_XYCO.dtype).at[
      v_t[:, None], v_t[None, :], q_t[:, None], q_t[None, :]].set(w_XYCO)
  w_sub_XYCO = w_sub_XYIJCO.transpose(0, 1, 4, 5, 2, 3).reshape(k_sub, k_sub, C, O * r * r)
  return w_sub_XYCO, (lo, hi)
