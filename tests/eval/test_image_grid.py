"""Image grids and curves are written as PNGs of the stated size and content."""
import numpy as np
import pytest
from PIL import Image

from lab.eval import image_grid


@pytest.mark.parametrize('channels,mode', [(1, 'L'), (3, 'RGB')])
def test_grid_size_placement_and_values(tmp_path, channels, mode):
  b, x, y, nrow, pad = 7, 5, 4, 3, 2
  images_BXYC = np.random.default_rng(0).uniform(-1.2, 1.2, (b, x, y, channels))
  path = str(tmp_path / 'grid.png')
  image_grid.save_image_grid(images_BXYC, path, nrow=nrow, padding=pad)
  img = Image.open(path)
  assert img.mode == mode
  assert img.size == (nrow * (y + pad) + pad, 3 * (x + pad) + pad)  # PIL: (width, height)
  grid = np.asarray(img).reshape(img.size[1], img.size[0], channels)
  want = np.round((np.clip(images_BXYC, -1, 1) + 1) * 127.5)
  for i in range(b):  # image i sits in row i // nrow, column i % nrow
    top, left = pad + (i // nrow) * (x + pad), pad + (i % nrow) * (y + pad)
    np.testing.assert_array_equal(grid[top:top + x, left:left + y], want[i])
  assert np.all(grid[:pad] == 0) and np.all(grid[:, :pad] == 0)
  assert np.all(grid[pad + 2 * (x + pad):, pad + 1 * (y + pad):] == 0)  # the two empty slots


def test_bad_grid_arguments_are_errors(tmp_path):
  with pytest.raises(ValueError, match='C 1 or 3'):
    image_grid.save_image_grid(np.zeros((2, 4, 4, 2)), str(tmp_path / 'g.png'), nrow=2)
  with pytest.raises(ValueError, match='nrow=0'):
    image_grid.save_image_grid(np.zeros((2, 4, 4, 1)), str(tmp_path / 'g.png'), nrow=0)


def test_curve_png(tmp_path):
  path = str(tmp_path / 'fid_vs_nfe.png')
  image_grid.save_curve([4, 8, 16, 32], {'euler': [40, 20, 12, 9], 'heun': [25, 10, 7, 6]},
                        path, xlabel='NFE', ylabel='FID', log_x=True)
  img = Image.open(path)
  assert img.format == 'PNG' and img.size == (500, 350)  # figsize (5, 3.5) at 100 dpi
  assert len(np.unique(np.asarray(img.convert('RGB')).reshape(-1, 3), axis=0)) > 10  # drawn
  with pytest.raises(ValueError, match="'euler' has 3 values"):
    image_grid.save_curve([1, 2], {'euler': [1, 2, 3]}, path, 'NFE', 'FID')
