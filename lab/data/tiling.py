"""Dynamic high-resolution tiling of one image into encoder-sized tiles, and its token layout.

  InternVL 1.5 (Chen et al. 2024, arXiv 2404.16821, sec. 3.3, and the released dynamic_preprocess /
  find_closest_aspect_ratio): pick a grid of cols x rows tiles of tile x tile pixels, resize the
  image to (rows tile, cols tile), cut rows * cols tiles in row-major order, and append a global
  thumbnail (the whole image resized to tile x tile) when there is more than one tile.
  MiniCPM-V (Yao et al. 2024, arXiv 2408.01800, sec. 2.2, "adaptive visual encoding"): pick an
  m x n slice grid by the score of the paper, resize and cut slices whose sides are multiples of
  the patch size, with the whole image as the "source" thumbnail.

Images are channels-last float32 image_XYC: X rows (the height), Y columns (the width). Resizing
is jax.image.resize 'cubic' with antialiasing: Keys' bicubic (a = -0.5) whose kernel widens by
the scale when shrinking, i.e. PIL's BICUBIC filter, which both released pipelines call. Values
are not clipped (bicubic may overshoot the input range). Letters: I tiles.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Grid:
  """rows x cols tiles, plus a thumbnail when `thumbnail`; rows = cols = 0 means the thumbnail
  alone (MiniCPM-V's unsliced image)."""
  rows: int
  cols: int
  thumbnail: bool

  def __post_init__(self):
    if self.rows < 0 or self.cols < 0 or (self.rows == 0) != (self.cols == 0):
      raise ValueError(f'Grid rows={self.rows}, cols={self.cols}; expected two positive counts '
                       'or both 0')
    if self.rows == 0 and not self.thumbnail:
      raise ValueError('Grid with no tiles and no thumbnail; expected at least one image')


def _check_image(image_XYC) -> tuple[int, int]:
  if np.ndim(image_XYC) != 3 or min(np.shape(image_XYC)) < 1:
    raise ValueError(f'image has shape {np.shape(image_XYC)}; expected [height, width, channels]')
  return np.shape(image_XYC)[0], np.shape(image_XYC)[1]


def _resize(image_XYC, height: int, width: int) -> jax.Array:
  shape = (height, width, np.shape(image_XYC)[2])
  return jax.image.resize(np.asarray(image_XYC, np.float32), shape, 'cubic', antialias=True)


def _cut(image_XYC: jax.Array, rows: int, cols: int) -> jax.Array:
  """tiles_IXYC of a (rows h) x (cols w) image, tile r * cols + c covering rows r h..(r+1) h and
  columns c w..(c+1) w (InternVL's crop boxes, MiniCPM-V's split_to_patches)."""
  X, Y, C = image_XYC.shape
  h, w = X // rows, Y // cols
  tiles = image_XYC.reshape(rows, h, cols, w, C).transpose(0, 2, 1, 3, 4)
  return tiles.reshape(rows * cols, h, w, C)


# ----------------------------------------------------------------------------- InternVL 1.5


def internvl_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
  """All (cols, rows) with min_num <= cols rows <= max_num, in the order they are scanned: by
  cols rows, then by cols. (The release sorts a Python set by cols rows, leaving the order
  within one product to the set; with min_num = 1 it never matters: two grids of one product on
  either side of the image's ratio always enclose a closer grid of smaller product.)"""
  if not 1 <= min_num <= max_num:
    raise ValueError(f'min_num={min_num}, max_num={max_num}; expected 1 <= min_num <= max_num')
  return sorted(((i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1)
                 if min_num <= i * j <= max_num), key=lambda g: (g[0] * g[1], g[0]))


def internvl_grid(width: int, height: int, tile: int = 448, min_num: int = 1,
                  max_num: int = 12) -> tuple[int, int]:
  """(cols, rows) by InternVL's find_closest_aspect_ratio: scanning internvl_candidates, a grid
  whose |W/H - cols/rows| is strictly smaller replaces the best; an equally close one replaces
  it when W H > tile^2 cols rows / 2 (the image has more than half the pixels of that grid), so
  ties go to the larger grid while the image is big enough for it. Starts from (1, 1)."""
  aspect, area = width / height, width * height
  best, best_diff = (1, 1), math.inf
  for cols, rows in internvl_candidates(min_num, max_num):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
      best = (cols, rows)
  return best


def internvl_tiles(image_XYC, tile: int = 448, min_num: int = 1, max_num: int = 12,
                   use_thumbnail: bool = True) -> tuple[jax.Array, Grid]:
  """(tiles_IXYC, grid) by InternVL's dynamic_preprocess: the image resized to (rows tile,
  cols tile), cut into rows cols tiles in row-major order, then the thumbnail (the whole image
  resized to tile x tile) when use_thumbnail and rows cols > 1. I = rows cols (+ 1)."""
  height, width = _check_image(image_XYC)
  cols, rows = internvl_grid(width, height, tile, min_num, max_num)
  tiles_IXYC = _cut(_resize(image_XYC, rows * tile, cols * tile), rows, cols)
  thumbnail = use_thumbnail and rows * cols > 1
  if thumbnail:
    tiles_IXYC = jnp.concatenate([tiles_IXYC, _resize(image_XYC, tile, tile)[None]])
  return tiles_IXYC, Grid(rows, cols, thumbnail)


# ----------------------------------------------------------------------------- MiniCPM-V


def minicpm_score(width: float, height: float, m: int, n: int, tile_w: int, tile_h: int) -> float:
  """S(m, n) = -|log((W / m) / (H / n)) - log(W_v / H_v)| (MiniCPM-V sec. 2.2): how far the
  slices' aspect ratio is from the encoder's, for m columns and n rows."""
  return -abs(math.log((width / m) / (height / n)) - math.log(tile_w / tile_h))


def minicpm_grid(width: int, height: int, tile: int = 448, max_slices: int = 9
                 ) -> tuple[int, int] | None:
  """(m, n) = (cols, rows) maximising minicpm_score over m n in {N - 1, N, N + 1}, where
  N = min(ceil(W H / tile^2), max_slices); slice counts of 1 or above max_slices are skipped and
  the first maximum in the scan (N - 1, N, N + 1, then increasing m) wins, as in the release's
  get_sliced_grid. None when N <= 1: the image is not sliced."""
  if max_slices < 1:
    raise ValueError(f'max_slices={max_slices}; expected >= 1')
  N = min(math.ceil(width * height / (tile * tile)), max_slices)
  if N <= 1:
    return None
  counts = [k for k in (N - 1, N, N + 1) if 1 < k <= max_slices]
  grids = [(m, k // m) for k in counts for m in range(1, k + 1) if k % m == 0]
  return max(grids, key=lambda g: minicpm_score(width, height, *g, tile, tile))


def _to_patch_multiple(length: float, patch: int) -> int:
  """MiniCPM-V's ensure_divide: the nearest multiple of patch (Python's round), at least patch."""
  return max(round(length / patch) * patch, patch)


def minicpm_resize_size(width: float, height: float, tile: int, patch: int,
                        upscale: bool) -> tuple[int, int]:
  """(width, height) of MiniCPM-V's find_best_resize: when the image has more than tile^2
  pixels (or `upscale`), rescale to about tile^2 pixels at its aspect ratio r = W / H
  (H' = int(tile / sqrt(r)), W' = int(H' r)); then round both sides to multiples of patch."""
  if width * height > tile * tile or upscale:
    r = width / height
    height = int(tile / math.sqrt(r))
    width = int(height * r)
  return _to_patch_multiple(width, patch), _to_patch_multiple(height, patch)


def minicpm_slices(image_XYC, tile: int = 448, patch: int = 14, max_slices: int = 9
                   ) -> tuple[jax.Array, jax.Array | None, Grid]:
  """(source_XYC, slices_IXYC or None, grid) by MiniCPM-V's slice_image. Unsliced: the image
  resized by minicpm_resize_size(upscale=True). Sliced into m x n: the source is resized without
  upscaling; the image is resized to m w x n h, where (w, h) = minicpm_resize_size of one slice
  of the image rounded to m x n (ensure_divide by m and n), with upscaling, and cut into m n
  slices in row-major order."""
  height, width = _check_image(image_XYC)
  grid = minicpm_grid(width, height, tile, max_slices)
  if grid is None:
    w, h = minicpm_resize_size(width, height, tile, patch, upscale=True)
    return _resize(image_XYC, h, w), None, Grid(0, 0, True)
  m, n = grid
  w, h = minicpm_resize_size(width, height, tile, patch, upscale=False)
  source_XYC = _resize(image_XYC, h, w)
  slice_w = _to_patch_multiple(width, m) / m
  slice_h = _to_patch_multiple(height, n) / n
  w, h = minicpm_resize_size(slice_w, slice_h, tile, patch, upscale=True)
  return source_XYC, _cut(_resize(image_XYC, n * h, m * w), n, m), Grid(n, m, True)


# ----------------------------------------------------------------------------- token layout


def image_token_layout(grid: Grid, tokens_per_tile: int, *, image_id: int,
                       tile_ids: Sequence[int] | None = None, row_end_id: int | None = None,
                       thumbnail_id: int | None = None, thumbnail_first: bool = False,
                       row_end_after_last: bool = True) -> np.ndarray:
  """int32 token ids of one image: for each row of tiles, each tile as [tile_ids[k]] then
  tokens_per_tile copies of image_id (k = r cols + c), and row_end_id after the row; the
  thumbnail as [thumbnail_id] then tokens_per_tile image_ids, after the tiles (InternVL, NVLM's
  tile tags) or before them (thumbnail_first: MiniCPM-V's source image). A marker argument left
  None is left out. row_end_after_last=False puts row ends only between rows (MiniCPM-V joins
  its rows with '\\n'). The ids are placeholders the tokenizer defines."""
  if tokens_per_tile < 1:
    raise ValueError(f'tokens_per_tile={tokens_per_tile}; expected >= 1')
  n_tiles = grid.rows * grid.cols
  if tile_ids is not None and len(tile_ids) < n_tiles:
    raise ValueError(f'{len(tile_ids)} tile_ids for a {grid.rows} x {grid.cols} grid; expected '
                     f'at least {n_tiles}')
  image = [image_id] * tokens_per_tile
  tiles = []
  for r in range(grid.rows):
    for c in range(grid.cols):
      tiles += ([] if tile_ids is None else [tile_ids[r * grid.cols + c]]) + image
    if row_end_id is not None and (row_end_after_last or r < grid.rows - 1):
      tiles.append(row_end_id)
  thumb = ([] if thumbnail_id is None else [thumbnail_id]) + image if grid.thumbnail else []
  return np.asarray(thumb + tiles if thumbnail_first else tiles + thumb, np.int32)
