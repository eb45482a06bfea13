"""Ring collectives written with `jax.lax.ppermute`, for use inside `jax.shard_map`.

The bandwidth-optimal all-reduce (Patarasuk & Yuan 2009; Baidu's ring all-reduce) on n devices:
the array is flattened, zero-padded to n*M and cut into n chunks of M; a reduce-scatter of n-1
ppermute steps leaves device i with the sum of chunk i, and an all-gather of n-1 steps gives
every device every summed chunk: 2(n-1) steps, each sending 1/n of the array to the next device
on the ring (i -> i+1 mod n). The summation order differs from `psum`'s, so floating-point
results agree to rounding. Shape letters here: N = n, the devices on the ring; M, a chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _ring_perm(n: int) -> list[tuple[int, int]]:
  return [(i, (i + 1) % n) for i in range(n)]


def ring_reduce_scatter(x: jax.Array, axis_name: str) -> jax.Array:
  """chunk_M: this device's (index i) chunk of sum over devices of x, flattened and zero-padded
  to n*M with M = ceil(x.size / n); equals psum_scatter of the padded [n, M] array on dim 0.

  Step s = 0..n-2: device i holds the partial sum of chunk (i-1-s) mod n, passes it to i+1 and
  adds its own copy of chunk (i-2-s) mod n to what it receives; after n-1 steps it holds chunk i.
  """
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  M = -(-x.size // n)
  chunks_NM = jnp.pad(x.reshape(-1), (0, n * M - x.size)).reshape(n, M)
  acc_M = chunks_NM[(i - 1) % n]
  for s in range(n - 1):
    acc_M = jax.lax.ppermute(acc_M, axis_name, _ring_perm(n)) + chunks_NM[(i - 2 - s) % n]
  return acc_M


def ring_all_gather(chunk_M: jax.Array, axis_name: str) -> jax.Array:
  """flat_NM: the chunks of all n devices in device order (all_gather tiled on dim 0).

  Step s = 0..n-2: every device passes the chunk it received last (first its own) to i+1 and
  stores the one it receives, which is chunk (i-1-s) mod n.
  """
  n = jax.lax.axis_size(axis_name)
  i = jax.lax.axis_index(axis_name)
  M = chunk_M.shape[0]
  out_NM = jnp.zeros((n, M), chunk_M.dtype).at[i].set(chunk_M)
  for s in range(n - 1):
    chunk_M = jax.lax.ppermute(chunk_M, axis_name, _ring_perm(n))
    out_NM = out_NM.at[(i - 1 - s) % n].set(chunk_M)
  return out_NM.reshape(n * M)


def ring_all_reduce(x: jax.Array, axis_name: str) -> jax.Array:
  """psum(x, axis_name) as ring reduce-scatter + ring all-gather: 2(n-1) ppermute steps."""
  flat = ring_all_gather(ring_reduce_scatter(x, axis_name), axis_name)
  return flat[:x.size].reshape(x.shape)
