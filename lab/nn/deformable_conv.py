"""Deformable convolution v1 (Dai et al. 2017, "Deformable Convolutional Networks", arXiv
1703.06211) and v2 (Zhu et al. 2019, "Deformable ConvNets v2: More Deformable, Better Results",
arXiv 1811.11168) over channels-last images.

v1, eq. 2: y(p0) = sum_{p_n in R} w(p_n) x(p0 + p_n + dp_n), with R the k x k grid of taps
(spaced by the dilation) and p0 = stride * (output position) - padding. x at a fractional point p
is bilinear, eqs. 3-4: x(p) = sum_q G(q, p) x(q), G(q, p) = g(q_x, p_x) g(q_y, p_y),
g(a, b) = max(0, 1 - |a - b|), the sum running over the pixels q of the image only, so the image
is zero outside. v2, eq. 1: y(p0) = sum_k w_k x(p0 + p_k + dp_k) dm_k with modulation scalars
dm_k in [0, 1]. With G offset groups (deformable groups) the C channels split into G contiguous
groups of C / G, each with its own offsets and masks.

Layout (torchvision.ops.deform_conv2d's, channels last): offset_BXYO has 2 G k^2 channels;
channel 2 (g k^2 + i k + j) moves tap (i, j) of group g along the first spatial axis (X here: the
rows, torchvision's 'y' / height) and channel 2 (g k^2 + i k + j) + 1 along the second (Y: the
columns, torchvision's 'x' / width), i.e. (y, x) pairs. mask_BXYO has G k^2 channels, channel
g k^2 + i k + j.

The layer (`deformable_conv2d`) predicts the offsets, and for v2 the mask logits (masks =
sigmoid), with regular convolutions over the input of the same kernel, stride, padding and
dilation, zero-initialised as both papers do: an untrained v1 layer is the plain convolution,
and an untrained v2 layer, with every mask sigmoid(0) = 0.5, is half of it plus the bias (Zhu et
al. 2019, sec. 3.2).

Letters beyond DESIGN.md: R the k^2 taps of the grid R; G offset groups; c the C / G channels of
one group; O output channels. Output positions use X, Y as the input's do.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lab.nn import conv
from lab.nn import param_spec as ps


def deformable_conv_specs(kernel: int, c_in: int, c_out: int, *, offset_groups: int = 1,
                          modulated: bool = False, bias: bool = True,
                          std: float | None = None) -> dict:
  """Parameters: w_XYCO and b_O as lab.nn.conv.conv_specs gives them; 'offset', the conv to
  2 G k^2 offset channels, and for v2 (`modulated`) 'mask', the conv to G k^2 mask logits, both
  zero-initialised."""
  if offset_groups < 1 or c_in % offset_groups:
    raise ValueError(f'deformable_conv_specs offset_groups={offset_groups}; expected a positive '
                     f'divisor of c_in={c_in}')
  zero = lambda specs: {k: dataclasses.replace(s, init=ps.zeros) for k, s in specs.items()}
  taps = offset_groups * kernel * kernel
  specs = conv.conv_specs(kernel, c_in, c_out, bias=bias, std=std)
  specs['offset'] = zero(conv.conv_specs(kernel, c_in, 2 * taps))
  if modulated:
    specs['mask'] = zero(conv.conv_specs(kernel, c_in, taps))
  return specs


def _output_size(n: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
  return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _bilinear(x_BXYGc: jax.Array, px_BXYGR: jax.Array, py_BXYGR: jax.Array) -> jax.Array:
  """x at the fractional points (px, py) of each example and group by Dai et al. 2017, eqs. 3-4:
  only the four pixels around p have G(q, p) != 0, and those outside the image count as zero.
  x_BXYGc, p_BXYGR (output positions X, Y) -> x(p)_BXYGRc."""
  B, X, Y, G, _ = x_BXYGc.shape
  x0_BXYGR, y0_BXYGR = jnp.floor(px_BXYGR), jnp.floor(py_BXYGR)
  fx_BXYGR, fy_BXYGR = px_BXYGR - x0_BXYGR, py_BXYGR - y0_BXYGR
  b_B1111 = jnp.arange(B).reshape(B, 1, 1, 1, 1)
  g_111G1 = jnp.arange(G).reshape(1, 1, 1, G, 1)
  out_BXYGRc = 0.0
  for qx_BXYGR, gx_BXYGR in ((x0_BXYGR, 1 - fx_BXYGR), (x0_BXYGR + 1, fx_BXYGR)):
    for qy_BXYGR, gy_BXYGR in ((y0_BXYGR, 1 - fy_BXYGR), (y0_BXYGR + 1, fy_BXYGR)):
      inside = (qx_BXYGR >= 0) & (qx_BXYGR < X) & (qy_BXYGR >= 0) & (qy_BXYGR < Y)
      ix_BXYGR = jnp.clip(qx_BXYGR, 0, X - 1).astype(jnp.int32)
      iy_BXYGR = jnp.clip(qy_BXYGR, 0, Y - 1).astype(jnp.int32)
      kernel_BXYGR = jnp.where(inside, gx_BXYGR * gy_BXYGR, 0.0).astype(x_BXYGc.dtype)
      q_BXYGRc = x_BXYGc[b_B1111, ix_BXYGR, iy_BXYGR, g_111G1]  # one gather per corner
      out_BXYGRc = out_BXYGRc + kernel_BXYGR[..., None] * q_BXYGRc
  return out_BXYGRc


def deform_conv2d(p: dict, x_BXYC: jax.Array, offset_BXYO: jax.Array,
                  mask_BXYO: jax.Array | None = None, *, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> jax.Array:
  """Deformable convolution with given offsets (Dai et al. 2017, eq. 2) and, when mask_BXYO is
  given, modulation (Zhu et al. 2019, eq. 1): y(p0) = sum_n w(p_n) x(p0 + p_n + dp_n) dm_n + b.
  p holds w_XYCO (k, k, C, O) and optionally b_O; offset_BXYO (B, X', Y', 2 G k^2) and mask_BXYO
  (B, X', Y', G k^2) in the module docstring's layout, X', Y' the output size; padding is an int
  (each side). x_BXYC -> y_BXYO."""
  w_XYCO, x_BXYC = jnp.asarray(p['w']), jnp.asarray(x_BXYC)
  k, _, C, O = w_XYCO.shape
  B, X, Y, _ = x_BXYC.shape
  if stride < 1 or dilation < 1 or not isinstance(padding, int) or padding < 0:
    raise ValueError(f'deform_conv2d stride={stride} dilation={dilation} padding={padding!r}; '
                     f'expected stride, dilation >= 1 and an int padding >= 0')
  Xo, Yo = (_output_size(n, k, stride, padding, dilation) for n in (X, Y))
  R = k * k
  G = offset_BXYO.shape[-1] // (2 * R)
  if x_BXYC.shape[-1] != C or Xo < 1 or Yo < 1:
    raise ValueError(f'deform_conv2d input {x_BXYC.shape} with kernel {w_XYCO.shape}; expected '
                     f'{C} channels and a positive output size (got {Xo}x{Yo})')
  if G < 1 or C % G or offset_BXYO.shape != (B, Xo, Yo, 2 * G * R):
    raise ValueError(f'deform_conv2d offset shape {offset_BXYO.shape}; expected (B, X, Y, 2 G k^2)'
                     f' = ({B}, {Xo}, {Yo}, {2 * R} G) with G dividing the {C} channels')
  if mask_BXYO is not None and mask_BXYO.shape != (B, Xo, Yo, G * R):
    raise ValueError(f'deform_conv2d mask shape {mask_BXYO.shape}; expected '
                     f'{(B, Xo, Yo, G * R)} (G={G} offset groups of {R} taps)')
  dtype = jnp.promote_types(x_BXYC.dtype, jnp.float32)
  off_BXYGR2 = offset_BXYO.reshape(B, Xo, Yo, G, R, 2).astype(dtype)
  i_R, j_R = jnp.arange(R) // k, jnp.arange(R) % k
  base_x_XR = (stride * jnp.arange(Xo) - padding)[:, None] + dilation * i_R
  base_y_YR = (stride * jnp.arange(Yo) - padding)[:, None] + dilation * j_R
  px_BXYGR = base_x_XR[None, :, None, None, :] + off_BXYGR2[..., 0]
  py_BXYGR = base_y_YR[None, None, :, None, :] + off_BXYGR2[..., 1]
  v_BXYGRc = _bilinear(x_BXYC.reshape(B, X, Y, G, C // G), px_BXYGR, py_BXYGR)
  if mask_BXYO is not None:
    v_BXYGRc = v_BXYGRc * mask_BXYO.reshape(B, Xo, Yo, G, R, 1).astype(x_BXYC.dtype)
  w_RGcO = w_XYCO.reshape(R, G, C // G, O).astype(x_BXYC.dtype)
  y_BXYO = jnp.einsum('BXYGRc,RGcO->BXYO', v_BXYGRc, w_RGcO)
  return y_BXYO + p['b'].astype(x_BXYC.dtype) if 'b' in p else y_BXYO


def deformable_conv2d(p: dict, x_BXYC: jax.Array, *, stride: int = 1, padding: int = 0,
                      dilation: int = 1) -> jax.Array:
  """The deformable layer, v1 or (when p has 'mask') v2: offset_BXYO = conv_offset(x) and
  mask_BXYO = sigmoid(conv_mask(x)) (Zhu et al. 2019, sec. 3.2), then `deform_conv2d`. p is what
  `deformable_conv_specs` describes; the offset groups follow from p['offset']'s channels.
  x_BXYC -> y_BXYO."""
  regular = lambda q: conv.conv2d(q, x_BXYC, stride=stride, padding=padding, dilation=dilation)
  offset_BXYO = regular(p['offset'])
  mask_BXYO = jax.nn.sigmoid(regular(p['mask'])) if 'mask' in p else None
  return deform_conv2d(p, x_BXYC, offset_BXYO, mask_BXYO, stride=stride, padding=padding,
                       dilation=dilation)
