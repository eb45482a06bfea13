"""Patches: patchify layout and its inverse against loops, the 2-D sin-cos formula, and bicubic
resizing / position-embedding interpolation against torch.nn.functional.interpolate (float64) and
transformers' ViT recipe, with gradients."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads

from lab.nn import patches


def np_patchify(x_BXYC, p):
  """Patch (i, j) is row i * (Y/p) + j, holding x[i p:(i+1) p, j p:(j+1) p, :] flattened."""
  B, X, Y, _ = x_BXYC.shape
  return np.stack([x_BXYC[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(B, -1)
                   for i in range(X // p) for j in range(Y // p)], axis=1)


def torch_resize(x_XYD, rows, cols):
  """torch's bicubic (align_corners=False, given the size) of a channels-last grid, float64."""
  x = torch.from_numpy(np.asarray(x_XYD, np.float64)).permute(2, 0, 1)[None]
  y = torch.nn.functional.interpolate(x, size=(rows, cols), mode='bicubic', align_corners=False)
  return y[0].permute(1, 2, 0).numpy()


def hf_interpolate(pos_TD, g, rows, cols):
  """transformers' ViTEmbeddings.interpolate_pos_encoding (float64): the class row kept, the
  g x g patch rows reshaped to (1, D, g, g), resized bicubically, flattened back row-major."""
  pos = torch.from_numpy(pos_TD)[None]
  D = pos.shape[-1]
  grid = pos[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(rows, cols), mode='bicubic',
                                         align_corners=False)
  return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)[0].numpy()


def test_patchify_layout_and_round_trip():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 9, 2)).astype(np.float32)
  got = patches.patchify(jnp.asarray(x), 3)
  assert got.shape == (2, 6, 18)
  np.testing.assert_array_equal(got, np_patchify(x, 3))
  np.testing.assert_array_equal(patches.unpatchify(got, 3, 6, 9), x)
  y = rng.standard_normal((2, 6, 18)).astype(np.float32)
  np.testing.assert_array_equal(patches.patchify(patches.unpatchify(jnp.asarray(y), 3, 6, 9), 3),
                                y)


def test_pos_embed_formula():
  """MAE's 2-D sin-cos: patch (i, j) -> [sin(j w), cos(j w), sin(i w), cos(i w)],
  w_k = 10000^(-4k/d), k = 0 .. d/4 - 1."""
  gx, gy, d = 3, 5, 16
  w = 10_000.0 ** (-4 * np.arange(d // 4) / d)
  want = np.stack([np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
                   for i in range(gx) for j in range(gy)])
  got = patches.pos_embed(gx, gy, d)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize('shape, size', [((4, 4), (7, 5)), ((5, 3), (2, 6)), ((6, 6), (3, 3)),
                                         ((1, 4), (3, 2)), ((3, 3), (12, 12))])
def test_resize_bicubic_matches_torch(x64, shape, size):
  x = np.random.default_rng(sum(shape + size)).standard_normal((*shape, 3))
  got = patches.resize_bicubic(jnp.asarray(x), *size)
  assert got.dtype == jnp.float64 and got.shape == (*size, 3)
  np.testing.assert_allclose(got, torch_resize(x, *size), rtol=1e-12, atol=1e-12)


def test_bicubic_weights_are_a_partition_of_unity_and_identity_at_same_size():
  for n_in, n_out in ((4, 9), (9, 4), (1, 3), (5, 5)):
    np.testing.assert_allclose(patches.bicubic_weights(n_in, n_out).sum(1), 1.0, atol=1e-12)
  np.testing.assert_array_equal(patches.bicubic_weights(5, 5), np.eye(5))


@pytest.mark.parametrize('new_grid', [(6, 6), (2, 2), (6, 3)])
def test_interpolate_pos_embed_matches_transformers_recipe(x64, new_grid):
  g, D = 4, 5
  pos = np.random.default_rng(1).standard_normal((1 + g * g, D))
  got = patches.interpolate_pos_embed(jnp.asarray(pos), (g, g), new_grid, 1)
  assert got.shape == (1 + new_grid[0] * new_grid[1], D)
  np.testing.assert_array_equal(got[0], pos[0])
  np.testing.assert_allclose(got, hf_interpolate(pos, g, *new_grid), rtol=1e-12, atol=1e-12)


def test_interpolate_pos_embed_without_prefix_and_at_the_same_grid():
  pos = jnp.asarray(np.random.default_rng(2).standard_normal((3 * 4, 6)), jnp.float32)
  assert patches.interpolate_pos_embed(pos, (3, 4), (3, 4), 0) is pos
  got = patches.interpolate_pos_embed(pos, (3, 4), (5, 2), 0)
  np.testing.assert_allclose(got.reshape(5, 2, 6), torch_resize(pos.reshape(3, 4, 6), 5, 2),
                             rtol=1e-5, atol=1e-5)


def test_interpolate_pos_embed_gradients(x64):
  pos = np.random.default_rng(3).standard_normal((1 + 9, 4))
  check_grads(lambda p: patches.interpolate_pos_embed(p, (3, 3), (4, 5), 1), (pos,), order=1,
              modes=['rev'])


def test_interpolate_pos_embed_rejects_wrong_rows():
  with pytest.raises(ValueError, match='17 rows; expected 1 prefix rows plus 3 x 3'):
    patches.interpolate_pos_embed(jnp.zeros((17, 4)), (3, 3), (4, 4), 1)
