"""Dynamic tiling: InternVL's grid choice and MiniCPM-V's slice grid against brute-force NumPy
searches written from the papers' rules, tiles and thumbnails against PIL's bicubic resize and
InternVL's crop boxes, MiniCPM-V's slice sizes worked by hand, and the image-token layout."""
import math

import numpy as np
import pytest
from PIL import Image

from lab.data import tiling

TILE = 448
# jax.image.resize computes its kernel weights in float32: at sizes of ~1000 px they are off by
# ~1e-4 against PIL (which matches a float64 torch resize to 2e-7), far below 8-bit steps (4e-3).
PIL_ATOL = 5e-4


def brute_internvl(width, height, tile=TILE, min_num=1, max_num=12):
  """InternVL 1.5 sec. 3.3: the grid (c, r), min_num <= c r <= max_num, whose ratio c / r is
  closest to W / H. Among equally close grids the smallest wins unless a larger one still has
  fewer than twice the image's pixels (W H > tile^2 c r / 2); then the largest such one."""
  c, r = (a.reshape(-1) for a in np.meshgrid(np.arange(1, max_num + 1), np.arange(1, max_num + 1)))
  keep = (c * r >= min_num) & (c * r <= max_num)
  c, r = c[keep], r[keep]
  diff = np.abs(width / height - c / r)
  tied = np.flatnonzero(diff == diff.min())
  tied = tied[np.argsort(c[tied] * r[tied], kind='stable')]
  big_enough = [k for k in tied[1:] if width * height > 0.5 * tile * tile * c[k] * r[k]]
  k = big_enough[-1] if big_enough else tied[0]
  return int(c[k]), int(r[k])


def brute_minicpm(width, height, tile=TILE, max_slices=9):
  """MiniCPM-V sec. 2.2 with a square encoder: N = min(ceil(W H / tile^2), max); no slicing for
  N <= 1; else over m n in {N-1, N, N+1} (excluding 1 and > max) the (m, n) with the smallest
  |log(W / H) - log(m / n)|, the first in (count, m) order on ties."""
  N = min(math.ceil(width * height / tile ** 2), max_slices)
  if N <= 1:
    return None
  grids = np.array([(m, k // m) for k in (N - 1, N, N + 1) if 1 < k <= max_slices
                    for m in range(1, k + 1) if k % m == 0])
  err = np.abs(np.log(width / height) - np.log(grids[:, 0] / grids[:, 1]))
  return tuple(int(v) for v in grids[np.argmin(err)])


SIZES = [(448, 448), (1000, 1000), (896, 448), (300, 900), (1920, 1080), (800, 1333), (672, 448),
         (1333, 800), (100, 2000), (4000, 300), (560, 448), (1344, 1344), (50, 50), (1, 1000)]
RANDOM_SIZES = [tuple(int(v) for v in np.random.default_rng(0).integers(20, 3000, 2))
                for _ in range(200)]


@pytest.mark.parametrize('width,height,want', [
    (448, 448, (1, 1)), (1000, 1000, (3, 3)), (896, 448, (2, 1)), (300, 900, (1, 3)),
    (1920, 1080, (4, 2)), (800, 1333, (2, 3))])
def test_internvl_grid_worked_examples(width, height, want):
  """1:1 at 1000 px has 1e6 > 9 * 448^2 / 2 pixels, so (3, 3) beats (1, 1) and (2, 2); 16:9 ties
  (2, 1) and (4, 2) at ratio 2 and has enough pixels for (4, 2)."""
  assert tiling.internvl_grid(width, height) == want == brute_internvl(width, height)


@pytest.mark.parametrize('min_num,max_num', [(1, 12), (1, 6), (1, 1), (2, 9)])
def test_internvl_grid_matches_brute_force(min_num, max_num):
  for width, height in SIZES + RANDOM_SIZES:
    got = tiling.internvl_grid(width, height, TILE, min_num, max_num)
    assert got == brute_internvl(width, height, TILE, min_num, max_num), (width, height)


def test_internvl_candidates():
  grids = tiling.internvl_candidates(1, 12)
  assert len(grids) == sum(12 // c for c in range(1, 13)) == len(set(grids))
  assert [c * r for c, r in grids] == sorted(c * r for c, r in grids)


def pil_resize(image_XYC, width, height):
  """PIL's BICUBIC resize, channel by channel in float ('F') mode, as InternVL's image.resize."""
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image_XYC[..., ch]), mode='F')
                              .resize((width, height), Image.Resampling.BICUBIC))
                   for ch in range(image_XYC.shape[-1])], axis=-1)


@pytest.mark.parametrize('height,width,thumbnail', [(30, 50, True), (23, 9, True), (16, 16, True),
                                                    (40, 20, False)])
def test_internvl_tiles_match_pil_and_crop_boxes(height, width, thumbnail):
  tile = 16
  image = np.random.default_rng(height).standard_normal((height, width, 3)).astype(np.float32)
  tiles, grid = tiling.internvl_tiles(image, tile=tile, use_thumbnail=thumbnail)
  cols, rows = brute_internvl(width, height, tile)
  n = cols * rows
  assert (grid.rows, grid.cols, grid.thumbnail) == (rows, cols, thumbnail and n > 1)
  assert tiles.shape == (n + grid.thumbnail, tile, tile, 3) and tiles.dtype == np.float32
  resized = pil_resize(image, cols * tile, rows * tile)
  for i in range(n):  # InternVL's boxes: (i % cols) tile, (i // cols) tile, ...
    x0, y0 = (i % cols) * tile, (i // cols) * tile
    np.testing.assert_allclose(tiles[i], resized[y0:y0 + tile, x0:x0 + tile], atol=PIL_ATOL)
  if grid.thumbnail:
    np.testing.assert_allclose(tiles[-1], pil_resize(image, tile, tile), atol=PIL_ATOL)


def test_minicpm_score_is_the_papers_formula():
  rng = np.random.default_rng(3)
  for _ in range(20):
    W, H, Wv, Hv = rng.uniform(10, 2000, 4)
    m, n = rng.integers(1, 10, 2)
    want = -abs(np.log(W / m / (H / n)) - np.log(Wv / Hv))
    np.testing.assert_allclose(tiling.minicpm_score(W, H, m, n, Wv, Hv), want, rtol=1e-12)
  assert tiling.minicpm_score(1344, 448, 3, 1, 448, 448) == 0.0  # three square slices


@pytest.mark.parametrize('max_slices', [9, 4])
def test_minicpm_grid_matches_brute_force(max_slices):
  for width, height in SIZES + RANDOM_SIZES:
    assert tiling.minicpm_grid(width, height, TILE, max_slices) == \
        brute_minicpm(width, height, TILE, max_slices), (width, height)
  assert tiling.minicpm_grid(1344, 1344) == (3, 3) and tiling.minicpm_grid(448, 448) is None


def test_minicpm_slices_sizes_worked_by_hand():
  """1000 x 500: N = ceil(5e5 / 448^2) = 3, grid (2, 1) (ratio exactly 2). Each slice: 500 x 500
  upscaled to about 448^2 -> 448 x 448. Source: 5e5 > 448^2, r = 2, H' = int(448 / sqrt 2) = 316,
  W' = 632 -> rounded to multiples of 14: 630 x 322."""
  image = np.random.default_rng(0).standard_normal((500, 1000, 3)).astype(np.float32)
  source, slices, grid = tiling.minicpm_slices(image)
  assert (grid.rows, grid.cols, grid.thumbnail) == (1, 2, True)
  assert source.shape == (322, 630, 3) and slices.shape == (2, 448, 448, 3)
  np.testing.assert_allclose(source, pil_resize(image, 630, 322), atol=PIL_ATOL)
  resized = pil_resize(image, 896, 448)
  np.testing.assert_allclose(slices[1], resized[:, 448:], atol=PIL_ATOL)


def test_minicpm_sizes_round_as_released():
  """1178 x 1000: N = 6, grid (3, 2) (|log 1.178 - log 1.5| smallest). Source: H' = int(448 /
  sqrt 1.178) = int(412.77) = 412 -> 406 (rounding 412.77 first would give 420), W' = int(412 *
  1.178) = 485 -> 490. Slices: 1178 / 3 -> 1179 / 3 = 393, 1000 / 2 = 500; r = 0.786,
  H' = int(505.3) = 505 -> 504, W' = int(396.9) = 396 -> 392."""
  source, slices, grid = tiling.minicpm_slices(np.zeros((1000, 1178, 1), np.float32))
  assert (grid.rows, grid.cols) == (2, 3)
  assert source.shape == (406, 490, 1) and slices.shape == (6, 504, 392, 1)


def test_minicpm_unsliced_image_is_upscaled_source():
  """200 x 100 (< 448^2 pixels): no slices; r = 2, H' = int(448 / sqrt 2) = 316, W' = 632 ->
  630 x 322, upscaled as the release does for an unsliced image."""
  image = np.random.default_rng(1).standard_normal((100, 200, 1)).astype(np.float32)
  source, slices, grid = tiling.minicpm_slices(image)
  assert slices is None and grid == tiling.Grid(0, 0, True) and source.shape == (322, 630, 1)


def test_layout_exact_sequence():
  """2 x 3 grid, 2 tokens a tile, tile tags 10.., row end 7, thumbnail tag 9, image id 5."""
  ids = tiling.image_token_layout(tiling.Grid(2, 3, True), 2, image_id=5,
                                  tile_ids=range(10, 16), row_end_id=7, thumbnail_id=9)
  want = [10, 5, 5, 11, 5, 5, 12, 5, 5, 7, 13, 5, 5, 14, 5, 5, 15, 5, 5, 7, 9, 5, 5]
  assert ids.dtype == np.int32 and ids.tolist() == want
  minicpm = tiling.image_token_layout(tiling.Grid(2, 1, True), 1, image_id=5, tile_ids=[3, 3],
                                      row_end_id=7, thumbnail_id=9, thumbnail_first=True,
                                      row_end_after_last=False)
  assert minicpm.tolist() == [9, 5, 3, 5, 7, 3, 5]


@pytest.mark.parametrize('rows,cols,thumb', [(1, 1, False), (2, 4, True), (3, 1, True),
                                             (0, 0, True)])
@pytest.mark.parametrize('style', ['internvl', 'tagged', 'minicpm'])
def test_layout_token_counts(rows, cols, thumb, style):
  """InternVL 1.5: bare image tokens, 256 a tile (448 px, pixel shuffle); tagged: a tag per tile
  and thumbnail, a row end after each row; MiniCPM-V: 64 a slice, ends between rows."""
  grid, image_id = tiling.Grid(rows, cols, thumb), 1
  tokens = {'internvl': 256, 'tagged': 256, 'minicpm': 64}[style]
  kw = {'internvl': {}, 'tagged': dict(tile_ids=range(100, 112), row_end_id=2, thumbnail_id=3),
        'minicpm': dict(tile_ids=[4] * 12, row_end_id=2, thumbnail_id=3, thumbnail_first=True,
                        row_end_after_last=False)}[style]
  ids = tiling.image_token_layout(grid, tokens, image_id=image_id, **kw)
  n_images = rows * cols + thumb
  assert (ids == image_id).sum() == n_images * tokens
  markers = 0 if style == 'internvl' else n_images
  row_ends = {'internvl': 0, 'tagged': rows, 'minicpm': max(rows - 1, 0)}[style]
  assert len(ids) == n_images * tokens + markers + row_ends
  assert (ids == 2).sum() == row_ends


def test_errors():
  with pytest.raises(ValueError, match='rows=2, cols=0'):
    tiling.Grid(2, 0, True)
  with pytest.raises(ValueError, match='no tiles and no thumbnail'):
    tiling.Grid(0, 0, False)
  with pytest.raises(ValueError, match=r'expected \[height, width, channels\]'):
    tiling.internvl_tiles(np.zeros((8, 8)))
  with pytest.raises(ValueError, match='min_num=3, max_num=2'):
    tiling.internvl_grid(10, 10, min_num=3, max_num=2)
  with pytest.raises(ValueError, match='5 tile_ids for a 2 x 3 grid'):
    tiling.image_token_layout(tiling.Grid(2, 3, False), 4, image_id=1, tile_ids=range(5))
