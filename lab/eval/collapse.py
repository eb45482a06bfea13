"""Representation-collapse monitors for self-supervised embeddings z_BD.

  normalized_std  Chen & He 2021, "Exploring Simple Siamese Representation Learning" (SimSiam,
                  arXiv:2011.10566), sec. 4.1 and fig. 2 (middle): the standard deviation over
                  the batch of each dimension of z / ||z||_2, averaged over dimensions. It is
                  ~1 / sqrt(D) when z spreads like an isotropic Gaussian and 0 when every
                  example maps to the same vector.
  effective_rank  Roy & Vetterli 2007, "The effective rank: a measure of effective
                  dimensionality" (EUSIPCO): exp of the Shannon entropy of the normalised singular
                  values; ~D for a spread embedding matrix (B >> D), 1 for a collapsed one.

Letters: B examples, D embedding width, K = min(B, D) singular values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(z_BD: jax.Array) -> None:
  if z_BD.ndim != 2 or z_BD.shape[0] < 2:
    raise ValueError(f'embeddings of shape {z_BD.shape}; expected [B, D] with B >= 2')


@jax.jit
def normalized_std(z_BD: jax.Array) -> jax.Array:
  """mean_d std_b(z_bd / ||z_b||_2), the population std (1 / B) over the batch."""
  _check(z_BD)
  u_BD = z_BD / jnp.maximum(jnp.linalg.norm(z_BD, axis=1, keepdims=True), 1e-12)
  return jnp.mean(jnp.std(u_BD, axis=0))


@jax.jit
def effective_rank(z_BD: jax.Array) -> jax.Array:
  """erank(Z) = exp(-sum_k p_k log p_k) with p_k = sigma_k / sum_j sigma_j the singular values of
  Z (not centred, as Roy & Vetterli define it; 0 log 0 = 0). 1 <= erank <= min(B, D)."""
  _check(z_BD)
  sigma_K = jnp.linalg.svd(z_BD, compute_uv=False)
  p_K = sigma_K / jnp.sum(sigma_K)
  safe_K = jnp.where(p_K > 0, p_K, 1)
  return jnp.exp(-jnp.sum(jnp.where(p_K > 0, p_K * jnp.log(safe_K), 0)))
