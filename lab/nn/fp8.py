"""FP8 linear layers with DeepSeek-V3's fine-grained quantisation (arXiv 2412.19437, §3.3).

As in the paper:
- every GEMM input is e4m3 (jnp.float8_e4m3fn, max 448), in Fprop, Dgrad and Wgrad (§3.3.1-2);
- scales are computed online, scale = amax / 448, per 1x128 activation tile (one token, 128
  channels) and per 128x128 weight block (§3.3.2, Fig. 7a);
- the GEMM is split into 128-wide intervals of the contraction axis; each interval's partial sum
  comes out in f32, is multiplied by both operands' scales and is accumulated in f32 (the
  promotion to CUDA cores of §3.3.2 with N_C = 128, Fig. 7b);
- the forward caches x and w in FP8 (§3.3.3). For Wgrad (contraction over tokens) the backward
  dequantises the cached x and re-quantises it in 128x1 tiles along the tokens, as §3.5.2
  describes, and quantises the output gradient in 128x1 tiles too; for Dgrad it quantises the
  output gradient per 1x128 tile and reuses the transposed 128x128 weight blocks.
Simplified: every linear input is cached in e4m3 (the paper keeps a few in E5M6 or BF16, §3.3.3);
which layers stay in BF16/FP32 (embedding, output head, router, §3.3.1) is the caller's choice.
Simulated: within one 128-interval H100 tensor cores keep ~14 bits of the sum; here each interval
is `lax.dot_general` on fp8 operands with `preferred_element_type=f32`, which XLA CPU evaluates
exactly (products of e4m3 values are exact in f32), i.e. the limit of the paper's scheme. The
same call is made on every backend (whether XLA GPU turns it into an FP8 GEMM is not checked
here), and it materialises the (K/128, M, N) f32 partials of each GEMM (K the contraction: D,
F, or the tokens for Wgrad) that a fused kernel (DeepGEMM) keeps in registers: this is a
numerics reference, not a fast kernel.
Ragged axes: a length that is not a multiple of 128 gets a short last tile (zero padded inside,
which changes no amax), as DeepSeek-V3's released weight format does.
Letters beyond the usual: J, I count tiles along an axis; t, b index inside a tile or block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128


def _pad(x, axis: int, tile: int):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, -x.shape[axis] % tile)
  return jnp.pad(x, widths)


def _quantize(x, amax):
  """e4m3(x / s) with s = amax / 448 (1 where amax is 0); returns (q, s). s is amax * f32(1/448),
  one rounded product on every backend (XLA would turn the division into that anyway), so
  |x| / s <= 448 (1 + 2^-23), which rounds to 448: no clipping needed."""
  scale = jnp.where(amax > 0, amax * jnp.float32(1 / E4M3_MAX), 1.0)
  return (x / scale).astype(E4M3), scale


def quantize_tiles(x_TD: jax.Array, tile: int = TILE) -> tuple[jax.Array, jax.Array]:
  """1 x `tile` tiles along the last axis: x_...D -> (q_...D e4m3, scale_...J f32),
  J = ceil(D / tile); x ~ q * scale repeated along D."""
  if tile <= 0:
    raise ValueError(f'tile={tile}; expected a positive integer')
  D = x_TD.shape[-1]
  x_TJt = _pad(x_TD.astype(jnp.float32), -1, tile).reshape(*x_TD.shape[:-1], -1, tile)
  q_TJt, scale_TJ1 = _quantize(x_TJt, jnp.abs(x_TJt).max(-1, keepdims=True))
  return q_TJt.reshape(*x_TD.shape[:-1], -1)[..., :D], scale_TJ1[..., 0]


def dequantize_tiles(q_TD: jax.Array, scale_TJ: jax.Array, tile: int = TILE) -> jax.Array:
  """Inverse of quantize_tiles, in f32."""
  return q_TD.astype(jnp.float32) * jnp.repeat(scale_TJ, tile, -1)[..., :q_TD.shape[-1]]


def quantize_blocks(w_DF: jax.Array, block: int = TILE) -> tuple[jax.Array, jax.Array]:
  """`block` x `block` blocks: w_DF -> (q_DF e4m3, scale_JI f32), J, I = ceil(D, F / block)."""
  if w_DF.ndim != 2 or block <= 0:
    raise ValueError(f'w shape {w_DF.shape}, block={block}; expected a 2-D w and block > 0')
  D, F = w_DF.shape
  w_JbIb = _pad(_pad(w_DF.astype(jnp.float32), 0, block), 1, block)
  w_JbIb = w_JbIb.reshape(w_JbIb.shape[0] // block, block, w_JbIb.shape[1] // block, block)
  q_JbIb, scale_J1I1 = _quantize(w_JbIb, jnp.abs(w_JbIb).max((1, 3), keepdims=True))
  return q_JbIb.reshape(-1, q_JbIb.shape[2] * block)[:D, :F], scale_J1I1[:, 0, :, 0]


def dequantize_blocks(q_DF: jax.Array, scale_JI: jax.Array, block: int = TILE) -> jax.Array:
  """Inverse of quantize_blocks, in f32."""
  D, F = q_DF.shape
  scale_DF = jnp.repeat(jnp.repeat(scale_JI, block, 0), block, 1)[:D, :F]
  return q_DF.astype(jnp.float32) * scale_DF


def scaled_matmul(q_TD, scale_TJ, q_DF, scale_JF) -> jax.Array:
  """sum_j (q_Tj . q_jF, fp8 inputs, f32 out) * scale_Tj * scale_jF over 128-intervals j of D:
  DeepSeek-V3 §3.3.2's per-N_C promotion with the fine-grained scales applied there."""
  q_TJt = _pad(q_TD, 1, TILE).reshape(q_TD.shape[0], -1, TILE)
  q_JtF = _pad(q_DF, 0, TILE).reshape(-1, TILE, q_DF.shape[1])
  part_JTF = jax.lax.dot_general(q_TJt, q_JtF, (((2,), (1,)), ((1,), (0,))),
                                 preferred_element_type=jnp.float32)
  return jnp.einsum('JTF,TJ,JF->TF', part_JTF, scale_TJ, scale_JF)


def _fprop(x_TD, w_DF):
  qx_TD, sx_TJ = quantize_tiles(x_TD)
  qw_DF, sw_JI = quantize_blocks(w_DF)
  y_TF = scaled_matmul(qx_TD, sx_TJ, qw_DF, jnp.repeat(sw_JI, TILE, 1)[:, :w_DF.shape[1]])
  return y_TF, (qx_TD, sx_TJ, qw_DF, sw_JI)


def _backprop(res, dy_TF):
  qx_TD, sx_TJ, qw_DF, sw_JI = res
  # Dgrad: dx = dy w^T, dy in 1x128 tiles along F, w^T in the same (transposed) 128x128 blocks.
  qg_TF, sg_TI = quantize_tiles(dy_TF)
  dx_TD = scaled_matmul(qg_TF, sg_TI, qw_DF.T, jnp.repeat(sw_JI.T, TILE, 1)[:, :qw_DF.shape[0]])
  # Wgrad: dw = x^T dy, both in 128x1 tiles along the tokens (x re-quantised from its fp8 copy).
  qx_DT, sx_DJ = quantize_tiles(dequantize_tiles(qx_TD, sx_TJ).T)
  qg_FT, sg_FJ = quantize_tiles(dy_TF.T)
  dw_DF = scaled_matmul(qx_DT, sx_DJ, qg_FT.T, sg_FJ.T)
  return dx_TD, dw_DF


@jax.custom_vjp
def _fp8_matmul(x_TD, w_DF):
  """f32 in, f32 out; the forward caches only the fp8 copies and their scales."""
  return _fprop(x_TD, w_DF)[0]


_fp8_matmul.defvjp(_fprop, _backprop)


def fp8_dot(x_BTD: jax.Array, w_DF: jax.Array) -> jax.Array:
  """y_BTF = x_BTD w_DF with every GEMM of forward and backward in fine-grained FP8 (see module
  docstring); any leading axes of x are tokens. Output in the promoted input dtype."""
  if w_DF.ndim != 2 or x_BTD.ndim < 1 or x_BTD.shape[-1] != w_DF.shape[0]:
    raise ValueError(f'x shape {x_BTD.shape}, w shape {w_DF.shape}; expected x_...D and w_DF')
  f32 = lambda a: a.astype(jnp.float32)
  y_TF = _fp8_matmul(f32(x_BTD.reshape(-1, w_DF.shape[0])), f32(w_DF))
  return y_TF.reshape(*x_BTD.shape[:-1], w_DF.shape[1]).astype(jnp.result_type(x_BTD, w_DF))


def linear(x_BTD: jax.Array, w_D: jax.Array, *, fp8: bool) -> jax.Array:
  """einsum('BTD,D...->BT...', x, w): x's last axis against w's first; FP8 (fp8_dot) when
  `fp8`, else the plain einsum. w may have several output axes (w_DNH -> y_BTNH)."""
  if w_D.ndim < 2 or x_BTD.ndim < 1 or x_BTD.shape[-1] != w_D.shape[0]:
    raise ValueError(f'x shape {x_BTD.shape}, w shape {w_D.shape}; expected x_...D and w_D...')
  w_DF = w_D.reshape(w_D.shape[0], math.prod(w_D.shape[1:]))
  y_BTF = fp8_dot(x_BTD, w_DF) if fp8 else jnp.einsum('...D,DF->...F', x_BTD, w_DF)
  return y_BTF.reshape(*x_BTD.shape[:-1], *w_D.shape[1:])
