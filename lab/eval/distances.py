"""Sample-based distances between two point clouds x_NC and y_MC.

Written in JAX: the samples a generative model draws live on the accelerator, and both metrics
are dense array work (L x (N + M) sorts, N x M kernel matrices) that jit runs there; under
jax.enable_x64 they compute in float64.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _quantile_pairing(n: int, m: int):
  """Indices (i_Q, j_Q) and weights w_Q with W_2^2 = sum_q w_q (xs_{i_q} - ys_{j_q})^2 for sorted
  1-D samples xs (n) and ys (m): the quantile functions F^-1(u) = xs_{floor(u n)} and
  G^-1(u) = ys_{floor(u m)} are both constant between consecutive breakpoints of
  {a / n} U {b / m}, so the integral int_0^1 (F^-1 - G^-1)^2 du is an exact finite sum.
  Breakpoints are counted in units of 1 / (n m) in int64 (they depend only on n and m)."""
  edges = np.unique(np.concatenate([np.arange(n + 1) * m, np.arange(m + 1) * n]))
  left = edges[:-1]
  return left // m, left // n, np.diff(edges) / (n * m)


def wasserstein_1d_squared(x_LN: jax.Array, y_LM: jax.Array) -> jax.Array:
  """W_2^2 between the empirical measures of each row of x_LN and y_LM (uniform weights)."""
  i_Q, j_Q, w_Q = _quantile_pairing(x_LN.shape[-1], y_LM.shape[-1])
  diff_LQ = jnp.sort(x_LN, axis=-1)[:, i_Q] - jnp.sort(y_LM, axis=-1)[:, j_Q]
  return (diff_LQ ** 2) @ jnp.asarray(w_Q, x_LN.dtype)


@functools.partial(jax.jit, static_argnames='n_projections')
def sliced_wasserstein(x_NC: jax.Array, y_MC: jax.Array, key: jax.Array,
                       n_projections: int = 256) -> jax.Array:
  """Sliced 2-Wasserstein distance (Bonneel et al. 2015):
  SW_2(x, y) = (E_theta W_2^2(<theta, x>, <theta, y>))^(1/2), theta uniform on the unit sphere,
  estimated with n_projections random directions drawn from `key`. N and M may differ: each 1-D
  W_2^2 is computed exactly between the two empirical measures (see _quantile_pairing)."""
  if x_NC.ndim != 2 or y_MC.ndim != 2 or x_NC.shape[1] != y_MC.shape[1]:
    raise ValueError(f'point clouds of shapes {x_NC.shape} and {y_MC.shape}; expected [N, C] and '
                     '[M, C] with the same C')
  dtype = jnp.result_type(x_NC, y_MC)
  theta_LC = jax.random.normal(key, (n_projections, x_NC.shape[1]), dtype)
  theta_LC /= jnp.linalg.norm(theta_LC, axis=1, keepdims=True)
  w2_L = wasserstein_1d_squared(jnp.einsum('LC,NC->LN', theta_LC, x_NC),
                                jnp.einsum('LC,MC->LM', theta_LC, y_MC))
  return jnp.sqrt(w2_L.mean())


def _rbf_sum(a_NC, b_MC, bandwidths):
  """sum_h exp(-||a_n - b_m||^2 / (2 h^2)), [N, M]."""
  d2_NM = jnp.maximum(jnp.sum(a_NC ** 2, 1)[:, None] + jnp.sum(b_MC ** 2, 1)[None]
                      - 2 * jnp.einsum('NC,MC->NM', a_NC, b_MC), 0.0)
  return sum(jnp.exp(-d2_NM / (2 * h ** 2)) for h in bandwidths)


@functools.partial(jax.jit, static_argnames='bandwidths')
def mmd_rbf(x_NC: jax.Array, y_MC: jax.Array, bandwidths=(0.1, 0.3, 1.0, 3.0)) -> jax.Array:
  """Unbiased squared MMD with the kernel k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2))
  (Gretton et al. 2012, eq. 3):
  MMD_u^2 = sum_{i != j} k(x_i, x_j) / (N (N - 1)) + sum_{i != j} k(y_i, y_j) / (M (M - 1))
            - 2 sum_{i, j} k(x_i, y_j) / (N M).
  Unbiased, so it can be slightly negative when the distributions match. Memory is O(N M).
  bandwidths is static (a tuple)."""
  n, m = x_NC.shape[0], y_MC.shape[0]
  if n < 2 or m < 2 or x_NC.shape[1:] != y_MC.shape[1:]:
    raise ValueError(f'point clouds of shapes {x_NC.shape} and {y_MC.shape}; expected [N, C] and '
                     '[M, C] with N, M >= 2 and the same C')
  k_xx = _rbf_sum(x_NC, x_NC, bandwidths)
  k_yy = _rbf_sum(y_MC, y_MC, bandwidths)
  k_xy = _rbf_sum(x_NC, y_MC, bandwidths)
  return ((k_xx.sum() - jnp.trace(k_xx)) / (n * (n - 1))
          + (k_yy.sum() - jnp.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean())
