"""PNG sample grids and quality-versus-NFE curves for the workdir."""
from __future__ import annotations

import numpy as np
from PIL import Image


def save_image_grid(images_BXYC, path: str, nrow: int, padding: int = 2) -> None:
  """Writes images in [-1, 1] (clipped) as one PNG: nrow images per row, `padding` black pixels
  around each, so the PNG is (ncol (X + p) + p) rows by (nrow (Y + p) + p) columns with
  ncol = ceil(B / nrow). C = 1 is written as greyscale, C = 3 as RGB."""
  images_BXYC = np.asarray(images_BXYC, np.float32)
  if images_BXYC.ndim != 4 or images_BXYC.shape[-1] not in (1, 3):
    raise ValueError(f'images of shape {images_BXYC.shape}; expected [B, X, Y, C] with C 1 or 3')
  if nrow < 1:
    raise ValueError(f'nrow={nrow}; expected at least 1')
  b, x, y, c = images_BXYC.shape
  ncol = -(-b // nrow)
  grid = np.zeros((ncol * (x + padding) + padding, nrow * (y + padding) + padding, c), np.uint8)
  pixels_BXYC = np.round((np.clip(images_BXYC, -1, 1) + 1) * 127.5).astype(np.uint8)
  for i, img_XYC in enumerate(pixels_BXYC):
    top, left = padding + (i // nrow) * (x + padding), padding + (i % nrow) * (y + padding)
    grid[top:top + x, left:left + y] = img_XYC
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path, format='PNG')


def save_curve(xs, ys_by_name: dict, path: str, xlabel: str, ylabel: str,
               log_x: bool = False) -> None:
  """One line per name of ys_by_name[name] against xs (e.g. FID against NFE), saved as a PNG."""
  from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
  fig = Figure(figsize=(5, 3.5), layout='tight')
  ax = fig.subplots()
  for name, ys in ys_by_name.items():
    if len(ys) != len(xs):
      raise ValueError(f'{name!r} has {len(ys)} values; expected one per x ({len(xs)})')
    ax.plot(xs, ys, marker='o', label=name)
  if log_x:
    ax.set_xscale('log')
  ax.set(xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=100)


def save_scatter(points_N2, path: str, limit: float = 3.0) -> None:
  """2-D samples as a square scatter plot on [-limit, limit]^2, saved as a PNG."""
  from matplotlib.figure import Figure
  points_N2 = np.asarray(points_N2)
  if points_N2.ndim != 2 or points_N2.shape[1] != 2:
    raise ValueError(f'points of shape {points_N2.shape}; expected [N, 2]')
  fig = Figure(figsize=(4, 4))
  ax = fig.add_subplot()
  ax.scatter(points_N2[:, 0], points_N2[:, 1], s=1, alpha=0.5)
  ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect='equal')
  fig.savefig(path, dpi=100)


def save_samples(samples, path: str) -> None:
  """[B, X, Y, C] images as a grid (about square), [N, 2] points as a scatter plot."""
  samples = np.asarray(samples)
  if samples.ndim == 4:
    save_image_grid(samples, path, nrow=int(np.ceil(np.sqrt(samples.shape[0]))))
  else:
    save_scatter(samples, path)
