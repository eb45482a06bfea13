"""Deformable convolution v1/v2: zero and integer offsets against lab.nn.conv.conv2d, fractional
offsets against a float64 NumPy loop over every sample with eq. 3's bilinear kernel summed over
the whole image, the layer's offset convs against torch, and gradients by finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from lab.nn import conv, deformable_conv as dc
from lab.nn import param_spec as ps


def np_deform_conv(x_BXYC, w_XYCO, b_O, offset_BXYO, mask_BXYO, stride, padding, dilation):
  """Dai et al. 2017, eqs. 2-4 (and Zhu et al. 2019, eq. 1 when mask_BXYO is given), one output
  position, group and tap at a time: x(p) = sum_q g(q_x, p_x) g(q_y, p_y) x(q) over every image
  pixel q, g(a, b) = max(0, 1 - |a - b|); offsets in torchvision's (y, x) = (X, Y) order."""
  B, X, Y, C = x_BXYC.shape
  k, O = w_XYCO.shape[0], w_XYCO.shape[-1]
  Xo, Yo = ((n + 2 * padding - dilation * (k - 1) - 1) // stride + 1 for n in (X, Y))
  G = offset_BXYO.shape[-1] // (2 * k * k)
  c = C // G
  g_ = lambda q, p: np.maximum(0.0, 1.0 - np.abs(q - p))
  y_BXYO = np.zeros((B, Xo, Yo, O)) + (0.0 if b_O is None else b_O)
  for b, ox, oy, g, i, j in np.ndindex(B, Xo, Yo, G, k, k):
    n = g * k * k + i * k + j
    px = stride * ox - padding + dilation * i + offset_BXYO[b, ox, oy, 2 * n]
    py = stride * oy - padding + dilation * j + offset_BXYO[b, ox, oy, 2 * n + 1]
    G_XY = np.outer(g_(np.arange(X), px), g_(np.arange(Y), py))
    v_c = np.einsum('XY,XYc->c', G_XY, x_BXYC[b, :, :, g * c:(g + 1) * c])
    m = 1.0 if mask_BXYO is None else mask_BXYO[b, ox, oy, n]
    y_BXYO[b, ox, oy] += m * v_c @ w_XYCO[i, j, g * c:(g + 1) * c]
  return y_BXYO


def out_size(n, k, s, p, d):
  return (n + 2 * p - d * (k - 1) - 1) // s + 1


def draw(seed, k, C, O, size=(6, 5), B=2):
  rng = np.random.default_rng(seed)
  round32 = lambda a: a.astype(np.float32).astype(np.float64)
  return (rng, round32(rng.standard_normal((B, *size, C))),
          round32(rng.standard_normal((k, k, C, O)) / k), round32(rng.standard_normal(O)))


def dilated(w_XYCO, d):
  """The k x k kernel spread over d (k - 1) + 1 pixels, zeros between taps (for conv2d)."""
  k = w_XYCO.shape[0]
  out = np.zeros((d * (k - 1) + 1,) * 2 + w_XYCO.shape[2:])
  out[::d, ::d] = w_XYCO
  return out


CASES = [  # kernel, stride, padding, dilation, offset groups, C, O
    (3, 1, 1, 1, 1, 2, 3), (3, 2, 1, 1, 2, 4, 2), (3, 1, 2, 2, 2, 2, 2), (2, 1, 0, 1, 1, 3, 2),
    (1, 2, 0, 1, 3, 3, 1), (3, 2, 0, 2, 1, 2, 2)]


@pytest.mark.parametrize('k, s, p, d, G, C, O', CASES)
def test_zero_offsets_equal_plain_conv(x64, k, s, p, d, G, C, O):
  _, x_BXYC, w_XYCO, b_O = draw(k + s + p + d, k, C, O)
  Xo, Yo = (out_size(n, k, s, p, d) for n in x_BXYC.shape[1:3])
  zeros = np.zeros((2, Xo, Yo, 2 * G * k * k))
  ones = np.ones((2, Xo, Yo, G * k * k))
  f = jax.jit(lambda *a: dc.deform_conv2d(*a, stride=s, padding=p, dilation=d))
  want = conv.conv2d({'w': dilated(w_XYCO, d), 'b': b_O}, x_BXYC, stride=s, padding=p)
  for mask in (None, ones):
    got = f({'w': w_XYCO, 'b': b_O}, x_BXYC, zeros, mask)
    assert got.dtype == jnp.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_untrained_layer_is_plain_conv():
  """Zero-initialised offset convs: offsets 0, masks sigmoid(0) = 1/2 (Zhu et al. 2019); the v1
  layer is the v2 one without its 'mask' conv."""
  specs = dc.deformable_conv_specs(3, 4, 5, offset_groups=2, modulated=True)
  assert specs['offset']['w'].shape == (3, 3, 4, 36) and specs['mask']['w'].shape == (3, 3, 4, 18)
  assert 'mask' not in dc.deformable_conv_specs(3, 4, 5, offset_groups=2)
  params = ps.init(specs, jax.random.key(0))
  assert specs['w'].shape == params['w'].shape == (3, 3, 4, 5) and jnp.any(params['w'])
  assert not any(jnp.any(a) for a in jax.tree.leaves((params['offset'], params['mask'])))
  rng = np.random.default_rng(1)
  params['b'] = jnp.asarray(rng.standard_normal(5), jnp.float32)
  x_BXYC = jnp.asarray(rng.standard_normal((2, 6, 7, 4)), jnp.float32)
  plain = conv.conv2d({'w': params['w']}, x_BXYC, stride=2, padding=1)
  v1 = {k: v for k, v in params.items() if k != 'mask'}
  layer = jax.jit(lambda p_, x: dc.deformable_conv2d(p_, x, stride=2, padding=1))
  for p_, scale in ((v1, 1.0), (params, 0.5)):
    got = layer(p_, x_BXYC)
    np.testing.assert_allclose(got, scale * plain + params['b'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('k, s, p, d, G, C, O', CASES[:3])
def test_integer_offsets_equal_shifted_conv(k, s, p, d, G, C, O):
  """A constant integer offset (a_g, b_g) per group samples x(p0 + p_n + (a_g, b_g)): a 'VALID'
  plain convolution of z, the zero-padded image whose group-g channels are shifted by
  (-a_g, -b_g), z[u, v] = x[u - p + a_g, v - p + b_g] (zero outside x)."""
  rng, x_BXYC, w_XYCO, b_O = draw(7 * k + s, k, C, O)
  B, X, Y, _ = x_BXYC.shape
  Xo, Yo = out_size(X, k, s, p, d), out_size(Y, k, s, p, d)
  shifts = rng.integers(-2, 3, (G, 2))
  offset_BXYGR2 = np.broadcast_to(shifts[:, None, :], (B, Xo, Yo, G, k * k, 2))
  m = p + 2  # margin: padding plus the largest shift
  wide_BXYC = np.pad(x_BXYC, ((0, 0), (m, m), (m, m), (0, 0)))
  z_BXYC = np.zeros((B, X + 2 * p, Y + 2 * p, C))
  c = C // G
  for g, (a, b) in enumerate(shifts):
    z_BXYC[..., g * c:(g + 1) * c] = wide_BXYC[:, m - p + a:m - p + a + X + 2 * p,
                                               m - p + b:m - p + b + Y + 2 * p, g * c:(g + 1) * c]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  f = jax.jit(lambda *a: dc.deform_conv2d(*a, stride=s, padding=p, dilation=d))
  got = f({'w': f32(w_XYCO), 'b': f32(b_O)}, f32(x_BXYC), f32(offset_BXYGR2.reshape(B, Xo, Yo, -1)))
  want = conv.conv2d({'w': f32(dilated(w_XYCO, d)), 'b': f32(b_O)}, f32(z_BXYC), stride=s,
                     padding='VALID')
  assert np.abs(shifts).max() > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('modulated', [False, True])
@pytest.mark.parametrize('k, s, p, d, G, C, O', CASES[:4])
def test_fractional_offsets_match_numpy_loops(k, s, p, d, G, C, O, modulated):
  rng, x_BXYC, w_XYCO, b_O = draw(11 * k + d, k, C, O)
  Xo, Yo = (out_size(n, k, s, p, d) for n in x_BXYC.shape[1:3])
  # Offsets up to 3 pixels: many samples fall partly or wholly outside the image.
  offset_BXYO = rng.uniform(-3, 3, (2, Xo, Yo, 2 * G * k * k)).astype(np.float32)
  mask_BXYO = rng.uniform(0, 1, (2, Xo, Yo, G * k * k)).astype(np.float32) if modulated else None
  f = jax.jit(lambda *a: dc.deform_conv2d(*a, stride=s, padding=p, dilation=d))
  got = f({'w': jnp.asarray(w_XYCO, jnp.float32), 'b': jnp.asarray(b_O, jnp.float32)},
          jnp.asarray(x_BXYC, jnp.float32), offset_BXYO, mask_BXYO)
  want = np_deform_conv(x_BXYC, w_XYCO, b_O, offset_BXYO.astype(np.float64),
                        None if mask_BXYO is None else mask_BXYO.astype(np.float64), s, p, d)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('modulated', [False, True])
def test_layer_matches_torch_offset_conv_and_numpy_loops(modulated):
  """The layer with trained-looking (random) offset and mask convs: offsets and mask logits by
  torch.nn.functional.conv2d in float64, then the NumPy loop oracle."""
  k, s, p, d, G, C, O = 3, 2, 2, 2, 2, 4, 3
  rng, x_BXYC, w_XYCO, b_O = draw(5, k, C, O, size=(7, 6))
  specs = dc.deformable_conv_specs(k, C, O, offset_groups=G, modulated=modulated)
  params = jax.tree.map(lambda s_: rng.standard_normal(s_.shape).astype(np.float32), specs,
                        is_leaf=ps.is_spec)
  params.update(w=w_XYCO.astype(np.float32), b=b_O.astype(np.float32))

  def torch_conv(q):
    y = torch.nn.functional.conv2d(
        torch.from_numpy(x_BXYC.transpose(0, 3, 1, 2)),
        torch.from_numpy(q['w'].astype(np.float64).transpose(3, 2, 0, 1)),
        torch.from_numpy(q['b'].astype(np.float64)), stride=s, padding=p, dilation=d)
    return y.numpy().transpose(0, 2, 3, 1)

  offset_BXYO = torch_conv(params['offset'])
  mask_BXYO = 1 / (1 + np.exp(-torch_conv(params['mask']))) if modulated else None
  want = np_deform_conv(x_BXYC, w_XYCO, b_O, offset_BXYO, mask_BXYO, s, p, d)
  got = jax.jit(lambda q, x: dc.deformable_conv2d(q, x, stride=s, padding=p, dilation=d))(
      params, jnp.asarray(x_BXYC, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_offset_and_mask_layout_follows_torchvision():
  """Channel 2n moves tap n along X (rows, torchvision's y), 2n + 1 along Y (columns, its x);
  group g owns offset channels 2 k^2 g .. 2 k^2 (g + 1) - 1 and mask channels k^2 g + n."""
  x_BXYC = np.zeros((1, 6, 6, 2), np.float32)
  x_BXYC[0, 3, 1, 1] = 1.0  # a single lit pixel in group 1's channel
  w_XYCO = np.zeros((3, 3, 2, 1), np.float32)
  w_XYCO[0, 0] = 1.0  # only tap n = 0, (i, j) = (0, 0): samples x(o - 1 + dp) with padding 1
  offset_BXYO = np.zeros((1, 6, 6, 36), np.float32)
  mask_BXYO = np.ones((1, 6, 6, 18), np.float32)
  f = jax.jit(lambda off, m: dc.deform_conv2d({'w': w_XYCO}, x_BXYC, off, m, padding=1))
  conv_ = lambda off, m=mask_BXYO: np.asarray(f(off, m))[0, :, :, 0]
  assert np.argwhere(conv_(offset_BXYO)).tolist() == [[4, 2]]
  along_x = offset_BXYO.copy()
  along_x[..., 18] = 1.0  # group 1, tap 0, first (y / X) component
  assert np.argwhere(conv_(along_x)).tolist() == [[3, 2]]
  along_y = offset_BXYO.copy()
  along_y[..., 19] = -1.0  # group 1, tap 0, second (x / Y) component
  assert np.argwhere(conv_(along_y)).tolist() == [[4, 3]]
  group0 = offset_BXYO.copy()
  group0[..., 0] = 1.0  # group 0's offset leaves group 1's channel alone
  assert np.argwhere(conv_(group0)).tolist() == [[4, 2]]
  half = mask_BXYO.copy()
  half[..., 9] = 0.25  # group 1, tap 0
  np.testing.assert_array_equal(conv_(offset_BXYO, half)[4, 2], 0.25)


@pytest.mark.parametrize('modulated, s, p, d', [(True, 2, 1, 1), (False, 1, 1, 2)])
def test_gradients_match_finite_differences(x64, modulated, s, p, d):
  """d/d(x, w, b, offsets, masks) in float64 against central differences (check_grads, reverse
  mode); every sample point sits 0.25 to 0.75 px off the integer grid, where bilinear sampling is
  smooth."""
  k, G, C, O = 3, 2, 4, 2
  rng, x_BXYC, w_XYCO, b_O = draw(3 + s + d, k, C, O, size=(5, 5), B=1)
  Xo, Yo = (out_size(n, k, s, p, d) for n in x_BXYC.shape[1:3])
  shape = (1, Xo, Yo, 2 * G * k * k)
  frac = rng.choice([-1, 1], shape) * rng.uniform(0.25, 0.75, shape)
  args = [{'w': w_XYCO, 'b': b_O}, x_BXYC, rng.integers(-2, 2, shape) + frac]
  if modulated:
    args.append(rng.uniform(0.1, 0.9, (1, Xo, Yo, G * k * k)))
  f = jax.jit(lambda *a: dc.deform_conv2d(*a, stride=s, padding=p, dilation=d))
  check_grads(f, args, order=1, modes=['rev'], atol=1e-6, rtol=1e-6)


def test_bad_input():
  w = {'w': jnp.zeros((3, 3, 4, 2))}
  x = jnp.zeros((1, 5, 5, 4))
  with pytest.raises(ValueError, match=r'offset shape \(1, 5, 5, 17\)'):
    dc.deform_conv2d(w, x, jnp.zeros((1, 5, 5, 17)), padding=1)
  with pytest.raises(ValueError, match=r'offset shape \(1, 5, 5, 54\)'):  # G = 3 does not divide 4
    dc.deform_conv2d(w, x, jnp.zeros((1, 5, 5, 54)), padding=1)
  with pytest.raises(ValueError, match=r'mask shape \(1, 5, 5, 9\)'):
    dc.deform_conv2d(w, x, jnp.zeros((1, 5, 5, 36)), jnp.zeros((1, 5, 5, 9)), padding=1)
  with pytest.raises(ValueError, match="padding='SAME'"):
    dc.deform_conv2d(w, x, jnp.zeros((1, 5, 5, 18)), padding='SAME')
  with pytest.raises(ValueError, match='offset_groups=3'):
    dc.deformable_conv_specs(3, 4, 2, offset_groups=3)
