"""Chunked SigLIP (Zhai et al. 2023, sec. 3.3) on 8 simulated devices: the ring of ppermutes gives
the unchunked loss, accuracies and gradients (w.r.t. both embeddings, t' and b) on several
meshes, and the compiled per-device program holds only (B/n) x (B/n) logits."""
import collections
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P
from multidevice import on_8_devices

from lab.objectives import contrastive_losses as cl
from lab.parallel import mesh as mesh_lib

B, D = 32, 12  # global batch; D differs from every per-device size so shapes are unambiguous
T_PRIME, BIAS = np.float32(np.log(5.0)), np.float32(-3.0)


def draw(seed):
  """Images and texts correlated enough that the accuracies lie strictly between 0 and 1."""
  rng = np.random.default_rng(seed)
  img = rng.standard_normal((B, D)).astype(np.float32)
  txt = (img + 1.5 * rng.standard_normal((B, D))).astype(np.float32)
  return img, txt


def np_siglip(img_BD, txt_BD, t_prime, b):
  """SigLIP eq. 1 in float64: -1/B sum_ij log sigmoid(z_ij (exp(t') x_i . y_j + b))."""
  x, y = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (img_BD, txt_BD))
  z = 2 * np.eye(len(x)) - 1
  return np.sum(np.log1p(np.exp(-z * (np.exp(t_prime) * x @ y.T + b)))) / len(x)


def value_and_grads(fn):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True))


def assert_same(got, want, what):
  (loss, metrics), grads = got
  (loss_ref, metrics_ref), grads_ref = want
  np.testing.assert_allclose(loss, loss_ref, rtol=2e-6, err_msg=what)
  assert jax.tree.map(float, metrics) == pytest.approx(jax.tree.map(float, metrics_ref)), what
  for name, g, g_ref in zip(('img', 'txt', "t'", 'b'), grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * np.abs(g_ref).max(),
                               err_msg=f'{what} d{name}')


@on_8_devices
def test_chunked_equals_full_loss_and_gradients():
  img, txt = draw(0)
  args = (img, txt, T_PRIME, BIAS)
  want = value_and_grads(cl.siglip_loss)(*args)
  np.testing.assert_allclose(want[0][0], np_siglip(*(np.float64(a) for a in args)), rtol=1e-5)
  assert 0 < want[0][1]['i2t_accuracy'] < 1 and 0 < want[0][1]['t2i_accuracy'] < 1
  # 'batch' -> (data, fsdp, expert): rings of 8 over one or three axes, and of 4 with tensor
  # replicas; then siglip_ring in a shard_map of our own over a 2-device axis.
  for sizes in ({'data': 8}, {'data': 2, 'fsdp': 2, 'expert': 2}, {'data': 4, 'tensor': 2}):
    mesh = mesh_lib.make_mesh(sizes)
    got = value_and_grads(lambda *a: cl.siglip_chunked(*a, mesh=mesh))(*args)
    assert_same(got, want, f'mesh {sizes}')
  ring = Mesh(np.asarray(jax.devices()[:2]), ('ring',))
  local = jax.shard_map(lambda *a: cl.siglip_ring(*a, axis_name='ring'), mesh=ring,
                        in_specs=(P('ring'), P('ring'), P(), P()), out_specs=P())
  assert_same(value_and_grads(local)(*args), want, 'siglip_ring over 2 devices')
  with pytest.raises(ValueError, match='batch 30 is not divisible by the 8 devices'):
    cl.siglip_chunked(img[:30], txt[:30], T_PRIME, BIAS, mesh=mesh_lib.make_mesh({'data': 8}))


def array_shapes(hlo: str) -> collections.Counter:
  """Every array shape in an HLO module's text, e.g. 'f32[4,4]{1,0}' -> (4, 4)."""
  return collections.Counter(tuple(int(d) for d in dims.split(',') if d)
                             for dims in re.findall(r'\b(?:f32|s32|pred)\[([0-9,]*)\]', hlo))


@on_8_devices
def test_no_device_forms_more_than_local_logits():
  """In the compiled per-device program of loss and gradients on a ring of n = 8, the largest
  logits are (B/n, B/n): no dim reaches B, and the steps' logits are never stacked (each is
  recomputed in the backward pass), whereas the unchunked loss forms (B, B)."""
  n, b = 8, B // 8
  img, txt = draw(1)
  mesh = mesh_lib.make_mesh({'data': n})
  args = (img, txt, T_PRIME, BIAS)
  chunked = value_and_grads(lambda *a: cl.siglip_chunked(*a, mesh=mesh)).lower(*args)
  hlo = chunked.compile().as_text()
  shapes = array_shapes(hlo)
  assert shapes[(b, b)] > 0 and shapes[(b, D)] > 0
  assert not any(d >= B for s in shapes for d in s), sorted(shapes)
  assert max(np.prod(s) for s in shapes) <= (n - 1) * b * D
  assert (n - 1, b, b) not in shapes and not any(s[-2:] == (b, b) and len(s) > 2 for s in shapes)
  assert 'collective-permute' in hlo and 'all-gather' not in hlo
  full = array_shapes(value_and_grads(cl.siglip_loss).lower(*args).compile().as_text())
  assert full[(B, B)] > 0
