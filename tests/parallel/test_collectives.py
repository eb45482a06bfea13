"""Ring reduce-scatter, all-gather and all-reduce (ppermute) against psum, psum_scatter,
all_gather and float64 NumPy sums, on rings of 2, 4 and 8 simulated devices."""
import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from multidevice import on_8_devices

from lab.parallel import collectives

RING_SIZES = (2, 4, 8)
SHAPES = [(), (3, 5), (4, 6)]  # sizes 1 and 15 are not multiples of n; 24 is


def per_device(fn, n):
  """jit(shard_map(fn)) over a ring of n devices for a pytree of arrays: row d of each [n, ...]
  input is device d's value, row d of each output is device d's result."""
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('ring',))
  def local(tree):
    return jax.tree.map(lambda y: y[None], fn(jax.tree.map(lambda x: x[0], tree)))
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P('ring'), out_specs=P('ring')))


def ring_and_psum(n):
  return per_device(lambda xs: [(collectives.ring_all_reduce(x, 'ring'), jax.lax.psum(x, 'ring'))
                                for x in xs], n)


@on_8_devices
def test_ring_all_reduce_equals_psum_in_2_n_minus_1_ppermutes():
  rng = np.random.default_rng(0)
  for n in RING_SIZES:
    floats = [rng.standard_normal((n, *s)).astype(np.float32) for s in SHAPES]
    ints = rng.integers(-1000, 1000, (n, 3, 5)).astype(np.float32)  # float32 sums are exact
    results = ring_and_psum(n)(floats + [ints])
    for x, (got, psum) in zip(floats, results):
      assert got.shape == x.shape and got.dtype == np.float32
      np.testing.assert_allclose(got, psum, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(got, np.broadcast_to(x.astype(np.float64).sum(0), x.shape),
                                 rtol=1e-6, atol=1e-6)
    got, psum = results[-1]
    np.testing.assert_array_equal(got, psum)
    np.testing.assert_array_equal(got, np.broadcast_to(ints.sum(0), ints.shape))
    ring = per_device(lambda x: collectives.ring_all_reduce(x, 'ring'), n)
    jaxpr = str(jax.make_jaxpr(ring)(np.zeros((n, 3, 5), np.float32)))
    assert jaxpr.count('ppermute') == 2 * (n - 1)
    assert 'psum' not in jaxpr and 'all_gather' not in jaxpr


@on_8_devices
def test_reduce_scatter_and_all_gather_halves():
  rng = np.random.default_rng(1)
  for n in RING_SIZES:
    M = -(-15 // n)
    x = rng.integers(-1000, 1000, (n, 3, 5)).astype(np.float32)
    padded = np.zeros((n, n * M), np.float32)
    padded[:, :15] = x.reshape(n, 15)
    chunks = rng.standard_normal((n, M)).astype(np.float32)

    def halves(args):
      x, padded, chunk = args
      return (collectives.ring_reduce_scatter(x, 'ring'),
              jax.lax.psum_scatter(padded.reshape(n, M), 'ring'),
              collectives.ring_all_gather(chunk, 'ring'),
              jax.lax.all_gather(chunk, 'ring', tiled=True))

    scattered, psum_scattered, gathered, all_gathered = per_device(halves, n)((x, padded, chunks))
    np.testing.assert_array_equal(scattered, padded.astype(np.float64).sum(0).reshape(n, M))
    np.testing.assert_array_equal(scattered, psum_scattered)
    np.testing.assert_array_equal(gathered, np.broadcast_to(chunks.reshape(-1), (n, n * M)))
    np.testing.assert_array_equal(gathered, all_gathered)
