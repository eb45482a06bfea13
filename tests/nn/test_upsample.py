"""PixelShuffle, its inverse and the transposed convolution against torch (2.13, CPU), values and
gradients; and the sub-pixel / transposed-convolution equivalence of Shi et al. 2016b."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lab.nn import conv, upsample
from lab.nn import param_spec as ps


def nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize('r, c', [(1, 3), (2, 1), (2, 3), (3, 2)])
def test_pixel_shuffle_matches_torch(r, c):
  x_BXYC = np.random.default_rng(r * 10 + c).standard_normal((2, 3, 4, c * r * r), np.float32)
  want = nhwc(torch.nn.PixelShuffle(r)(nchw(x_BXYC)))
  got = upsample.pixel_shuffle(jnp.asarray(x_BXYC), r)
  assert got.shape == (2, 3 * r, 4 * r, c)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('r, c', [(2, 1), (2, 3), (3, 2)])
def test_pixel_unshuffle_matches_torch_and_inverts(r, c):
  x_BXYC = np.random.default_rng(r + c).standard_normal((2, 3 * r, 2 * r, c), np.float32)
  want = nhwc(torch.nn.PixelUnshuffle(r)(nchw(x_BXYC)))
  got = upsample.pixel_unshuffle(jnp.asarray(x_BXYC), r)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(upsample.pixel_shuffle(got, r), x_BXYC)


def test_shuffle_rejects_bad_shapes():
  with pytest.raises(ValueError, match='r=2 with 6 channels'):
    upsample.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)
  with pytest.raises(ValueError, match='r=2 of a 3x4 image'):
    upsample.pixel_unshuffle(jnp.zeros((1, 3, 4, 1)), 2)


def draw_transposed(seed, k, c_in, c_out, size=(4, 5)):
  """x_BXYC, w_XYCO, b_O rounded to float32 so torch and jax see the same numbers."""
  rng = np.random.default_rng(seed)
  x_BXYC = rng.standard_normal((2, *size, c_in)).astype(np.float32)
  w_XYCO = rng.standard_normal((k, k, c_in, c_out)).astype(np.float32)
  return rng, x_BXYC, w_XYCO, rng.standard_normal(c_out).astype(np.float32)


TRANSPOSED_CASES = [  # kernel, stride, padding, output_padding, dilation, c_in, c_out
    (3, 1, 0, 0, 1, 2, 3), (3, 2, 1, 1, 1, 2, 3), (4, 2, 1, 0, 1, 3, 2), (5, 3, 2, 2, 1, 1, 2),
    (2, 3, 0, 1, 1, 2, 2), (3, 2, 0, 2, 3, 2, 1), (1, 2, 0, 0, 1, 3, 2), (4, 4, 3, 0, 1, 1, 1)]


@pytest.mark.parametrize('k, s, p, a, d, c_in, c_out', TRANSPOSED_CASES)
def test_conv_transpose_matches_torch_values_and_vjp(k, s, p, a, d, c_in, c_out):
  rng, x_BXYC, w_XYCO, b_O = draw_transposed(k * 100 + s * 10 + p, k, c_in, c_out)
  layer = torch.nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=p, output_padding=a,
                                   dilation=d)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(w_XYCO.transpose(2, 3, 0, 1)))
    layer.bias.copy_(torch.from_numpy(b_O))
  x_t = nchw(x_BXYC).requires_grad_(True)
  y_t = layer(x_t)
  ct_BXYO = rng.standard_normal(nhwc(y_t).shape).astype(np.float32)
  y_t.backward(nchw(ct_BXYO))

  f = lambda p_, x: upsample.conv_transpose2d(p_, x, stride=s, padding=p, output_padding=a,
                                              dilation=d)
  params = {'w': jnp.asarray(w_XYCO), 'b': jnp.asarray(b_O)}
  y_BXYO, vjp = jax.vjp(f, params, jnp.asarray(x_BXYC))
  assert y_BXYO.shape[1:3] == tuple(
      upsample.conv_transpose_size(n, k, stride=s, padding=p, output_padding=a, dilation=d)
      for n in x_BXYC.shape[1:3])
  np.testing.assert_allclose(y_BXYO, nhwc(y_t), rtol=1e-5, atol=1e-5)
  g_params, g_x = vjp(jnp.asarray(ct_BXYO))
  np.testing.assert_allclose(g_x, nhwc(x_t.grad), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(g_params['w'], layer.weight.grad.numpy().transpose(2, 3, 0, 1),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(g_params['b'], layer.bias.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_conv_transpose_rejects_bad_arguments():
  p = {'w': jnp.zeros((3, 3, 1, 1))}
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError, match='output_padding=2'):
    upsample.conv_transpose2d(p, x, stride=2, output_padding=2)
  with pytest.raises(ValueError, match='stride=0'):
    upsample.conv_transpose2d(p, x, stride=0)
  with pytest.raises(ValueError, match='padding=9 is too large'):
    upsample.conv_transpose2d(p, jnp.zeros((1, 1, 1, 1)), stride=1, padding=9)
  with pytest.raises(ValueError, match='transposed_to_subpixel_kernel output_padding=3'):
    upsample.transposed_to_subpixel_kernel(p['w'], stride=3, output_padding=3)


def test_conv_transpose_specs():
  specs = upsample.conv_transpose_specs(4, 3, 5, stride=2)
  assert specs['w'].shape == (4, 4, 3, 5) and specs['w'].axes == (None, None, 'conv_in',
                                                                 'conv_out')
  assert specs['b'].axes == ('conv_out',) and ps.count(specs) == 4 * 4 * 3 * 5 + 5
  w = ps.init(specs, jax.random.key(0))['w']
  # fan_in = c_in ceil(k / s)^2 = 12: std 1 / sqrt(12), checked over 240 draws to 25%.
  assert abs(float(jnp.std(w)) * np.sqrt(12) - 1) < 0.25


SUBPIXEL_CASES = [  # kernel, stride (= r), padding, output_padding, dilation, c_in, c_out
    (4, 2, 1, 0, 1, 3, 2), (2, 2, 0, 0, 1, 2, 3), (6, 3, 0, 0, 1, 1, 2), (3, 2, 1, 1, 1, 2, 2),
    (5, 2, 2, 1, 1, 2, 1), (3, 3, 0, 0, 1, 2, 2), (7, 4, 3, 3, 1, 1, 3), (3, 2, 2, 1, 2, 2, 2),
    (1, 3, 0, 2, 1, 2, 2), (4, 2, 3, 0, 1, 1, 1)]


@pytest.mark.parametrize('k, r, p, a, d, c_in, c_out', SUBPIXEL_CASES)
def test_transposed_conv_equals_subpixel_conv(x64, k, r, p, a, d, c_in, c_out):
  """Shi et al. 2016b: the stride-r transposed convolution is a stride-1 convolution to r^2 C
  channels (kernel rearranged by transposed_to_subpixel_kernel) followed by PixelShuffle."""
  _, x_BXYC, w_XYCO, b_O = draw_transposed(k + r + p, k, c_in, c_out, size=(5, 4))
  x_BXYC, w_XYCO, b_O = (jnp.asarray(v, jnp.float64) for v in (x_BXYC, w_XYCO, b_O))
  want = upsample.conv_transpose2d({'w': w_XYCO, 'b': b_O}, x_BXYC, stride=r, padding=p,
                                   output_padding=a, dilation=d)
  w_sub, (lo, hi) = upsample.transposed_to_subpixel_kernel(
      w_XYCO, stride=r, padding=p, output_padding=a, dilation=d)
  assert w_sub.shape[2:] == (c_in, c_out * r * r)
  # Every tap of w lands in exactly one place of w_sub.
  np.testing.assert_array_equal(np.sort(np.asarray(w_sub)[np.asarray(w_sub) != 0]),
                                np.sort(np.asarray(w_XYCO).ravel()))
  pads = ((0, 0, 0), (lo, hi, 0), (lo, hi, 0), (0, 0, 0))
  z_BXYC = conv.conv2d({'w': w_sub, 'b': jnp.repeat(b_O, r * r)},
                       jax.lax.pad(x_BXYC, 0.0, pads), padding='VALID')
  got = upsample.pixel_shuffle(z_BXYC, r)
  L_X, L_Y = want.shape[1:3]
  assert 0 <= got.shape[1] - L_X < r and 0 <= got.shape[2] - L_Y < r
  np.testing.assert_allclose(got[:, :L_X, :L_Y], want, rtol=1e-12, atol=1e-12)


def test_espcn_case_is_a_same_padded_3x3_conv():
  """The classic case: a 4x4 stride-2 padding-1 transposed kernel is a 3x3 conv with padding 1
  (Shi et al. 2016b, fig. 3's 4x4 -> four 2x2 sub-kernels inside a 3x3 window)."""
  w_sub, pad = upsample.transposed_to_subpixel_kernel(jnp.ones((4, 4, 1, 1)), stride=2, padding=1)
  assert w_sub.shape == (3, 3, 1, 4) and pad == (1, 1)
  # Phase (i, j) uses a 2x2 sub-kernel: the taps with row parity (i + 1) mod 2.
  taps_XYIJ = np.asarray(w_sub).reshape(3, 3, 2, 2)
  assert (taps_XYIJ.sum((0, 1)) == 4).all()
  np.testing.assert_array_equal(taps_XYIJ[..., 0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  np.testing.assert_array_equal(taps_XYIJ[..., 1, 1], [[0, 0, 0], [0, 1, 1], [0, 1, 1]])
