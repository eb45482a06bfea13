"""Noise-level and label conditioning against float64 NumPy formulas and diffusers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.nn import param_spec as ps
from lab.nn import timestep_embedding as temb


def np_sinusoidal(t_B, dim, max_period):
  """emb_k = cos(t f_k), emb_{h+k} = sin(t f_k), f_k = max_period^(-k/h), h = dim / 2."""
  h = dim // 2
  emb = np.zeros((len(t_B), dim))
  for b, t in enumerate(t_B):
    for k in range(h):
      f = max_period ** (-k / h)
      emb[b, k], emb[b, h + k] = np.cos(t * f), np.sin(t * f)
  return emb


def silu(x):
  return x / (1.0 + np.exp(-x))


NOISE = np.array([0.0, 1.0, 999.0, 0.25 * np.log(0.002), 0.25 * np.log(80.0), -3.7, 517.31])


@pytest.mark.parametrize('dim,max_period', [(2, 10_000.0), (16, 10_000.0), (64, 10_000.0),
                                            (32, 1_000.0), (8, 1.5)])
def test_sinusoidal_matches_formula(dim, max_period):
  got = temb.sinusoidal(jnp.asarray(NOISE, jnp.float32), dim, max_period)
  assert got.shape == (len(NOISE), dim) and got.dtype == jnp.float32
  t32 = NOISE.astype(np.float32).astype(np.float64)
  # float32 arguments t f_k of up to ~1000 carry ~1e-4 absolute rounding error.
  np.testing.assert_allclose(got, np_sinusoidal(t32, dim, max_period), atol=2e-4)


def test_sinusoidal_float64_is_exact(x64):
  got = temb.sinusoidal(jnp.asarray(NOISE), 32, 10_000.0)
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_sinusoidal(NOISE, 32, 10_000.0), rtol=1e-12, atol=1e-12)


def test_sinusoidal_matches_diffusers():
  """ADM / DiT layout = diffusers' get_timestep_embedding(flip_sin_to_cos=True, shift=0)."""
  torch = pytest.importorskip('torch')
  from diffusers.models.embeddings import get_timestep_embedding
  want = get_timestep_embedding(torch.tensor(NOISE, dtype=torch.float32), 24,
                                flip_sin_to_cos=True, downscale_freq_shift=0, max_period=500)
  got = temb.sinusoidal(jnp.asarray(NOISE, jnp.float32), 24, 500.0)
  np.testing.assert_allclose(got, want.numpy(), atol=2e-4)


@pytest.mark.parametrize('dim', [0, 7])
def test_sinusoidal_rejects_odd_dim(dim):
  with pytest.raises(ValueError, match=f'dim={dim}'):
    temb.sinusoidal(jnp.zeros(3), dim)


def test_sinusoidal_rejects_non_vector_noise():
  with pytest.raises(ValueError, match=r'\(3, 1\)'):
    temb.sinusoidal(jnp.zeros((3, 1)), 8)


def random_params(specs, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(np.float32), specs,
                      is_leaf=ps.is_spec)


def test_embed_noise_is_the_mlp_of_the_features():
  p = random_params(temb.mlp_specs(8, 12), 0)
  got = temb.embed_noise(jax.tree.map(jnp.asarray, p), jnp.asarray(NOISE, jnp.float32), 100.0)
  p = jax.tree.map(lambda a: a.astype(np.float64), p)
  h = silu(np_sinusoidal(NOISE.astype(np.float32), 8, 100.0) @ p['w1'] + p['b1'])
  np.testing.assert_allclose(got, h @ p['w2'] + p['b2'], rtol=1e-4, atol=1e-3)


def test_condition_adds_label_rows_and_none_means_null():
  specs = temb.condition_specs(3, 8, 12)
  assert specs['labels'].shape == (4, 12)  # 3 classes + the null label
  p = jax.tree.map(jnp.asarray, random_params(specs, 1))
  noise_B = jnp.asarray([0.5, 10.0, 300.0, -1.0])
  labels_B = jnp.asarray([0, 2, 3, 1], jnp.int32)
  got = temb.condition(p, noise_B, labels_B, 3, 1000.0)
  t_emb = temb.embed_noise(p['noise'], noise_B, 1000.0)
  np.testing.assert_allclose(got, t_emb + p['labels'][np.array([0, 2, 3, 1])], rtol=1e-6)
  np.testing.assert_allclose(temb.condition(p, noise_B, None, 3, 1000.0),
                             t_emb + p['labels'][3], rtol=1e-6)


def test_unconditional_rejects_labels_and_has_no_table():
  specs = temb.condition_specs(0, 8, 12)
  assert 'labels' not in specs
  p = jax.tree.map(jnp.asarray, random_params(specs, 2))
  with pytest.raises(ValueError, match='num_classes=0'):
    temb.condition(p, jnp.zeros(2), jnp.zeros(2, jnp.int32), 0, 1000.0)


def test_labels_of_the_wrong_shape_or_dtype_are_rejected():
  table = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r'shape \(2, 1\)'):
    temb.embed_labels(table, jnp.zeros((2, 1), jnp.int32), 2)
  with pytest.raises(ValueError, match='float32'):
    temb.embed_labels(table, jnp.zeros(2, jnp.float32), 2)
