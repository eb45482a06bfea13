"""Image patches for vision transformers: patchify / unpatchify, 2-D sin-cos positions, and the
bicubic resizing of learned position embeddings to a new patch grid.

  patchify     ViT (Dosovitskiy et al. 2021, arXiv:2010.11929, sec. 3.1): x_BXYC -> x_BPC, the
               P = (X/p)(Y/p) flattened p x p patches in row-major order.
  pos_embed    fixed 2-D sin-cos positions of MAE (He et al. 2021, arXiv:2111.06377) and DiT
               (Peebles & Xie 2023, arXiv:2212.09748).
  interpolate_pos_embed
               learned positions on a gx x gy grid resized to a new grid by bicubic
               interpolation, as ViT fine-tunes at higher resolution (sec. 3.2) and as DeiT
               (Touvron et al. 2021, arXiv:2012.12877) and transformers' ViT
               `interpolate_pos_encoding` do it: torch's bicubic (Keys 1981 cubic convolution,
               a = -0.75), align_corners=False, given the output size, edges clamped, no
               antialiasing; the class-token row(s) in front are kept unchanged.
Letters beyond DESIGN.md's: U, W rows and columns of the new grid.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's (and OpenCV's) bicubic coefficient


def patchify(x_BXYC: jax.Array, p: int) -> jax.Array:
  """x_BPC: P = (X/p)(Y/p) patches in row-major order, each a vector of C = p * p * channels
  values in (row in patch, column in patch, channel) order, DiT's layout."""
  B, X, Y, C = x_BXYC.shape
  x = x_BXYC.reshape(B, X // p, p, Y // p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, (X // p) * (Y // p), p * p * C)


def unpatchify(x_BPC: jax.Array, p: int, X: int, Y: int) -> jax.Array:
  """The inverse of patchify: x_BXYC from patches of an X x Y image."""
  B, _, PC = x_BPC.shape
  C = PC // (p * p)
  x = x_BPC.reshape(B, X // p, Y // p, p, p, C).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(B, X, Y, C)


def pos_embed(gx: int, gy: int, d: int) -> np.ndarray:
  """pos_PD for a gx x gy patch grid (MAE / DiT 2-D sin-cos, float32): patch (i, j) gets
  [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k / (d/4)), k < d/4 (as in MAE's code,
  the first half encodes the column)."""
  w_k = 10_000.0 ** (-np.arange(d // 4) / (d // 4))
  i_P, j_P = (a.reshape(-1) for a in np.meshgrid(np.arange(gx), np.arange(gy), indexing='ij'))
  parts = [f(pos_P[:, None] * w_k) for pos_P in (j_P, i_P) for f in (np.sin, np.cos)]
  return np.concatenate(parts, axis=1).astype(np.float32)


def _cubic(s: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel at distances s: (a+2)|s|^3 - (a+3)|s|^2 + 1 for |s| <= 1,
  a|s|^3 - 5a|s|^2 + 8a|s| - 4a for 1 < |s| < 2, 0 beyond."""
  s, a = np.abs(s), CUBIC_A
  near = ((a + 2) * s - (a + 3)) * s * s + 1
  far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
  return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
  """w_UX (float64, n_out x n_in): 1-D bicubic resampling as torch computes it with
  align_corners=False and a given output size. Output u reads source coordinate
  s = (u + 1/2) n_in / n_out - 1/2 and weighs the four samples floor(s) - 1 .. floor(s) + 2 by
  the cubic kernel at their distance from s; samples outside [0, n_in) take the edge value."""
  s_U = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  first_U = np.floor(s_U).astype(int) - 1
  w_UX = np.zeros((n_out, n_in))
  for k in range(4):
    src_U = first_U + k
    np.add.at(w_UX, (np.arange(n_out), np.clip(src_U, 0, n_in - 1)), _cubic(s_U - src_U))
  return w_UX


def resize_bicubic(x_XYD: jax.Array, rows: int, cols: int) -> jax.Array:
  """x_UWD: the X x Y grid of D-vectors resampled to rows x cols (separable bicubic,
  y[u, w] = sum_{x, y} w_UX[u, x] w_WY[w, y] x[x, y], weights of `bicubic_weights`)."""
  X, Y, _ = x_XYD.shape
  w_UX = jnp.asarray(bicubic_weights(X, rows), x_XYD.dtype)
  w_WY = jnp.asarray(bicubic_weights(Y, cols), x_XYD.dtype)
  return jnp.einsum('UX,WY,XYD->UWD', w_UX, w_WY, x_XYD)


def interpolate_pos_embed(pos_TD: jax.Array, grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix: int) -> jax.Array:
  """pos_T'D for a new patch grid: the first num_prefix rows (class token) are kept, the
  gx * gy patch rows after them (row-major, as patchify orders patches) are resized bicubically
  from grid (gx, gy) to new_grid; T' = num_prefix + new_gx * new_gy. The same grid returns the
  input, as transformers' ViT does."""
  (gx, gy), (nx, ny) = grid, new_grid
  T, D = pos_TD.shape
  if T != num_prefix + gx * gy:
    raise ValueError(f'position embedding has {T} rows; expected {num_prefix} prefix rows plus '
                     f'{gx} x {gy} grid rows')
  if nx < 1 or ny < 1:
    raise ValueError(f'new_grid={new_grid}; expected positive sizes')
  if (gx, gy) == (nx, ny):
    return pos_TD
  grid_XYD = pos_TD[num_prefix:].reshape(gx, gy, D)
  new_PD = resize_bicubic(grid_XYD, nx, ny).reshape(nx * ny, D)
  return jnp.concatenate([pos_TD[:num_prefix], new_PD], axis=0)
