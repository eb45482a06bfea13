"""Procedurally generated scenes of coloured shapes and digit glyphs, for image-text models.

A synthetic, fully described image set in the spirit of CLEVR (Johnson et al. 2017,
arXiv:1612.06890) and Sort-of-CLEVR (Santoro et al. 2017, arXiv:1706.01427), with CLEVR-CoGenT's
held-out attribute compositions. A scene is an image_size^2 RGB image cut into a grid x grid
board; 1..max_objects cells (distinct, so objects never overlap) each hold one object: a shape
(circle, square, triangle, cross, diamond) or a digit glyph from scikit-learn's digits (or
MNIST), in one of seven saturated colours, small or large, jittered inside its cell. The
background is dark (-0.8) with mild uniform noise; objects are flat palette colours. Images are
float32 in [-1, 1], channels-last.

Splits 'train', 'test' and 'test_holdout' draw from separate random streams: example i of a split
is a function of (seed, split, i) alone, so it is the same however many examples are generated.
The (colour, kind) pairs in `holdout` never occur in 'train' or 'test'; every 'test_holdout'
scene holds exactly one held-out object among seen ones. Digit glyphs of 'train' come from the
glyph source's train split, those of the test splits from its test split.

Letters: B scenes, O object slots (max_objects), X,Y pixel rows, columns, C = 3 colours,
R uniforms drawn per scene, A of them per object, M objects of one kind, W the side of the
window an object is drawn in, G glyphs in a bank, I,J glyph rows, columns, L = 10 digit classes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from lab.data import images

SHAPES = ('circle', 'square', 'triangle', 'cross', 'diamond')
KINDS = SHAPES + ('digit',)
DIGIT = KINDS.index('digit')
PALETTE = {'red': (1, 0, 0), 'green': (0, 1, 0), 'blue': (0, 0, 1), 'yellow': (1, 1, 0),
           'magenta': (1, 0, 1), 'cyan': (0, 1, 1), 'white': (1, 1, 1)}
COLOURS = tuple(PALETTE)
_RGB = np.array(list(PALETTE.values()), np.float32) * 2 - 1  # [len(COLOURS), 3] in [-1, 1]
SPLITS = ('train', 'test', 'test_holdout')
SIZES = ('small', 'large')
RADIUS = {'small': 0.55, 'large': 0.8}  # object half-extent as a fraction of half a cell
BACKGROUND = -0.8
ROW_WORDS = {2: ('top', 'bottom'), 3: ('top', 'middle', 'bottom')}
COL_WORDS = {2: ('left', 'right'), 3: ('left', 'centre', 'right')}
_DRAWS_PER_OBJECT = 8  # digit?, shape, colour, size, digit class, glyph, row jitter, col jitter


class Object(NamedTuple):
  """One object of a scene: kind in KINDS, colour in COLOURS, size in SIZES, digit 0..9 for a
  digit glyph (else -1), its grid cell (row, col), and position words, e.g. ('top', 'left')."""
  kind: str
  colour: str
  size: str
  digit: int
  row: int
  col: int
  position: tuple[str, str]


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """What every split shares. holdout: (colour, kind) pairs kept out of 'train' and 'test'."""
  image_size: int = 32
  grid: int = 3
  max_objects: int = 4
  digit_fraction: float = 0.25
  holdout: tuple[tuple[str, str], ...] = ()
  noise: float = 0.1
  seed: int = 0

  def __post_init__(self):
    if self.grid not in ROW_WORDS:
      raise ValueError(f'grid={self.grid}; expected one of {sorted(ROW_WORDS)}')
    if self.image_size < 8 * self.grid:
      raise ValueError(f'image_size={self.image_size}; expected at least 8 pixels a cell, '
                       f'>= {8 * self.grid} for grid={self.grid}')
    if not 1 <= self.max_objects <= self.grid ** 2:
      raise ValueError(f'max_objects={self.max_objects}; expected 1..{self.grid ** 2} '
                       f'(one object a cell of the {self.grid}x{self.grid} grid)')
    if not 0.0 <= self.digit_fraction <= 1.0:
      raise ValueError(f'digit_fraction={self.digit_fraction}; expected a value in [0, 1]')
    if not 0.0 <= self.noise <= 0.2:
      raise ValueError(f'noise={self.noise}; expected a value in [0, 0.2] (background stays '
                       'dark, below -0.6)')
    for pair in self.holdout:
      if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in KINDS:
        raise ValueError(f'holdout pair {pair!r}; expected (colour, kind) with colour in '
                         f'{COLOURS} and kind in {KINDS}')
    for kind in KINDS:
      if all((c, kind) in self.holdout for c in COLOURS):
        raise ValueError(f'holdout holds every colour of {kind!r}; expected at least one seen')

  @property
  def half_cell(self) -> float:
    return self.image_size / (2 * self.grid)

  @property
  def draws(self) -> int:
    """R: uniforms drawn per scene (object count, cell order, then each object's attributes)."""
    return 1 + self.grid ** 2 + _DRAWS_PER_OBJECT * self.max_objects


@dataclasses.dataclass(frozen=True)
class Layout:
  """The structured description of B scenes; slots o >= count_B[b] are empty (-1).

  kind_BO, colour_BO index KINDS, COLOURS; large_BO is the size; digit_BO 0..9 or -1; glyph_BO a
  random integer that picks the glyph instance; cell_BO2 the grid (row, col); centre_BO2 the
  centre in pixels (pixel (x, y) covers [x, x + 1) x [y, y + 1)); radius_BO the half-extent.
  """
  split: str
  grid: int
  index_B: np.ndarray
  count_B: np.ndarray
  kind_BO: np.ndarray
  colour_BO: np.ndarray
  large_BO: np.ndarray
  digit_BO: np.ndarray
  glyph_BO: np.ndarray
  cell_BO2: np.ndarray
  centre_BO2: np.ndarray
  radius_BO: np.ndarray

  def __len__(self) -> int:
    return len(self.index_B)

  def take(self, rows) -> Layout:
    """The scenes at positions `rows` (an int array) of this layout."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return Layout(**{k: v if k in ('split', 'grid') else v[rows] for k, v in fields.items()})

  def objects(self, b: int) -> tuple[Object, ...]:
    """Scene b's objects, in slot order."""
    out = []
    for o in range(self.count_B[b]):
      row, col = (int(v) for v in self.cell_BO2[b, o])
      out.append(Object(KINDS[self.kind_BO[b, o]], COLOURS[self.colour_BO[b, o]],
                        SIZES[int(self.large_BO[b, o])], int(self.digit_BO[b, o]), row, col,
                        (ROW_WORDS[self.grid][row], COL_WORDS[self.grid][col])))
    return tuple(out)


def _split_id(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f'split={split!r}; expected one of {SPLITS}')
  return SPLITS.index(split)


def seen_colours(spec: SceneSpec) -> np.ndarray:
  """int[len(KINDS), len(COLOURS)]: row k lists the colours seen with kind k first, then -1."""
  table = np.full((len(KINDS), len(COLOURS)), -1)
  for k, kind in enumerate(KINDS):
    seen = [c for c, colour in enumerate(COLOURS) if (colour, kind) not in spec.holdout]
    table[k, :len(seen)] = seen
  return table


def split_pairs(spec: SceneSpec, split: str) -> tuple[tuple[str, str], ...]:
  """The (colour, kind) pairs that may occur in `split`: all of them in 'test_holdout', the
  seen ones (not in spec.holdout) in 'train' and 'test'."""
  _split_id(split)
  return tuple((c, k) for k in KINDS for c in COLOURS
               if split == 'test_holdout' or (c, k) not in spec.holdout)


def _blank(a_BO, empty_BO, dtype):
  """a_BO (or a_BO2) with -1 in the empty slots, as dtype."""
  return np.where(empty_BO.reshape(empty_BO.shape + (1,) * (a_BO.ndim - 2)), -1, a_BO
                  ).astype(dtype)


def layout(spec: SceneSpec, split: str, indices) -> Layout:
  """Draws the scenes `indices` of `split`: scene i from np.random.default_rng((seed, split, i,
  0)).random(R), then everything else vectorised over the B scenes."""
  sid = _split_id(split)
  if split == 'test_holdout' and not spec.holdout:
    raise ValueError('split="test_holdout" needs holdout pairs; SceneSpec.holdout is empty')
  index_B = np.asarray(indices, np.int64).reshape(-1)
  if not index_B.size or index_B.min() < 0:
    raise ValueError(f'scene indices {index_B}; expected a non-empty array of indices >= 0')
  u_BR = np.stack([np.random.default_rng((spec.seed, sid, int(i), 0)).random(spec.draws)
                   for i in index_B])
  B, O, g = len(index_B), spec.max_objects, spec.grid
  count_B = 1 + (u_BR[:, 0] * O).astype(np.int64)
  cells_BO = np.argsort(u_BR[:, 1:1 + g * g], axis=1)[:, :O]
  u_BOA = u_BR[:, 1 + g * g:].reshape(B, O, _DRAWS_PER_OBJECT)
  kind_BO = np.where(u_BOA[..., 0] < spec.digit_fraction, DIGIT,
                     (u_BOA[..., 1] * len(SHAPES)).astype(np.int64))
  table = seen_colours(spec)
  n_seen = (table >= 0).sum(1)
  colour_BO = table[kind_BO, (u_BOA[..., 2] * n_seen[kind_BO]).astype(np.int64)]
  if split == 'test_holdout':
    pairs = np.array([(COLOURS.index(c), KINDS.index(k)) for c, k in spec.holdout])
    pick_B = (u_BOA[:, 0, 2] * len(pairs)).astype(np.int64)
    colour_BO[:, 0], kind_BO[:, 0] = pairs[pick_B, 0], pairs[pick_B, 1]
  large_BO = u_BOA[..., 3] < 0.5
  digit_BO = np.where(kind_BO == DIGIT, (u_BOA[..., 4] * 10).astype(np.int64), -1)
  glyph_BO = (u_BOA[..., 5] * 2 ** 31).astype(np.int64)
  cell_BO2 = np.stack([cells_BO // g, cells_BO % g], -1)
  h = spec.half_cell
  radius_BO = np.where(large_BO, RADIUS['large'], RADIUS['small']) * h
  jitter_BO2 = (2 * u_BOA[..., 6:8] - 1) * (h - radius_BO)[..., None]
  centre_BO2 = (2 * cell_BO2 + 1) * h + jitter_BO2
  empty_BO = np.arange(O)[None] >= count_B[:, None]
  i32, f32 = np.int32, np.float32
  return Layout(split, g, index_B, count_B.astype(i32), _blank(kind_BO, empty_BO, i32),
                _blank(colour_BO, empty_BO, i32), large_BO & ~empty_BO,
                _blank(digit_BO, empty_BO, i32), _blank(glyph_BO, empty_BO, np.int64),
                _blank(cell_BO2, empty_BO, i32), _blank(centre_BO2, empty_BO, f32),
                _blank(radius_BO, empty_BO, f32))


@dataclasses.dataclass(frozen=True)
class Glyphs:
  """A bank of digit glyphs in [-1, 1], sorted by class: class d is images_GIJ[start_L[d]:
  start_L[d] + count_L[d]]."""
  images_GIJ: np.ndarray
  start_L: np.ndarray
  count_L: np.ndarray

  @classmethod
  def load(cls, source: str, split: str, data_dir: str = '') -> Glyphs:
    """The glyphs a scene split uses: source 'digits' | 'mnist' (lab.data.images.load_arrays),
    its train split for scene split 'train', its test split for 'test' and 'test_holdout'."""
    _split_id(split)
    x_GIJ1, label_G = images.load_arrays(source, 'train' if split == 'train' else 'test',
                                         data_dir)
    order = np.argsort(label_G, kind='stable')
    count_L = np.bincount(label_G, minlength=10)
    if count_L.min() == 0:
      raise ValueError(f'glyph source {source!r} lacks digit {int(count_L.argmin())}')
    return cls(x_GIJ1[order, :, :, 0], np.cumsum(count_L) - count_L, count_L)


def _shape_mask(kind: str, u_MWW, v_MWW):
  """Membership of pixels at offsets (u, v) = (dx, dy) / radius from an object's centre:
  circle u^2 + v^2 <= 1; square max(|u|, |v|) <= 0.8; upward triangle with its centroid at the
  centre, apex (-1, 0) and base u = 1/2 from v = -sqrt(3)/2 to sqrt(3)/2; cross of two bars of
  half-width 0.3 and half-length 1; diamond |u| + |v| <= 1."""
  au, av = np.abs(u_MWW), np.abs(v_MWW)
  if kind == 'circle':
    return u_MWW ** 2 + v_MWW ** 2 <= 1
  if kind == 'square':
    return np.maximum(au, av) <= 0.8
  if kind == 'triangle':
    return (u_MWW <= 0.5) & (av <= (u_MWW + 1) / np.sqrt(3))
  if kind == 'cross':
    return ((au <= 1) & (av <= 0.3)) | ((av <= 1) & (au <= 0.3))
  return au + av <= 1  # diamond


def _glyph_mask(u_MWW, v_MWW, glyph_MIJ):
  """A glyph stretched over [-1, 1)^2 (nearest neighbour), foreground where its value >= 0."""
  M, I, J = glyph_MIJ.shape
  gi_MWW = np.clip(((u_MWW + 1) / 2 * I).astype(np.int64), 0, I - 1)
  gj_MWW = np.clip(((v_MWW + 1) / 2 * J).astype(np.int64), 0, J - 1)
  value_MWW = glyph_MIJ[np.arange(M)[:, None, None], gi_MWW, gj_MWW]
  return (np.abs(u_MWW) < 1) & (np.abs(v_MWW) < 1) & (value_MWW >= 0)


def render(spec: SceneSpec, scenes: Layout, glyphs: Glyphs | None) -> np.ndarray:
  """float32[B, X, Y, 3] images in [-1, 1] of the described scenes. Background pixels are
  -0.8 + noise * (2 n - 1), n ~ U[0, 1) from default_rng((seed, split, i, 1)); an
  object's pixels are its palette colour (0 -> -1, 1 -> 1), tested in a window W x W over its
  cell. glyphs may be None when no scene holds a digit."""
  s, g, (B, O) = spec.image_size, spec.grid, scenes.kind_BO.shape
  if glyphs is None and (scenes.kind_BO == DIGIT).any():
    raise ValueError('scenes hold digit objects but glyphs=None; pass Glyphs.load(...)')
  sid = _split_id(scenes.split)
  noise_BXYC = np.stack([np.random.default_rng((spec.seed, sid, int(i), 1)).random(
      (s, s, 3), np.float32) for i in scenes.index_B])
  image_BXYC = BACKGROUND + spec.noise * (2 * noise_BXYC - 1)
  W = int(np.ceil(s / g)) + 1
  origin_BO2 = np.floor(np.maximum(scenes.cell_BO2, 0) * s / g).astype(np.int64)
  rows_BOW = np.minimum(origin_BO2[..., 0, None] + np.arange(W), s - 1)
  cols_BOW = np.minimum(origin_BO2[..., 1, None] + np.arange(W), s - 1)
  r_BO1 = scenes.radius_BO[..., None]
  u_BOW = (rows_BOW + 0.5 - scenes.centre_BO2[..., 0, None]) / r_BO1
  v_BOW = (cols_BOW + 0.5 - scenes.centre_BO2[..., 1, None]) / r_BO1
  mask_BOWW = np.zeros((B, O, W, W), bool)
  for kind in range(len(KINDS)):
    sel_BO = scenes.kind_BO == kind
    u_MWW, v_MWW = u_BOW[sel_BO][:, :, None], v_BOW[sel_BO][:, None, :]
    if kind != DIGIT:
      mask_BOWW[sel_BO] = _shape_mask(KINDS[kind], u_MWW, v_MWW)
    elif sel_BO.any():
      digit_M = scenes.digit_BO[sel_BO]
      g_M = glyphs.start_L[digit_M] + scenes.glyph_BO[sel_BO] % glyphs.count_L[digit_M]
      mask_BOWW[sel_BO] = _glyph_mask(u_MWW, v_MWW, glyphs.images_GIJ[g_M])
  b, o, i, j = np.nonzero(mask_BOWW)
  image_BXYC[b, rows_BOW[b, o, i], cols_BOW[b, o, j]] = _RGB[scenes.colour_BO[b, o]]
  return image_BXYC


def generate(spec: SceneSpec, split: str, indices, glyphs: Glyphs | None = None):
  """(images float32[B, X, Y, 3] in [-1, 1], Layout) of the scenes `indices` of `split`."""
  scenes = layout(spec, split, indices)
  return render(spec, scenes, glyphs), scenes
