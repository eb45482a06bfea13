"""Ring attention over a 'seq' axis of 4 and 8 simulated devices equals the reference attention
on the whole sequence, causal and not, with grouped kv heads: outputs and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from multidevice import on_8_devices

from lab.kernels.flash_attention import reference
from lab.parallel import ring_attention

B, L, N, K, H, G = 2, 32, 4, 2, 8, 6  # L: the whole sequence; value head dim G != H


def value_and_grads(attend):
  """(sum(o * r), o), grads w.r.t. q, k, v."""
  r_BLNG = np.random.default_rng(9).standard_normal((B, L, N, G)).astype(np.float32)

  def loss(q, k, v):
    o_BLNG = attend(q, k, v)
    return jnp.sum(o_BLNG * r_BLNG), o_BLNG
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def ring(n, causal, backend='xla'):
  """Ring attention over the first n devices, q, k, v and o split on their length dim."""
  mesh = Mesh(np.asarray(jax.devices()[:n]), ('seq',))
  seq = P(None, 'seq')
  return jax.shard_map(functools.partial(ring_attention.ring_attention, axis_name='seq',
                                         causal=causal, backend=backend),
                       mesh=mesh, in_specs=(seq, seq, seq), out_specs=seq, check_vma=False)


def full(causal):
  return functools.partial(reference.attention, causal=causal, q_segment_BT=None,
                           kv_segment_BS=None, softmax_scale=H ** -0.5)


@on_8_devices
def test_ring_attention_equals_full_attention():
  """Values causal and not; gradients for causal, where whole kv blocks are masked out. The
  non-causal queries are scaled so that exp of the raw scores would overflow float32."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((B, L, heads, dim)).astype(np.float32)
             for heads, dim in ((N, H), (K, H), (K, G)))
  for n in (4, 8):
    o = jax.jit(ring(n, causal=False))(30 * q, k, v)
    np.testing.assert_allclose(o, full(causal=False)(30 * q, k, v), rtol=1e-5, atol=1e-5,
                               err_msg=f'n={n} causal=False')
  (_, o_ref), grads_ref = value_and_grads(full(causal=True))(q, k, v)
  for n in (4, 8):
    (_, o), grads = value_and_grads(ring(n, causal=True))(q, k, v)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5, err_msg=f'n={n} causal=True')
    for name, g, g_ref in zip('qkv', grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=f'n={n} d{name}')


@on_8_devices
def test_ring_attention_runs_the_pallas_kernel_per_block():
  """The same ring with every block in our Pallas kernels (interpreted): values and gradients."""
  rng = np.random.default_rng(1)
  q, k, v = (rng.standard_normal((B, L, heads, dim)).astype(np.float32)
             for heads, dim in ((N, H), (K, H), (K, G)))
  (_, o_ref), grads_ref = value_and_grads(full(causal=True))(q, k, v)
  (_, o), grads = value_and_grads(ring(4, causal=True, backend='interpret'))(q, k, v)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  for name, g, g_ref in zip('qkv', grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=f'd{name}')
