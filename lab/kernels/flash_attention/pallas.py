"""Flash attention on Pallas kernels: padding, segment layout and the custom_vjp around them.

The platform's kernels (`gpu.py`: Triton, also what the interpreter runs; `tpu.py`: Mosaic TPU)
see inputs padded to whole blocks (and, on GPU, head dims padded to a power of two); the true
lengths travel in a static `tiles.Spec`, so padded keys are masked and padded query rows are
dropped. Padding and slicing sit outside the custom_vjp, so autodiff slices the gradients back.

custom_vjp (FlashAttention-2, Dao 2023): the forward saves (q, k, v, o, lse) instead of the
T x S probabilities; the backward computes D = rowsum(dO * O) once (Algorithm 2, line 4), then
the platform's dq and dk/dv kernels recompute the probabilities tile by tile from lse. The lse
is an output too (ring attention merges blocks with it); since d lse / d s = P, its cotangent
enters as ds = P (dP - (D - dlse)), i.e. the kernels run with D - dlse in place of D.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lab.kernels.flash_attention import gpu, tiles, tpu

_PLATFORMS = {'gpu': gpu, 'tpu': tpu}


def _pad_to(x, sizes: dict[int, int]):
  """Zero-pads axis a of x at the end to sizes[a]; x itself when nothing changes."""
  widths = [(0, sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def attention(q_BTNH, k_BSKH, v_BSKG, *, causal: bool, q_segment_BT, kv_segment_BS,
              softmax_scale: float, platform: str, interpret=False,
              block_q: int | None = None, block_k: int | None = None, return_lse: bool = False):
  """o_BTNG = softmax(scale q k^T + mask) v with the `platform` ('gpu' or 'tpu') kernels, and
  with return_lse the row log-sum-exp lse_BTN of the scaled scores (-inf for rows with no key).

  interpret: pallas_call's argument (True runs the kernels in the Pallas interpreter).
  block_q, block_k: tile sizes (default: the platform's choice for these lengths).
  """
  kernels = _PLATFORMS[platform]
  T, H = q_BTNH.shape[1], q_BTNH.shape[3]
  S, G = k_BSKH.shape[1], v_BSKG.shape[-1]
  default_q, default_k = kernels.block_sizes(T, S)
  spec = tiles.Spec(q_len=T, kv_len=S, block_q=block_q or default_q,
                    block_k=block_k or default_k, causal=causal, scale=float(softmax_scale),
                    segmented=q_segment_BT is not None, interpret=interpret)
  T_pad, S_pad = spec.num_q * spec.block_q, spec.num_k * spec.block_k
  H_pad, G_pad = kernels.head_dim(H), kernels.head_dim(G)
  q_BTNH = _pad_to(q_BTNH, {1: T_pad, 3: H_pad})
  k_BSKH = _pad_to(k_BSKH, {1: S_pad, 3: H_pad})
  v_BSKG = _pad_to(v_BSKG, {1: S_pad, 3: G_pad})
  segments = None
  if spec.segmented:
    segments = (_pad_to(q_segment_BT.astype(jnp.int32), {1: T_pad})[:, :, None],
                _pad_to(kv_segment_BS.astype(jnp.int32), {1: S_pad})[:, None, :])
  o_BTNG, lse_BNT1 = _flash(q_BTNH, k_BSKH, v_BSKG, segments, platform, spec)
  if not return_lse:
    return o_BTNG[:, :T, :, :G]
  lse_BTN = lse_BNT1[:, :, :T, 0].transpose(0, 2, 1)
  return o_BTNG[:, :T, :, :G], jnp.where(jnp.isposinf(lse_BTN), -jnp.inf, lse_BTN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BTNH, k_BSKH, v_BSKG, segments, platform: str, spec: tiles.Spec):
  return _PLATFORMS[platform].forward(q_BTNH, k_BSKH, v_BSKG, segments, spec)


def _flash_fwd(q_BTNH, k_BSKH, v_BSKG, segments, platform, spec):
  o_BTNG, lse_BNT1 = _PLATFORMS[platform].forward(q_BTNH, k_BSKH, v_BSKG, segments, spec)
  return (o_BTNG, lse_BNT1), (q_BTNH, k_BSKH, v_BSKG, segments, o_BTNG, lse_BNT1)


def _flash_bwd(platform, spec, residuals, cotangents):
  q_BTNH, k_BSKH, v_BSKG, segments, o_BTNG, lse_BNT1 = residuals
  do_BTNG, dlse_BNT1 = cotangents
  delta_BNT1 = jnp.einsum('BTNG,BTNG->BNT', o_BTNG.astype(jnp.float32),
                          do_BTNG.astype(jnp.float32))[..., None] - dlse_BNT1
  dq, dk, dv = _PLATFORMS[platform].backward(q_BTNH, k_BSKH, v_BSKG, segments, do_BTNG,
                                             lse_BNT1, delta_BNT1, spec)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
