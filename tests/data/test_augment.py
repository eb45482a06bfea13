"""Augmentations against float64 NumPy / colorsys / scipy / torch oracles, crop sampling against a
NumPy re-derivation of torchvision's RandomResizedCrop rule, and jit / vmap / key behaviour."""
import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from jax.test_util import check_grads

from lab.data import augment

LUMA = np.array([0.299, 0.587, 0.114])


def draw_image(seed, shape=(9, 13, 3)):
  """x_XYC uniform in [-1, 1], rounded to float32 so the oracle sees what jax sees."""
  x = np.random.default_rng(seed).uniform(-1, 1, shape)
  return x.astype(np.float32).astype(np.float64)


def np_bilinear_resize(crop_XYC, size):
  """Bilinear resize with half-pixel centres (align_corners=False): source c = (o + 1/2) n / size
  - 1/2 clipped to [0, n - 1], value (1 - t) a[floor c] + t a[floor c + 1]."""
  out = crop_XYC
  for axis in (0, 1):
    n = out.shape[axis]
    c = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    t = (c - i0).reshape([-1 if a == axis else 1 for a in range(3)])
    out = np.take(out, i0, axis) * (1 - t) + np.take(out, i1, axis) * t
  return out


_resized_crop = jax.jit(augment.resized_crop, static_argnums=2)


@pytest.mark.parametrize('box,size', [((0, 0, 9, 13), 7), ((2, 3, 5, 4), 11), ((8, 12, 1, 1), 3),
                                      ((3, 5, 6, 8), 6)])
def test_resized_crop_is_bilinear_resize_of_the_box(box, size):
  x_XYC = draw_image(sum(box))
  got = _resized_crop(jnp.asarray(x_XYC, jnp.float32), jnp.asarray(box), size)
  top, left, h, w = box
  crop_XYC = x_XYC[top:top + h, left:left + w]
  np.testing.assert_allclose(got, np_bilinear_resize(crop_XYC, size), rtol=1e-5, atol=1e-6)
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(crop_XYC.transpose(2, 0, 1)[None]), size=(size, size), mode='bilinear',
      align_corners=False, antialias=False)[0].numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(got, theirs, rtol=1e-5, atol=1e-6)


def test_resized_crop_gradient(x64):
  x_XYC = draw_image(1, (6, 7, 1))
  check_grads(jax.jit(lambda x: augment.resized_crop(x, jnp.asarray([1, 2, 4, 5]), 5)), (x_XYC,),
              order=1, modes=['rev'])


def np_torchvision_crop_box(rng, height, width, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params, re-derived with a NumPy generator."""
  area = height * width
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  if width / height < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif width / height > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize('height,width,scale,ratio,want', [
    (10, 20, (1.0, 1.0), (1.0, 1.0), (0, 5, 10, 10)),  # too wide: narrowed to ratio 1
    (21, 10, (1.0, 1.0), (1.0, 1.0), (5, 0, 10, 10)),  # too tall
    (10, 10, (2.0, 2.0), (0.5, 2.0), (0, 0, 10, 10)),  # no attempt fits, ratio allowed: all
    (12, 12, (1.0, 1.0), (1.0, 1.0), (0, 0, 12, 12)),  # the first attempt fits exactly
])
def test_crop_box_deterministic_cases_match_torchvision(height, width, scale, ratio, want):
  got = augment.crop_box(jax.random.key(0), height, width, scale, ratio)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
      np_torchvision_crop_box(np.random.default_rng(0), height, width, scale, ratio), want)


def test_crop_box_distribution_matches_torchvision_rule():
  # A 10 x 40 image: an attempt fits with probability ~0.19, so ~12% of draws use the fallback.
  height, width, scale, ratio, n = 10, 40, (0.08, 1.0), (3 / 4, 4 / 3), 4000
  ours = np.asarray(jax.jit(jax.vmap(lambda k: augment.crop_box(k, height, width, scale, ratio)))(
      jax.random.split(jax.random.key(0), n)))
  rng = np.random.default_rng(0)
  theirs = np.array([np_torchvision_crop_box(rng, height, width, scale, ratio) for _ in range(n)])
  top, left, h, w = ours.T
  assert np.all((top >= 0) & (left >= 0) & (h >= 1) & (w >= 1))
  assert np.all((top + h <= height) & (left + w <= width))
  fallback = (0, 13, 10, 13)  # h = 10, w = round(10 * 4 / 3), centred
  rate_ours, rate_theirs = (np.mean(np.all(b == fallback, 1)) for b in (ours, theirs))
  assert 0.08 < rate_theirs < 0.16
  assert abs(rate_ours - rate_theirs) < 4 * math.sqrt(2 * 0.12 * 0.88 / n)
  for j, name in enumerate(('top', 'left', 'h', 'w')):
    assert scipy.stats.ks_2samp(ours[:, j], theirs[:, j]).statistic < 0.05, name
  area_ours, area_theirs = (b[:, 2] * b[:, 3] / (height * width) for b in (ours, theirs))
  assert scipy.stats.ks_2samp(area_ours, area_theirs).statistic < 0.05


def test_crop_box_scale_and_ratio_in_range():
  size, n = 64, 2000  # big enough that rounding moves the ratio by a few percent at most
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: augment.crop_box(k, size, size)))(
      jax.random.split(jax.random.key(1), n)))
  area, ratio = boxes[:, 2] * boxes[:, 3] / size ** 2, boxes[:, 3] / boxes[:, 2]
  assert area.min() >= 0.08 * 0.9 and area.max() <= 1.0
  assert ratio.min() >= 0.75 * 0.9 and ratio.max() <= 4 / 3 / 0.9
  rng = np.random.default_rng(1)
  theirs = np.array([np_torchvision_crop_box(rng, size, size, (0.08, 1.0), (3 / 4, 4 / 3))
                     for _ in range(n)])
  # Large crops of a non-square ratio do not fit and are redrawn, so the mean area is below the
  # 0.54 of U(0.08, 1); the log-ratio stays symmetric.
  area_theirs = theirs[:, 2] * theirs[:, 3] / size ** 2
  assert abs(area.mean() - area_theirs.mean()) < 0.03 and area.mean() < 0.52
  assert scipy.stats.ks_2samp(area, area_theirs).statistic < 0.06
  log_ratio = np.log(ratio)
  assert abs(log_ratio.mean()) < 0.02 and log_ratio.std() > 0.12  # U(+-0.288): std 0.166


def np_gray(u_XYC):
  return u_XYC @ LUMA[:, None] if u_XYC.shape[-1] == 3 else u_XYC


def to_unit(x):
  return (x + 1) / 2


_jitted = {name: jax.jit(getattr(augment, name))
           for name in ('adjust_brightness', 'adjust_contrast', 'adjust_saturation')}


@pytest.mark.parametrize('factor', [0.0, 0.4, 1.0, 1.7])
@pytest.mark.parametrize('channels', [1, 3])
def test_brightness_contrast_saturation_match_torchvision_formulas(factor, channels):
  x_XYC = draw_image(channels, (5, 6, channels))
  u = to_unit(x_XYC)
  x32 = jnp.asarray(x_XYC, jnp.float32)
  want = {  # torchvision _blend(img, other, f) = clip(f img + (1 - f) other, 0, 1)
      'adjust_brightness': np.clip(factor * u, 0, 1),
      'adjust_contrast': np.clip(factor * u + (1 - factor) * np_gray(u).mean(), 0, 1),
      'adjust_saturation': np.clip(factor * u + (1 - factor) * np_gray(u), 0, 1)
                           if channels == 3 else u,
  }
  for name, want_u in want.items():
    got = _jitted[name](x32, factor)
    assert got.dtype == jnp.float32 and got.shape == x_XYC.shape
    np.testing.assert_allclose(to_unit(np.asarray(got, np.float64)), want_u, atol=1e-6,
                               err_msg=name)


def test_grayscale_weights():
  x_XYC = draw_image(4, (4, 5, 3))
  got = augment.grayscale(jnp.asarray(x_XYC, jnp.float32))
  want = x_XYC[..., 0] * 0.299 + x_XYC[..., 1] * 0.587 + x_XYC[..., 2] * 0.114
  np.testing.assert_allclose(got, np.repeat(want[..., None], 3, -1), atol=1e-6)
  grey = jnp.asarray(draw_image(5, (4, 5, 1)), jnp.float32)
  np.testing.assert_array_equal(augment.grayscale(grey), grey)
  np.testing.assert_array_equal(augment.adjust_hue(grey, 0.3), grey)


def hsv_test_pixels(seed):
  """Random RGB in [0, 1] plus the edge cases: grey, black, white, ties for the maximum."""
  u = np.random.default_rng(seed).uniform(0, 1, (6, 5, 3))
  u[0, :5] = [[0.3, 0.3, 0.3], [0, 0, 0], [1, 1, 1], [0.8, 0.8, 0.2], [0.1, 0.7, 0.7]]
  u[1, :3] = [[0.9, 0.2, 0.9], [1.0, 0.0, 0.0], [0.2, 0.5, 0.9]]
  return u.astype(np.float32).astype(np.float64)


def test_rgb_hsv_conversions_match_colorsys():
  u = hsv_test_pixels(0)
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in u.reshape(-1, 3)]).reshape(u.shape)
  np.testing.assert_allclose(jax.jit(augment.rgb_to_hsv)(jnp.asarray(u, jnp.float32)), hsv,
                             atol=1e-6)
  hsv = np.random.default_rng(1).uniform(0, 1, (7, 3))
  rgb = np.array([colorsys.hsv_to_rgb(*p) for p in hsv])
  np.testing.assert_allclose(jax.jit(augment.hsv_to_rgb)(jnp.asarray(hsv, jnp.float32)), rgb,
                             atol=1e-6)


@pytest.mark.parametrize('delta', [-0.5, -0.13, 0.0, 0.27, 0.5])
def test_adjust_hue_rotates_hue_as_colorsys(delta):
  u = hsv_test_pixels(2)
  want = []
  for p in u.reshape(-1, 3):
    h, s, v = colorsys.rgb_to_hsv(*p)
    want.append(colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))
  got = jax.jit(augment.adjust_hue)(jnp.asarray(2 * u - 1, jnp.float32), delta)
  np.testing.assert_allclose(to_unit(np.asarray(got, np.float64)),
                             np.array(want).reshape(u.shape), atol=2e-6)


def np_blend_ops(u, factors, shift):
  """torchvision's four ColorJitter ops on u in [0, 1] with fixed parameters."""
  b, c, s = factors
  hue = lambda u: np.array([colorsys.hsv_to_rgb((h + shift) % 1, sv, v) for h, sv, v in
                            (colorsys.rgb_to_hsv(*p) for p in u.reshape(-1, 3))]).reshape(u.shape)
  return (lambda u: np.clip(b * u, 0, 1),
          lambda u: np.clip(c * u + (1 - c) * np_gray(u).mean(), 0, 1),
          lambda u: np.clip(s * u + (1 - s) * np_gray(u), 0, 1), hue)


STRENGTHS = (0.4, 0.5, 0.6, 0.1)
_jitter_from_uniforms = jax.jit(lambda u, x: augment._color_jitter(u, x, STRENGTHS, p=0.8))


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_color_jitter_applies_the_four_ops_in_the_drawn_order(order):
  # u_U = (apply, 3 factor uniforms, hue uniform, 4 order keys); argsort of the keys is the order.
  u_U = np.array([0.1, 0.9, 0.2, 0.7, 0.85, 0, 0, 0, 0])
  u_U[5 + np.array(order)] = np.arange(4) / 4 + 0.1
  x32 = jnp.asarray(2 * hsv_test_pixels(3) - 1, jnp.float32)
  x_XYC = np.asarray(x32, np.float64)
  got = _jitter_from_uniforms(jnp.asarray(u_U, jnp.float32), x32)
  factors = [1 - s + 2 * s * u for s, u in zip(STRENGTHS[:3], u_U[1:4])]  # U[1 - s, 1 + s]
  ops = np_blend_ops(to_unit(x_XYC), factors, 0.1 * (2 * 0.85 - 1))
  want = to_unit(x_XYC)
  for i in order:
    want = ops[i](want)
  np.testing.assert_allclose(to_unit(np.asarray(got, np.float64)), want, atol=3e-6)
  u_U[0] = 0.85  # >= p: not applied
  np.testing.assert_array_equal(_jitter_from_uniforms(jnp.asarray(u_U, jnp.float32), x32), x32)


_jitter_many = jax.jit(jax.vmap(lambda k, x: augment.color_jitter(k, x, 0.5, 0.0, 0.8, 0.5, p=0.7),
                                in_axes=(0, None)))


def test_color_jitter_sampling_on_a_grey_image():
  # A constant grey image u = 0.25 (below 1 / 1.5, so no clipping), brightness 0.5, contrast 0 and
  # saturation and hue on, which are the identity on a grey image: each output is f u with
  # f ~ U[0.5, 1.5], applied with probability 0.7.
  x_XYC = jnp.full((2, 2, 1), -0.5, jnp.float32)
  out = np.asarray(_jitter_many(jax.random.split(jax.random.key(0), 3000), x_XYC))
  f = to_unit(out[:, 0, 0, 0].astype(np.float64)) / 0.25
  applied = np.abs(f - 1) > 1e-6
  assert abs(applied.mean() - 0.7) < 0.03
  assert f.min() >= 0.5 - 1e-6 and f.max() <= 1.5 + 1e-6
  assert scipy.stats.kstest(f[applied], 'uniform', args=(0.5, 1.0)).statistic < 0.04
  assert np.all(out == out[:, :1, :1])  # one factor per image


def test_blur_radius_is_ten_percent():
  assert [2 * augment.blur_radius(n) + 1 for n in (224, 96, 32, 19)] == [23, 9, 3, 1]


_blur = jax.jit(augment.gaussian_blur)


@pytest.mark.parametrize('sigma', [0.1, 0.7, 2.0])
def test_gaussian_blur_matches_separable_reflect_convolution(sigma):
  x_XYC = draw_image(7, (45, 23, 3))  # radius 2 along X, 1 along Y
  want = x_XYC
  for axis, r in ((0, 2), (1, 1)):
    taps = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    want = scipy.ndimage.correlate1d(want, taps / taps.sum(), axis=axis, mode='mirror')
  got = _blur(jnp.asarray(x_XYC, jnp.float32), sigma)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  small = jnp.asarray(draw_image(8, (8, 8, 1)), jnp.float32)
  np.testing.assert_array_equal(_blur(small, sigma), small)  # radius 0


def test_gaussian_blur_gradients(x64):
  x_XYC = draw_image(9, (21, 20, 1))
  check_grads(jax.jit(augment.gaussian_blur), (x_XYC, 0.8), order=1, modes=['rev'])


@pytest.mark.parametrize('threshold', [0.0, 0.3, 0.5, 1.0])
def test_solarize_threshold_in_unit_range(threshold):
  x_XYC = draw_image(10, (5, 5, 3))
  x_XYC[0, 0, 0] = 2 * threshold - 1  # exactly at the threshold: inverted (u >= t)
  u = to_unit(x_XYC)
  want = np.where(u >= threshold, 1 - u, u)  # BYOL: u if u < t else 1 - u
  got = augment.solarize(jnp.asarray(x_XYC, jnp.float32), threshold)
  np.testing.assert_allclose(to_unit(np.asarray(got, np.float64)), want, atol=1e-7)


def test_view_with_certain_ops_composes_them_in_order():
  # Whole-image crop (identity resize), then grayscale, blur with sigma 0.6, solarise at 0.4.
  spec = augment.ViewSpec(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0,
                          p_gray=1.0, p_blur=1.0, sigma=(0.6, 0.6), p_solarize=1.0,
                          solarize_threshold=0.4)
  x_XYC = draw_image(11, (24, 24, 3))
  got = jax.jit(lambda k, x: augment.view(spec, k, x))(jax.random.key(3),
                                                       jnp.asarray(x_XYC, jnp.float32))
  taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * 0.6 ** 2))
  want = np.repeat(x_XYC @ LUMA[:, None], 3, -1)
  for axis in (0, 1):
    want = scipy.ndimage.correlate1d(want, taps / taps.sum(), axis=axis, mode='mirror')
  want = np.where(want >= 2 * 0.4 - 1, -want, want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


_mae_many = jax.jit(jax.vmap(lambda k, x: augment.mae_view(k, x, 10, scale=(1.0, 1.0)),
                             in_axes=(0, None)))


def test_mae_view_is_crop_and_flip_only():
  # A square image and scale 1: the crop is the whole image, so every view is x or x flipped.
  x_XYC = jnp.asarray(draw_image(12, (10, 10, 3)), jnp.float32)
  views = np.asarray(_mae_many(jax.random.split(jax.random.key(4), 400), x_XYC))
  same = np.all(np.abs(views - np.asarray(x_XYC)) < 1e-6, axis=(1, 2, 3))
  flipped = np.all(np.abs(views - np.asarray(x_XYC)[:, ::-1]) < 1e-6, axis=(1, 2, 3))
  assert np.all(same ^ flipped)
  assert abs(flipped.mean() - 0.5) < 0.1


def test_recipes_carry_the_papers_parameters():
  simclr = augment.simclr_spec(32, strength=0.5)
  assert simclr.jitter == (0.4, 0.4, 0.4, 0.1) and (simclr.p_jitter, simclr.p_gray) == (0.8, 0.2)
  assert (simclr.p_blur, simclr.p_solarize, simclr.scale) == (0.5, 0.0, (0.08, 1.0))
  byol1, byol2 = augment.byol_specs()
  assert byol1.size == 224 and byol1.jitter == byol2.jitter == (0.4, 0.4, 0.2, 0.1)
  assert (byol1.p_blur, byol2.p_blur, byol1.p_solarize, byol2.p_solarize) == (1.0, 0.1, 0.0, 0.2)
  g1, g2, local = augment.dino_specs()
  assert (g1.size, g1.scale, local.size, local.scale) == (224, (0.4, 1.0), 96, (0.05, 0.4))
  assert (g1.p_blur, g2.p_blur, local.p_blur, g2.p_solarize) == (1.0, 0.1, 0.5, 0.2)
  assert g1.solarize_threshold == 0.5 and local.p_solarize == 0.0
  mae = augment.mae_spec()
  assert (mae.scale, mae.p_flip, mae.p_jitter, mae.p_gray, mae.p_blur) == ((0.2, 1.0), 0.5, 0, 0, 0)
  assert (mae.ratio, g1.ratio) == ((3 / 4, 4 / 3), (3 / 4, 4 / 3))


_simclr_batch = jax.jit(jax.vmap(lambda k, x: augment.simclr_views(k, x, 12)))


def test_views_vmap_per_example_keys_and_determinism():
  x_BXYC = jnp.asarray(np.repeat(draw_image(13, (1, 16, 16, 3)), 3, 0), jnp.float32)
  keys = augment.example_keys(jax.random.key(5), 3)
  v1, v2 = _simclr_batch(keys, x_BXYC)
  assert v1.shape == v2.shape == (3, 12, 12, 3) and v1.dtype == jnp.float32
  assert float(jnp.abs(v1).max()) <= 1.0
  # The same image under different keys (examples, and the two views) gives different views.
  for a, b in ((v1[0], v1[1]), (v1[1], v1[2]), (v1[0], v2[0])):
    assert float(jnp.abs(a - b).mean()) > 1e-2
  again = _simclr_batch(keys, x_BXYC)
  np.testing.assert_array_equal(again[0], v1)
  np.testing.assert_array_equal(again[1], v2)
  # Example i's views depend only on its key, not on its place in the batch.
  reverse = _simclr_batch(keys[::-1], x_BXYC[::-1])
  np.testing.assert_allclose(reverse[0][::-1], v1, atol=1e-6)
  np.testing.assert_allclose(reverse[1][::-1], v2, atol=1e-6)
  np.testing.assert_array_equal(jax.random.key_data(augment.example_keys(keys[0], 2, offset=1)),
                                jax.random.key_data(jax.vmap(jax.random.fold_in, (None, 0))(
                                    keys[0], jnp.arange(1, 3))))


def test_jit_and_eager_agree():
  # The colour jitter (a loop over a switch of the four ops) is the one part whose jit and eager
  # paths differ most.
  x_XYC = jnp.asarray(draw_image(15, (6, 5, 3)), jnp.float32)
  key = jax.random.key(8)
  jitter = lambda k, x: augment.color_jitter(k, x, 0.4, 0.4, 0.4, 0.1, p=1.0)
  eager = jitter(key, x_XYC)
  assert float(jnp.abs(eager - x_XYC).mean()) > 1e-2
  np.testing.assert_allclose(eager, jax.jit(jitter)(key, x_XYC), atol=1e-5)


def test_dino_multicrop_and_byol_shapes_on_grey_images():
  x_XYC = jnp.asarray(draw_image(14, (20, 20, 1)), jnp.float32)
  (g_GXYC, l_LXYC), (b1, b2) = jax.jit(lambda k, x: (
      augment.dino_multicrop(k, x, 16, 8, n_local=3), augment.byol_views(k, x, 16)))(
          jax.random.key(6), x_XYC)
  assert g_GXYC.shape == (2, 16, 16, 1) and l_LXYC.shape == (3, 8, 8, 1)
  assert float(jnp.abs(l_LXYC[0] - l_LXYC[1]).mean()) > 1e-2
  assert float(jnp.abs(g_GXYC[0] - g_GXYC[1]).mean()) > 1e-2
  assert b1.shape == b2.shape == (16, 16, 1) and float(jnp.abs(b1 - b2).mean()) > 1e-2


@pytest.mark.parametrize('make,match', [
    (lambda: augment.ViewSpec(0), 'size=0'),
    (lambda: augment.ViewSpec(8, scale=(0.5, 0.1)), r'scale=\(0.5, 0.1\)'),
    (lambda: augment.ViewSpec(8, p_blur=1.5), 'p_blur=1.5'),
    (lambda: augment.ViewSpec(8, jitter=(0.4, 0.4, 0.2, 0.7)), 'hue'),
    (lambda: augment.crop_box(jax.random.key(0), 8, 8, ratio=(0.0, 1.0)), 'ratio'),
    (lambda: augment.gaussian_blur(jnp.zeros((8, 8, 2)), 1.0), r'\(8, 8, 2\)'),
    (lambda: augment.dino_multicrop(jax.random.key(0), jnp.zeros((8, 8, 1)), n_local=-1),
     'n_local=-1'),
])
def test_bad_arguments_are_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()
