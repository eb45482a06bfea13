"""The one attention function every model in lab calls.

`flash_attention(q_BTNH, k_BSKH, v_BSKG, causal=, segment_ids=, softmax_scale=, backend=)`
validates its inputs before any device work and dispatches to a backend:
  reference   plain jnp softmax attention (the oracle).
  xla         the flash-attention algorithm in jnp, compiled by XLA (xla.py).
  pallas_gpu  our Pallas kernels, Triton lowering (gpu.py).
  pallas_tpu  our Pallas kernels, Mosaic TPU lowering (tpu.py).
  interpret   the pallas_gpu kernels run by the Pallas interpreter on any platform, with 16 x 16
              tiles so that short test sequences cross block boundaries: how CI tests them.
  auto        pallas_gpu on GPUs, pallas_tpu on TPUs, xla elsewhere; the choice is logged once.
Under a mesh whose 'seq' axis splits the sequence, self-attention runs as ring attention over
that axis (lab.parallel.context_parallel), each block on the chosen backend.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from lab.kernels.flash_attention import pallas, reference, sharded, xla

# The Pallas backends run per device under a mesh (sharded.py); XLA partitions the others.
_BACKENDS = {
    'reference': reference.attention,
    'xla': xla.attention,
    'pallas_gpu': sharded.per_device(functools.partial(pallas.attention, platform='gpu')),
    'pallas_tpu': sharded.per_device(functools.partial(pallas.attention, platform='tpu')),
    'interpret': sharded.per_device(functools.partial(pallas.attention, platform='gpu',
                                                      interpret=True, block_q=16, block_k=16)),
}
_NEEDS_PLATFORM = {'pallas_gpu': ('gpu', 'cuda', 'rocm'), 'pallas_tpu': ('tpu',)}
_AUTO = {'gpu': 'pallas_gpu', 'cuda': 'pallas_gpu', 'rocm': 'pallas_gpu', 'tpu': 'pallas_tpu'}
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_log = logging.getLogger(__name__)


def available_backends() -> tuple[str, ...]:
  return ('auto', *_BACKENDS)


@functools.cache
def _auto(platform: str) -> str:
  backend = _AUTO.get(platform, 'xla')
  _log.info('flash_attention backend="auto" on %s: using %r', platform, backend)
  return backend


def _resolve(backend: str) -> str:
  platform = jax.default_backend()
  if backend == 'auto':
    return _auto(platform)
  if backend not in _BACKENDS:
    raise ValueError(f'attention backend={backend!r}; expected one of {available_backends()}')
  if backend in _NEEDS_PLATFORM and platform not in _NEEDS_PLATFORM[backend]:
    raise ValueError(f'attention backend={backend!r} needs a {_NEEDS_PLATFORM[backend][0]}, but '
                     f"JAX's default backend is {platform}; use 'interpret' to run the kernels "
                     'here')
  return backend


def _split_segments(segment_ids, B, T, S):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = segment_ids
  else:
    if T != S:
      raise ValueError(f'one segment_ids array needs T == S, got T={T}, S={S}; '
                       'pass (q_segment_ids_BT, kv_segment_ids_BS) instead')
    q_seg = kv_seg = segment_ids
  if q_seg.shape != (B, T) or kv_seg.shape != (B, S):
    raise ValueError(f'segment_ids shapes {q_seg.shape}, {kv_seg.shape}; expected {(B, T)}, {(B, S)}')
  return q_seg, kv_seg


def flash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKG: jax.Array, *,
                    causal: bool = False, segment_ids=None, softmax_scale: float | None = None,
                    backend: str = 'auto', return_lse: bool = False):
  """Softmax attention o_BTNG = softmax(scale * q k^T + mask) v with grouped kv heads.

  q_BTNH: queries, N heads of dim H.  k_BSKH: keys, K kv heads (N a multiple of K).
  v_BSKG: values, head dim G (may differ from H).  causal: query t sees keys s <= t + S - T.
  segment_ids: None, an int array_BT (T == S), or a pair (q_BT, kv_BS); a query sees only keys of
  its own segment.  softmax_scale defaults to 1/sqrt(H).
  return_lse: also return lse_BTN, the log-sum-exp of each row's scaled scores (-inf for a row
  with no visible key), differentiable, so blocks can be merged (ring attention).
  """
  for name, x in (('q', q_BTNH), ('k', k_BSKH), ('v', v_BSKG)):
    if x.ndim != 4:
      raise ValueError(f'{name} has shape {x.shape}; expected rank 4 [batch, length, heads, dim]')
    if x.dtype not in _DTYPES:
      raise ValueError(f'{name} dtype {x.dtype}; expected one of float32, bfloat16, float16')
  if not q_BTNH.dtype == k_BSKH.dtype == v_BSKG.dtype:
    raise ValueError(f'q, k, v dtypes {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKG.dtype}; expected '
                     'one dtype for all three')
  B, T, N, H = q_BTNH.shape
  _, S, K, _ = k_BSKH.shape
  if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
    raise ValueError(f'k shape {k_BSKH.shape}; expected [{B}, S, K, {H}] to match q {q_BTNH.shape}')
  if v_BSKG.shape[:3] != (B, S, K):
    raise ValueError(f'v shape {v_BSKG.shape}; expected [{B}, {S}, {K}, G] to match k {k_BSKH.shape}')
  if K < 1 or N % K:
    raise ValueError(f'{N} query heads are not a multiple of {K} kv heads')
  q_seg, kv_seg = _split_segments(segment_ids, B, T, S)
  scale = H ** -0.5 if softmax_scale is None else softmax_scale
  # Under a mesh that splits the sequence ('seq'), self-attention becomes ring attention, whose
  # blocks call back into this function inside a shard_map.
  from lab.parallel import context_parallel
  seq = context_parallel.seq_axes(T, S)
  if seq is not None:
    if q_seg is not None or return_lse:
      raise ValueError('context-parallel (seq-sharded) attention supports neither segment_ids '
                       'nor return_lse yet')
    return context_parallel.ring_self_attention(q_BTNH, k_BSKH, v_BSKG, causal=causal,
                                                softmax_scale=scale, backend=backend, axes=seq)
  return _BACKENDS[_resolve(backend)](q_BTNH, k_BSKH, v_BSKG, causal=causal, q_segment_BT=q_seg,
                                      kv_segment_BS=kv_seg, softmax_scale=scale,
                                      return_lse=return_lse)
