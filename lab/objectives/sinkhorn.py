"""Online codes by Sinkhorn-Knopp, as SwAV computes them (Caron, Misra, Mairal, Goyal, Bojanowski
& Joulin 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
arXiv:2006.09882, sec. 3.1 and appendix A.1, Algorithm 1; Cuturi 2013, arXiv:1306.0895).

For B features z_b and K prototypes c_k, SwAV's codes Q (a K x B matrix in the paper; we store
its transpose q_BK) solve the entropic transport problem
  max_{Q in Q} Tr(Q^T C^T Z) + eps H(Q),                                           (eq. 4)
  Q = {Q in R_+^{K x B} : Q 1_B = 1_K / K,  Q^T 1_K = 1_B / B},                    (eq. 5)
the equal partition of the batch among the prototypes. Its solution is
  Q* = Diag(u) exp(C^T Z / eps) Diag(v),                                           (eq. 6)
whose scalings u, v a few Sinkhorn-Knopp iterations find: alternately rescale the prototype
marginals (column sums of q_BK) to 1/K and the sample marginals (row sums) to 1/B. The paper
uses eps = 0.05 and 3 iterations, after which the sample marginals are exact and the prototype
marginals approximate; `codes` multiplies by B so that every sample's code sums to one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(scores_BK: jax.Array, epsilon: float, n_iters: int) -> None:
  if scores_BK.ndim != 2:
    raise ValueError(f'sinkhorn: scores of shape {scores_BK.shape}; expected [B, K]')
  if not epsilon > 0:
    raise ValueError(f'sinkhorn epsilon={epsilon}; expected > 0')
  if n_iters < 1:
    raise ValueError(f'sinkhorn n_iters={n_iters}; expected at least 1')


def sinkhorn(scores_BK: jax.Array, epsilon: float = 0.05, n_iters: int = 3) -> jax.Array:
  """The transport plan q_BK (eq. 6) of scores s_bk = z_b . c_k, Algorithm 1 of the paper:
    q = exp(s / eps) / sum exp(s / eps), then n_iters times
    q_bk <- q_bk / (K sum_b' q_b'k)   (prototype marginals 1/K),
    q_bk <- q_bk / (B sum_k' q_bk')   (sample marginals 1/B).
  The largest score is subtracted before the exponential (it cancels in the first
  normalisation), so eps = 0.05 cannot overflow. Computed in at least float32; no gradient flows
  back to the scores (the codes are targets)."""
  _check(scores_BK, epsilon, n_iters)
  s_BK = jax.lax.stop_gradient(scores_BK).astype(jnp.promote_types(scores_BK.dtype, jnp.float32))
  B, K = s_BK.shape
  q_BK = jnp.exp((s_BK - s_BK.max()) / epsilon)
  q_BK = q_BK / q_BK.sum()
  for _ in range(n_iters):
    q_BK = q_BK / (K * q_BK.sum(axis=0, keepdims=True))
    q_BK = q_BK / (B * q_BK.sum(axis=1, keepdims=True))
  return q_BK


def codes(scores_BK: jax.Array, epsilon: float = 0.05, n_iters: int = 3) -> jax.Array:
  """q_BK = B sinkhorn(scores_BK): soft assignments, each row a distribution over the K
  prototypes, the batch spread (nearly) equally over them."""
  return scores_BK.shape[0] * sinkhorn(scores_BK, epsilon, n_iters)
