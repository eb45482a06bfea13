"""The Pallas kernels under a mesh run per device (shard_map over batch and heads) and give the
same output and gradients as one unsharded call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.kernels import flash_attention
from lab.parallel import mesh as mesh_lib
from lab.parallel import rules as rules_lib
from multidevice import on_8_devices


@on_8_devices
def test_interpret_kernel_per_device_equals_unsharded():
  B, T, N, K, H = 4, 20, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k = jax.random.normal(keys[1], (B, T, K, H))
  v = jax.random.normal(keys[2], (B, T, K, H))
  seg = jnp.asarray(np.repeat([[0] * 12 + [1] * 8], B, axis=0))
  ct = jax.random.normal(keys[3], (B, T, N, H))

  def loss(q, k, v, backend):
    o = flash_attention(q, k, v, causal=True, segment_ids=seg, backend=backend)
    return jnp.vdot(o, ct), o

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (want_grads, want) = grad(q, k, v, 'reference')
  for shape in [(4, 1, 2, 1), (2, 2, 2, 1), (1, 1, 2, 4), (8, 1, 1, 1)]:
    mesh = mesh_lib.make_mesh(dict(zip(mesh_lib.AXES, shape)))
    with rules_lib.activate(mesh, rules_lib.DEFAULT_RULES):
      got_grads, got = grad(q, k, v, 'interpret')
      hlo = jax.jit(lambda q: loss(q, k, v, 'interpret')[1]).lower(q).as_text()
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=str(shape))
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=2e-5, err_msg=str(shape))
    assert 'shard_map' in hlo or 'sdy.manual_computation' in hlo or 'manual' in hlo, shape
