"""Generated scenes: determinism per (seed, split, index), disjoint splits, held-out compositions,
and rendered pixels checked against an independent rasterisation (matplotlib point-in-polygon)
of the description."""
import collections

import numpy as np
import pytest
from matplotlib.path import Path
from scipy import ndimage

from lab.data import images, scenes

HOLDOUT = (('red', 'circle'), ('blue', 'digit'), ('green', 'cross'))


@pytest.fixture(scope='module')
def glyphs():
  return {s: scenes.Glyphs.load('digits', s) for s in scenes.SPLITS}


def _pairs(layout):
  return {(scenes.COLOURS[c], scenes.KINDS[k])
          for c, k in zip(layout.colour_BO.ravel(), layout.kind_BO.ravel()) if k >= 0}


def test_scene_i_depends_only_on_seed_split_and_index(glyphs):
  spec = scenes.SceneSpec(holdout=HOLDOUT, seed=5)
  x_all, all_ = scenes.generate(spec, 'train', np.arange(20), glyphs['train'])
  x_some, some = scenes.generate(spec, 'train', [17, 3, 11], glyphs['train'])
  np.testing.assert_array_equal(x_some, x_all[[17, 3, 11]])
  np.testing.assert_array_equal(some.centre_BO2, all_.centre_BO2[[17, 3, 11]])
  assert some.objects(0) == all_.objects(17)
  again, _ = scenes.generate(scenes.SceneSpec(holdout=HOLDOUT, seed=5), 'train', [17],
                             glyphs['train'])
  np.testing.assert_array_equal(again[0], x_all[17])
  other, _ = scenes.generate(scenes.SceneSpec(holdout=HOLDOUT, seed=6), 'train', [17],
                             glyphs['train'])
  assert not np.array_equal(other[0], x_all[17])
  np.testing.assert_array_equal(all_.take(np.array([2, 4])).kind_BO, all_.kind_BO[[2, 4]])


def test_splits_are_disjoint_and_holdout_pairs_only_in_test_holdout():
  spec = scenes.SceneSpec(holdout=HOLDOUT, digit_fraction=0.3)
  n = 600
  split = {s: scenes.layout(spec, s, np.arange(n)) for s in scenes.SPLITS}
  every = {(c, k) for c in scenes.COLOURS for k in scenes.KINDS}
  assert _pairs(split['train']) == every - set(HOLDOUT)
  assert _pairs(split['test']) == every - set(HOLDOUT)  # test: the seen compositions
  assert set(HOLDOUT) <= _pairs(split['test_holdout'])
  held_B = np.zeros(n, int)
  for c, k in HOLDOUT:
    held_B += ((split['test_holdout'].colour_BO == scenes.COLOURS.index(c))
               & (split['test_holdout'].kind_BO == scenes.KINDS.index(k))).sum(1)
  np.testing.assert_array_equal(held_B, 1)  # one held-out object a scene, among seen ones
  assert (split['test_holdout'].count_B > 1).mean() > 0.6
  # Separate random streams: no scene (its exact centres) occurs in two splits.
  keys = {s: {l.centre_BO2[b].tobytes() for b in range(n)} for s, l in split.items()}
  assert not keys['train'] & keys['test'] and not keys['train'] & keys['test_holdout']
  assert not keys['test'] & keys['test_holdout']
  with pytest.raises(ValueError, match='holdout'):
    scenes.layout(scenes.SceneSpec(), 'test_holdout', [0])


def test_layout_statistics_and_geometry():
  spec = scenes.SceneSpec(max_objects=4, digit_fraction=0.25)
  lay = scenes.layout(spec, 'train', np.arange(2000))
  np.testing.assert_allclose(np.bincount(lay.count_B)[1:] / 2000, 0.25, atol=0.04)
  real = lay.kind_BO >= 0
  assert real.sum() == lay.count_B.sum() and (real == (np.arange(4) < lay.count_B[:, None])).all()
  assert abs((lay.kind_BO[real] == scenes.DIGIT).mean() - 0.25) < 0.03
  assert abs(lay.large_BO[real].mean() - 0.5) < 0.03
  assert ((lay.digit_BO >= 0) == (lay.kind_BO == scenes.DIGIT)).all()
  for b in range(200):  # distinct cells, objects inside their cells
    cells = [tuple(c) for c in lay.cell_BO2[b, :lay.count_B[b]]]
    assert len(set(cells)) == len(cells)
  h = spec.half_cell
  lo_BO2 = lay.centre_BO2 - lay.radius_BO[..., None]
  hi_BO2 = lay.centre_BO2 + lay.radius_BO[..., None]
  assert (lo_BO2[real] >= 2 * h * lay.cell_BO2[real] - 1e-4).all()
  assert (hi_BO2[real] <= 2 * h * (lay.cell_BO2[real] + 1) + 1e-4).all()


def _oracle_mask(kind, centre, r, size, glyph=None):
  """Pixels (centres at +0.5) inside the described object, by point-in-polygon in float64."""
  rows, cols = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing='ij')
  pts = np.stack([rows.ravel(), cols.ravel()], 1)
  cr, cc = (float(v) for v in centre)
  r = float(r)
  if kind == 'circle':
    return ((rows - cr) ** 2 + (cols - cc) ** 2 <= r * r)
  if kind == 'digit':
    inside = (np.abs(rows - cr) < r) & (np.abs(cols - cc) < r)
    gi = np.clip(((rows - cr + r) / (2 * r) * glyph.shape[0]).astype(int), 0, glyph.shape[0] - 1)
    gj = np.clip(((cols - cc + r) / (2 * r) * glyph.shape[1]).astype(int), 0, glyph.shape[1] - 1)
    return inside & (glyph[gi, gj] >= 0)
  a, w, t = 0.8 * r, 0.3 * r, np.sqrt(3) / 2 * r
  poly = {'square': [(-a, -a), (-a, a), (a, a), (a, -a)],
          'diamond': [(-r, 0), (0, r), (r, 0), (0, -r)],
          'triangle': [(-r, 0), (r / 2, t), (r / 2, -t)],
          'cross': [(-r, -w), (-r, w), (-w, w), (-w, r), (w, r), (w, w), (r, w), (r, -w),
                    (w, -w), (w, -r), (-w, -r), (-w, -w)]}[kind]
  path = Path(np.array(poly) + [cr, cc])
  return path.contains_points(pts).reshape(size, size)


@pytest.mark.parametrize('size,grid', [(32, 3), (64, 3), (32, 2)])
def test_rendered_objects_have_the_stated_colour_place_shape_and_count(glyphs, size, grid):
  spec = scenes.SceneSpec(image_size=size, grid=grid, max_objects=min(4, grid * grid),
                          digit_fraction=0.3, seed=size + grid)
  x_BXYC, lay = scenes.generate(spec, 'test', np.arange(48), glyphs['test'])
  assert x_BXYC.shape == (48, size, size, 3) and x_BXYC.dtype == np.float32
  fg_BXY = x_BXYC.max(-1) > 0  # every palette colour has a channel at +1; background < -0.6
  bg = x_BXYC[~fg_BXY]
  assert bg.min() >= -0.9 - 1e-6 and bg.max() <= -0.7 + 1e-6 and bg.std() > 0.03
  cell_of = (np.arange(size) + 0.5) * grid // size  # the cell of each pixel row / column
  palette = {k: np.array(v) * 2.0 - 1 for k, v in scenes.PALETTE.items()}
  for b in range(48):
    objects = lay.objects(b)
    found = collections.Counter()
    for o, obj in enumerate(objects):
      in_cell = (cell_of[:, None] == obj.row) & (cell_of[None, :] == obj.col)
      mask = fg_BXY[b] & in_cell
      assert mask.sum() >= 4
      np.testing.assert_array_equal(x_BXYC[b][mask], np.broadcast_to(palette[obj.colour],
                                                                     (mask.sum(), 3)))
      centroid = np.argwhere(mask).mean(0) + 0.5
      r = lay.radius_BO[b, o]
      if obj.kind != 'digit':
        assert np.abs(centroid - lay.centre_BO2[b, o]).max() < 0.2 * r
        assert obj.size == ('large' if r > 0.7 * spec.half_cell else 'small')
      rows, cols = scenes.ROW_WORDS[grid], scenes.COL_WORDS[grid]
      assert rows[int(centroid[0] * len(rows) // size)] == obj.position[0]
      assert cols[int(centroid[1] * len(cols) // size)] == obj.position[1]
      glyph = None
      if obj.kind == 'digit':
        bank = glyphs['test']
        d = obj.digit
        glyph = bank.images_GIJ[bank.start_L[d] + lay.glyph_BO[b, o] % bank.count_L[d]]
      scores = {k: (_oracle_mask(k, lay.centre_BO2[b, o], r, size, glyph) == mask).sum()
                for k in scenes.KINDS if k != 'digit' or glyph is not None}
      np.testing.assert_array_equal(
          mask, _oracle_mask(obj.kind, lay.centre_BO2[b, o], r, size, glyph))
      found[max(scores, key=scores.get)] += 1
      if obj.kind != 'digit':
        assert ndimage.label(mask)[1] == 1
    assert found == collections.Counter(o.kind for o in objects)  # counts of each shape
    occupied = np.zeros((size, size), bool)
    for obj in objects:
      occupied |= (cell_of[:, None] == obj.row) & (cell_of[None, :] == obj.col)
    assert not fg_BXY[b][~occupied].any()  # empty cells hold only background


def test_glyph_banks_are_sorted_by_class_from_the_right_split(glyphs):
  x_train, y_train = images.load_arrays('digits', 'train')
  x_test, y_test = images.load_arrays('digits', 'test')
  for split, (x, y) in (('train', (x_train, y_train)), ('test_holdout', (x_test, y_test))):
    bank = glyphs[split]
    np.testing.assert_array_equal(bank.count_L, np.bincount(y, minlength=10))
    for d in range(10):
      np.testing.assert_array_equal(bank.images_GIJ[bank.start_L[d]:][:bank.count_L[d]],
                                    x[y == d, :, :, 0])


def test_mnist_glyphs_render(tfds_dir):
  bank = scenes.Glyphs.load('mnist', 'test', tfds_dir)
  assert bank.images_GIJ.shape == (10000, 28, 28) and bank.count_L.sum() == 10000
  spec = scenes.SceneSpec(image_size=64, digit_fraction=1.0, seed=1)
  x_BXYC, lay = scenes.generate(spec, 'test', np.arange(8), bank)
  for b in range(8):
    for o, obj in enumerate(lay.objects(b)):
      glyph = bank.images_GIJ[bank.start_L[obj.digit] + lay.glyph_BO[b, o] % bank.count_L[
          obj.digit]]
      want = _oracle_mask('digit', lay.centre_BO2[b, o], lay.radius_BO[b, o], 64, glyph)
      got = np.all(x_BXYC[b] == np.array(scenes.PALETTE[obj.colour]) * 2.0 - 1, -1) & want
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('kwargs,match', [
    ({'grid': 4}, 'grid=4'), ({'image_size': 16}, 'image_size=16'),
    ({'max_objects': 10}, 'max_objects=10'), ({'digit_fraction': 1.5}, 'digit_fraction=1.5'),
    ({'holdout': (('pink', 'circle'),)}, 'pink'), ({'noise': 0.5}, 'noise=0.5'),
    ({'holdout': tuple((c, 'square') for c in scenes.COLOURS)}, "'square'")])
def test_bad_specs_are_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    scenes.SceneSpec(**kwargs)


def test_bad_calls_are_errors():
  spec = scenes.SceneSpec(digit_fraction=1.0)
  with pytest.raises(ValueError, match='validation'):
    scenes.layout(spec, 'validation', [0])
  with pytest.raises(ValueError, match='-1'):
    scenes.layout(spec, 'train', [-1])
  with pytest.raises(ValueError, match='glyphs=None'):
    scenes.generate(spec, 'train', [0])
