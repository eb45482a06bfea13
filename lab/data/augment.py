"""Per-example image augmentations for self-supervised learning: pure, jit-able functions of
(key, x_XYC) that jax.vmap maps over a batch with one key per example (`example_keys`).

Images are x_XYC in [-1, 1] as lab.data.images gives them: X rows (height), Y columns (width),
C = 1 (grey) or 3 (RGB). The operations and their parameters follow torchvision's transforms, in
which the papers' recipes are written; each recipe is data (`ViewSpec`s from simclr_spec,
byol_specs, dino_specs, mae_spec) and a function (key, x_XYC) -> views:
  SimCLR  Chen, Kornblith, Norouzi & Hinton 2020, arXiv:2002.05709, appendix A.
  BYOL    Grill et al. 2020, arXiv:2006.07733, appendix B, table 6.
  DINO    Caron et al. 2021, arXiv:2104.14294, appendix; multi-crop from SwAV
          (Caron et al. 2020, arXiv:2006.09882).
  MAE     He et al. 2021, arXiv:2111.06377, appendix A.1 (crop and flip only).
torchvision states its colour formulas on u = (x + 1) / 2 in [0, 1] and clips to [0, 1] after
each operation. A blend f u + (1 - f) o is affine-equivariant, so in our units it is the same
blend f x + (1 - f) o' with o' the image of o (black u = 0 is x = -1) clipped to [-1, 1]; the
hue rotation and the solarisation threshold are computed on u.
On a grey image (C = 1) colour jitter applies brightness and contrast only; saturation, hue and
random grayscale are the identity (as torchvision, which returns 1-channel inputs unchanged).
Resizing is bilinear without antialiasing (the SimCLR and BYOL TensorFlow code; torchvision's
tensor default antialiases, DINO and MAE use bicubic).

Letters: A the crop attempts of `crop_box`, U uniform random numbers, G global and L local crops
of `dino_multicrop`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's 'L' conversion
CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


def _check_range(name: str, pair) -> None:
  if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
    raise ValueError(f'{name}={tuple(pair)}; expected a range (lo, hi) with 0 < lo <= hi')


def _check_probability(name: str, p: float) -> None:
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'{name}={p}; expected a probability in [0, 1]')


def _check_image(x_XYC: jax.Array) -> None:
  if x_XYC.ndim != 3 or x_XYC.shape[-1] not in (1, 3):
    raise ValueError(f'image of shape {x_XYC.shape}; expected one image [X, Y, C] with C = 1 or 3'
                     ' (vmap over the batch)')


def example_keys(step_key: jax.Array, n: int, offset: int | jax.Array = 0) -> jax.Array:
  """Keys [n] for examples offset .. offset + n - 1: key_i = fold_in(step_key, offset + i), so an
  example's view depends on its global index only, not on how the batch is split over hosts."""
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(offset + jnp.arange(n))


def _crop_box(u_U: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
  """crop_box from 2 A + 2 uniforms on [0, 1): A area fractions, A log-ratios, top, left."""
  area_A = height * width * (scale[0] + (scale[1] - scale[0]) * u_U[:CROP_ATTEMPTS])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  ratio_A = jnp.exp(log_lo + (log_hi - log_lo) * u_U[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  w_A = jnp.round(jnp.sqrt(area_A * ratio_A)).astype(jnp.int32)
  h_A = jnp.round(jnp.sqrt(area_A / ratio_A)).astype(jnp.int32)
  ok_A = (w_A > 0) & (w_A <= width) & (h_A > 0) & (h_A <= height)
  first = jnp.argmax(ok_A)
  if width / height < ratio[0]:
    fallback_h, fallback_w = int(round(width / ratio[0])), width
  elif width / height > ratio[1]:
    fallback_h, fallback_w = height, int(round(height * ratio[1]))
  else:
    fallback_h, fallback_w = height, width
  found = ok_A.any()
  h = jnp.where(found, h_A[first], fallback_h)
  w = jnp.where(found, w_A[first], fallback_w)
  top = jnp.where(found, _randint(u_U[-2], height - h + 1), (height - h) // 2)
  left = jnp.where(found, _randint(u_U[-1], width - w + 1), (width - w) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.int32)


def _randint(u, n):
  """floor(u n): uniform on {0, ..., n - 1} for u ~ U[0, 1)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def crop_box(key: jax.Array, height: int, width: int, scale=(0.08, 1.0),
             ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """int32 [top, left, h, w] of a crop of a height x width image, torchvision's
  RandomResizedCrop.get_params: up to 10 attempts draw an area fraction s ~ U(scale) and an aspect
  ratio r = w / h with log r ~ U(log ratio), w = round(sqrt(s H W r)), h = round(sqrt(s H W / r));
  the first attempt with 0 < w <= W and 0 < h <= H wins, at a uniform integer position. If all
  fail: the central crop of the whole image, narrowed to the nearest allowed ratio."""
  _check_range('scale', scale)
  _check_range('ratio', ratio)
  u_U = jax.random.uniform(key, (2 * CROP_ATTEMPTS + 2,))
  return _crop_box(u_U, height, width, scale, ratio)


def _bilinear_taps(start: jax.Array, extent: jax.Array, out: int):
  """Source rows (i0, i1) and weight of i1 for `out` samples of the segment [start, start +
  extent): c = (o + 1/2) extent / out - 1/2 clipped to [0, extent - 1] (half-pixel centres,
  align_corners=False, as torch's bilinear interpolate)."""
  extent = extent.astype(jnp.float32)
  c = jnp.clip((jnp.arange(out, dtype=jnp.float32) + 0.5) * extent / out - 0.5, 0.0, extent - 1)
  i0 = jnp.floor(c)
  i1 = jnp.minimum(i0 + 1, extent - 1)
  return (start + i0.astype(jnp.int32), start + i1.astype(jnp.int32), c - i0)


def resized_crop(x_XYC: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """The crop x[top : top + h, left : left + w] of box = [top, left, h, w], resized bilinearly to
  size x size: y[o, p] = sum of the 4 nearest box pixels of the source point (c_o, c_p) weighted
  by (1 - |c - i|) per axis (see _bilinear_taps); no pixel outside the box is read."""
  _check_image(x_XYC)
  top, left, h, w = box[0], box[1], box[2], box[3]
  r0, r1, fr = _bilinear_taps(top, h, size)
  c0, c1, fc = _bilinear_taps(left, w, size)
  fr, fc = fr.astype(x_XYC.dtype)[:, None, None], fc.astype(x_XYC.dtype)[None, :, None]
  rows_XYC = x_XYC[r0] * (1 - fr) + x_XYC[r1] * fr
  return rows_XYC[:, c0] * (1 - fc) + rows_XYC[:, c1] * fc


def random_resized_crop(key: jax.Array, x_XYC: jax.Array, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """resized_crop of a crop_box drawn from `key`: a size x size view."""
  return resized_crop(x_XYC, crop_box(key, x_XYC.shape[0], x_XYC.shape[1], scale, ratio), size)


def hflip(x_XYC: jax.Array) -> jax.Array:
  """Mirror left-right: y[:, j] = x[:, Y - 1 - j]."""
  return x_XYC[:, ::-1]


def luma(x_XYC: jax.Array) -> jax.Array:
  """[X, Y, 1]: 0.299 R + 0.587 G + 0.114 B, or the image itself when C = 1. The weights sum to
  one, so the same formula holds in [0, 1] and in [-1, 1] units."""
  if x_XYC.shape[-1] == 1:
    return x_XYC
  return jnp.einsum('XYC,C->XY', x_XYC, jnp.asarray(LUMA, x_XYC.dtype))[..., None]


def grayscale(x_XYC: jax.Array) -> jax.Array:
  """Every channel set to the luma (torchvision rgb_to_grayscale with 3 output channels)."""
  return jnp.broadcast_to(luma(x_XYC), x_XYC.shape)


def _blend(x_XYC, other, factor):
  """torchvision _blend: clip(f x + (1 - f) o) to the image range."""
  return jnp.clip(factor * x_XYC + (1 - factor) * other, -1.0, 1.0).astype(x_XYC.dtype)


def adjust_brightness(x_XYC: jax.Array, factor) -> jax.Array:
  """u -> clip(f u, 0, 1): a blend with black (u = 0, x = -1)."""
  return _blend(x_XYC, -1.0, factor)


def adjust_contrast(x_XYC: jax.Array, factor) -> jax.Array:
  """u -> clip(f u + (1 - f) m, 0, 1), m the mean luma of the image."""
  return _blend(x_XYC, luma(x_XYC).mean(), factor)


def adjust_saturation(x_XYC: jax.Array, factor) -> jax.Array:
  """u -> clip(f u + (1 - f) luma(u), 0, 1) per pixel; identity when C = 1."""
  return x_XYC if x_XYC.shape[-1] == 1 else _blend(x_XYC, luma(x_XYC), factor)


def rgb_to_hsv(u_XYC: jax.Array) -> jax.Array:
  """RGB in [0, 1] -> (hue in [0, 1), saturation, value), Python colorsys's formulas: v = max,
  s = (max - min) / max, h = ((g - b), 2 + (b - r), 4 + (r - g)) / (6 (max - min)) mod 1 by the
  channel holding the max (r first, then g); h = s = 0 for a grey pixel."""
  r, g, b = u_XYC[..., 0], u_XYC[..., 1], u_XYC[..., 2]
  v = u_XYC.max(-1)
  delta = v - u_XYC.min(-1)
  grey = delta == 0
  s = jnp.where(v > 0, delta / jnp.where(v > 0, v, 1), 0)
  safe = jnp.where(grey, 1, delta)
  h = jnp.where(r == v, (g - b) / safe, jnp.where(g == v, 2 + (b - r) / safe, 4 + (r - g) / safe))
  return jnp.stack([jnp.where(grey, 0, (h / 6) % 1), s, v], -1)


def hsv_to_rgb(hsv_XYC: jax.Array) -> jax.Array:
  """The inverse of rgb_to_hsv: channel n in (5, 3, 1) for (r, g, b) is
  v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6."""
  h, s, v = hsv_XYC[..., :1], hsv_XYC[..., 1:2], hsv_XYC[..., 2:]
  k = (jnp.asarray([5.0, 3.0, 1.0], hsv_XYC.dtype) + 6 * h) % 6
  return v - v * s * jnp.clip(jnp.minimum(k, 4 - k), 0, 1)


def adjust_hue(x_XYC: jax.Array, delta) -> jax.Array:
  """Rotate the hue: h -> (h + delta) mod 1 in HSV, delta in [-1/2, 1/2]; identity when C = 1."""
  if x_XYC.shape[-1] == 1:
    return x_XYC
  hsv = rgb_to_hsv((x_XYC + 1) / 2)
  hsv = hsv.at[..., 0].set((hsv[..., 0] + delta) % 1)
  return (2 * hsv_to_rgb(hsv) - 1).astype(x_XYC.dtype)


JITTER_UNIFORMS = 9  # apply, 3 factors, hue shift, 4 order keys


def _check_jitter(brightness, contrast, saturation, hue) -> None:
  if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
    strengths = (brightness, contrast, saturation, hue)
    raise ValueError(f'color jitter (brightness, contrast, saturation, hue)={strengths}; expected '
                     'strengths >= 0 with hue <= 0.5')


def _color_jitter(u_U: jax.Array, x_XYC: jax.Array, strengths, p: float) -> jax.Array:
  """color_jitter from JITTER_UNIFORMS uniforms on [0, 1)."""
  brightness, contrast, saturation, hue = strengths
  factor = lambda u, s: max(0.0, 1 - s) + (1 + s - max(0.0, 1 - s)) * u
  f_b, f_c, f_s = factor(u_U[1], brightness), factor(u_U[2], contrast), factor(u_U[3], saturation)
  shift = hue * (2 * u_U[4] - 1)
  ops = (lambda y: adjust_brightness(y, f_b), lambda y: adjust_contrast(y, f_c),
         lambda y: adjust_saturation(y, f_s), lambda y: adjust_hue(y, shift))
  order = jnp.argsort(u_U[5:9])  # a uniformly random permutation
  y_XYC = jax.lax.fori_loop(0, len(ops), lambda slot, y: jax.lax.switch(order[slot], ops, y),
                            x_XYC)  # a loop, not unrolled: one copy of each op to compile
  return jnp.where(u_U[0] < p, y_XYC, x_XYC)


def color_jitter(key: jax.Array, x_XYC: jax.Array, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8) -> jax.Array:
  """With probability p, torchvision ColorJitter: brightness, contrast and saturation factors
  f ~ U[max(0, 1 - s), 1 + s] for strength s, a hue shift ~ U[-hue, hue], applied in a uniformly
  random order (SimCLR appendix A uses strengths (0.8, 0.8, 0.8, 0.2) x its strength, p = 0.8)."""
  _check_jitter(brightness, contrast, saturation, hue)
  _check_probability('color_jitter p', p)
  u_U = jax.random.uniform(key, (JITTER_UNIFORMS,))
  return _color_jitter(u_U, x_XYC, (brightness, contrast, saturation, hue), p)


def blur_radius(size: int) -> int:
  """Half-width r of the blur kernel along an axis of `size` pixels: its 2 r + 1 taps span ~10% of
  the size (SimCLR appendix A; the SimCLR/BYOL code's size // 10 made odd: 23 taps at 224)."""
  return size // 20


def gaussian_blur(x_XYC: jax.Array, sigma) -> jax.Array:
  """Separable Gaussian blur, per channel: y = g_X * (g_Y * x) with taps g_i proportional to
  exp(-i^2 / (2 sigma^2)) for |i| <= blur_radius, normalised to sum to one, and reflect padding
  (torchvision GaussianBlur). A radius of 0 (images under 20 pixels) is the identity."""
  _check_image(x_XYC)
  y_XYC = x_XYC
  for axis in (0, 1):
    n, r = x_XYC.shape[axis], blur_radius(x_XYC.shape[axis])
    taps = jnp.exp(-jnp.arange(-r, r + 1, dtype=x_XYC.dtype) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
    padded = jnp.pad(y_XYC, pad, mode='reflect')
    y_XYC = sum(taps[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
                for i in range(2 * r + 1))
  return y_XYC.astype(x_XYC.dtype)


def solarize(x_XYC: jax.Array, threshold: float = 0.5) -> jax.Array:
  """BYOL's solarisation u -> u if u < t else 1 - u, t in [0, 1] units: in [-1, 1] units,
  x -> -x where x >= 2 t - 1."""
  return jnp.where(x_XYC >= 2 * threshold - 1, -x_XYC, x_XYC)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """One augmented view, applied in the papers' order: random resized crop to size x size, flip,
  colour jitter (strengths brightness, contrast, saturation, hue), grayscale, Gaussian blur with
  sigma ~ U(sigma), solarisation. Each p_* is the probability of its operation; p = 0 skips it."""
  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  p_flip: float = 0.5
  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
  p_jitter: float = 0.8
  p_gray: float = 0.2
  p_blur: float = 0.0
  sigma: tuple[float, float] = (0.1, 2.0)
  p_solarize: float = 0.0
  solarize_threshold: float = 0.5

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f'ViewSpec size={self.size}; expected a positive output size')
    _check_range('ViewSpec scale', self.scale)
    _check_range('ViewSpec ratio', self.ratio)
    _check_range('ViewSpec sigma', self.sigma)
    if len(self.jitter) != 4:
      raise ValueError(f'ViewSpec jitter={self.jitter}; expected 4 strengths (brightness, '
                       'contrast, saturation, hue)')
    _check_jitter(*self.jitter)
    for name in ('p_flip', 'p_jitter', 'p_gray', 'p_blur', 'p_solarize', 'solarize_threshold'):
      _check_probability(f'ViewSpec {name}', getattr(self, name))


def view(spec: ViewSpec, key: jax.Array, x_XYC: jax.Array) -> jax.Array:
  """One view [size, size, C] of x_XYC drawn from `key` as `spec` describes. All its random
  numbers come from one draw of uniforms (one threefry call keeps compilation quick)."""
  _check_image(x_XYC)
  n_crop = 2 * CROP_ATTEMPTS + 2
  u_U = jax.random.uniform(key, (n_crop + JITTER_UNIFORMS + 5,))
  u_flip, u_gray, u_blur, u_sigma, u_sol = u_U[n_crop + JITTER_UNIFORMS:]
  box = _crop_box(u_U[:n_crop], x_XYC.shape[0], x_XYC.shape[1], spec.scale, spec.ratio)
  y = resized_crop(x_XYC, box, spec.size)
  if spec.p_flip > 0:
    y = jnp.where(u_flip < spec.p_flip, hflip(y), y)
  if spec.p_jitter > 0:
    y = _color_jitter(u_U[n_crop:n_crop + JITTER_UNIFORMS], y, spec.jitter, spec.p_jitter)
  if spec.p_gray > 0:
    y = jnp.where(u_gray < spec.p_gray, grayscale(y), y)
  if spec.p_blur > 0:
    sigma = spec.sigma[0] + (spec.sigma[1] - spec.sigma[0]) * u_sigma
    y = jnp.where(u_blur < spec.p_blur, gaussian_blur(y, sigma), y)
  if spec.p_solarize > 0:
    y = jnp.where(u_sol < spec.p_solarize, solarize(y, spec.solarize_threshold), y)
  return y


def simclr_spec(size: int = 224, strength: float = 1.0, p_blur: float = 0.5,
                scale=(0.08, 1.0)) -> ViewSpec:
  """SimCLR's one spec for both views: crop, flip, colour jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s)
  with p = 0.8, grayscale p = 0.2, blur p = 0.5 (ImageNet; CIFAR-10 uses s = 0.5 and
  p_blur = 0)."""
  s = strength
  return ViewSpec(size, scale, jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s), p_blur=p_blur)


def byol_specs(size: int = 224, scale=(0.08, 1.0)) -> tuple[ViewSpec, ViewSpec]:
  """BYOL's two asymmetric views (table 6): jitter (0.4, 0.4, 0.2, 0.1) p = 0.8, grayscale
  p = 0.2, blur p = 1.0 / 0.1, solarisation p = 0.0 / 0.2."""
  return ViewSpec(size, scale, p_blur=1.0), ViewSpec(size, scale, p_blur=0.1, p_solarize=0.2)


def dino_specs(global_size: int = 224, local_size: int = 96, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4)) -> tuple[ViewSpec, ViewSpec, ViewSpec]:
  """DINO's (first global, second global, local) crops: all with flip, jitter (0.4, 0.4, 0.2,
  0.1) p = 0.8 and grayscale p = 0.2; blur p = 1.0 and 0.1 on the global crops (the second also
  solarised, p = 0.2) and p = 0.5 on the local ones."""
  return (ViewSpec(global_size, global_scale, p_blur=1.0),
          ViewSpec(global_size, global_scale, p_blur=0.1, p_solarize=0.2),
          ViewSpec(local_size, local_scale, p_blur=0.5))


def mae_spec(size: int = 224, scale=(0.2, 1.0)) -> ViewSpec:
  """MAE's pre-training view: random resized crop (scale (0.2, 1)) and a horizontal flip."""
  return ViewSpec(size, scale, p_jitter=0.0, p_gray=0.0)


def simclr_views(key: jax.Array, x_XYC: jax.Array, size: int = 224, strength: float = 1.0,
                 p_blur: float = 0.5, scale=(0.08, 1.0)) -> tuple[jax.Array, jax.Array]:
  """Two views [size, size, C] of x_XYC, both drawn from simclr_spec."""
  spec = simclr_spec(size, strength, p_blur, scale)
  k1, k2 = jax.random.split(key)
  return view(spec, k1, x_XYC), view(spec, k2, x_XYC)


def byol_views(key: jax.Array, x_XYC: jax.Array, size: int = 224,
               scale=(0.08, 1.0)) -> tuple[jax.Array, jax.Array]:
  """BYOL's two views [size, size, C] of x_XYC (byol_specs)."""
  spec1, spec2 = byol_specs(size, scale)
  k1, k2 = jax.random.split(key)
  return view(spec1, k1, x_XYC), view(spec2, k2, x_XYC)


def dino_multicrop(key: jax.Array, x_XYC: jax.Array, global_size: int = 224,
                   local_size: int = 96, n_local: int = 8, global_scale=(0.4, 1.0),
                   local_scale=(0.05, 0.4)) -> tuple[jax.Array, jax.Array]:
  """DINO's multi-crop of x_XYC (dino_specs): (global_GXYC [2, global_size, global_size, C],
  local_LXYC [n_local, local_size, local_size, C])."""
  if n_local < 0:
    raise ValueError(f'dino_multicrop n_local={n_local}; expected a count >= 0')
  global1, global2, local = dino_specs(global_size, local_size, global_scale, local_scale)
  k1, k2, k_local = jax.random.split(key, 3)
  global_GXYC = jnp.stack([view(global1, k1, x_XYC), view(global2, k2, x_XYC)])
  local_LXYC = jax.vmap(lambda k: view(local, k, x_XYC))(jax.random.split(k_local, n_local))
  return global_GXYC, local_LXYC


def mae_view(key: jax.Array, x_XYC: jax.Array, size: int = 224, scale=(0.2, 1.0)) -> jax.Array:
  """MAE's view [size, size, C] of x_XYC (mae_spec)."""
  return view(mae_spec(size, scale), key, x_XYC)
