"""Vision-language connectors: ViT patch features x_BPC -> LLM input embeddings y_BTD.

  mlp            LLaVA-1.5 (Liu et al. 2023, "Improved Baselines with Visual Instruction Tuning",
                 arXiv 2310.03744, sec. 3.2): y = W2 GELU(W1 x + b1) + b2, one token per patch.
                 MiMo-VL (Xiaomi 2025, arXiv 2506.03569, sec. 2.1) is the same ViT-MLP-LLM shape.
  resampler      Qwen-VL's position-aware vision-language adapter (Bai et al. 2023, arXiv
                 2308.12966, sec. 2.1): one cross-attention layer in which n_queries learnable
                 queries read the patches; pre-norms on queries and keys, a post-norm and a
                 bias-free projection, as released. 2-D absolute positions are MAE's sin-cos
                 table on the query grid, added to the queries, and that table bicubically
                 resized to the patch grid, added to the keys (resampler_positions). MiniCPM-V
                 (Yao et al. 2024, arXiv 2408.01800, sec. 2.2) uses the same perceiver-style
                 resampler with 64 or 96 queries; its V2.5 / V2.6 releases put positions on the
                 keys only, a sin-cos table computed on the keys' own grid.
  pixel_shuffle  InternVL 1.5 (Chen et al. 2024, arXiv 2404.16821, sec. 3.2): 2 x 2 neighbouring
                 patches -> one token of width 4C, then LN -> Linear -> GELU -> Linear.

Letters: B batch, P patches (a square X x Y grid, row-major), C vision width, D LLM width,
F MLP hidden width (= D, as LLaVA and InternVL use), T output tokens (the resampler's queries),
S keys (= P), N heads, H head dim, R = P / 4 tokens after pixel shuffle, U = 4 C their width;
X, Y rows and columns of a patch or query grid, A, Z those of the key grid that the query
positions are resized to. GELU is the exact (erf) form, as torch's nn.GELU in the released code.
Inputs are patch tokens only: a CLS token is dropped by the caller (LLaVA's
select_feature='patch', InternVL's vit_embeds[:, 1:]).

Config fields (`cfg` is the connector config): connector ('mlp' | 'resampler' | 'pixel_shuffle'),
image_size (tile side in pixels), patch_size (ViT patch), vision_width (C), llm_width (D);
resampler only: n_queries (a square, 256 in Qwen-VL), n_heads (divides llm_width; Qwen-VL uses
llm_width / 128); optional attention_backend ('auto').
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lab.config import require
from lab.kernels import available_backends, flash_attention
from lab.nn import attention, norms, patches
from lab.nn import param_spec as ps

CONNECTORS = ('mlp', 'resampler', 'pixel_shuffle')
RESAMPLER_LN_EPS = 1e-6  # Qwen-VL: norm_layer = partial(nn.LayerNorm, eps=1e-6)
PIXEL_SHUFFLE_LN_EPS = 1e-5  # InternVL mlp1: nn.LayerNorm default


def grid_size(cfg) -> int:
  """Patches per side of one tile: image_size / patch_size."""
  return cfg.image_size // cfg.patch_size


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the connector."""
  require(cfg.connector in CONNECTORS,
          f'model.connector={cfg.connector!r}; expected one of {CONNECTORS}')
  for key in ('image_size', 'patch_size', 'vision_width', 'llm_width'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  require(cfg.image_size % cfg.patch_size == 0, f'model.patch_size={cfg.patch_size} does not '
          f'divide model.image_size={cfg.image_size}')
  if cfg.connector == 'pixel_shuffle':
    require(grid_size(cfg) % 2 == 0, f'model.image_size / model.patch_size = {grid_size(cfg)} '
            'patches per side; expected an even number for pixel shuffle')
  if cfg.connector == 'resampler':
    g, D = math.isqrt(cfg.n_queries), cfg.llm_width
    require(cfg.n_queries > 0 and g * g == cfg.n_queries,
            f'model.n_queries={cfg.n_queries}; expected a positive square (a query grid)')
    require(cfg.n_heads > 0 and D % cfg.n_heads == 0,
            f'model.n_heads={cfg.n_heads}; expected a positive divisor of model.llm_width={D}')
    require(D % 4 == 0, f'model.llm_width={D}; expected a multiple of 4 (2-D sin-cos positions)')
    backend = cfg.get('attention_backend', 'auto')
    require(backend in available_backends(),
            f'model.attention_backend={backend!r}; expected one of {available_backends()}')


def tokens_per_image(cfg) -> int:
  """LLM tokens one tile yields: P for mlp, n_queries for resampler, P / 4 for pixel_shuffle
  (448 px, patch 14: 1024, 256, 256)."""
  validate(cfg)
  if cfg.connector == 'resampler':
    return cfg.n_queries
  P = grid_size(cfg) ** 2
  return P if cfg.connector == 'mlp' else P // 4


def _dense(fan_in: int, fan_out: int, axes, std: float | None = None) -> dict:
  std = fan_in ** -0.5 if std is None else std
  return {'w': ps.ParamSpec((fan_in, fan_out), ps.normal(std), axes),
          'b': ps.ParamSpec((fan_out,), ps.zeros, (axes[1],))}


def _layer_norm_specs(d: int) -> dict:
  return {'scale': ps.ParamSpec((d,), ps.ones, ('embed',)),
          'bias': ps.ParamSpec((d,), ps.zeros, ('embed',))}


def mlp_specs(cfg) -> dict:
  """LLaVA-1.5 'mlp2x_gelu': fc1 (C -> D), fc2 (D -> D), LeCun normal weights, zero biases."""
  C, D = cfg.vision_width, cfg.llm_width
  return {'fc1': _dense(C, D, ('embed', 'mlp')), 'fc2': _dense(D, D, ('mlp', 'embed'))}


def mlp(p: dict, x_BPC: jax.Array) -> jax.Array:
  """y_BPD = GELU(x W1 + b1) W2 + b2 (LLaVA-1.5 sec. 3.2)."""
  h_BPF = jax.nn.gelu(x_BPC @ p['fc1']['w'] + p['fc1']['b'], approximate=False)
  return h_BPF @ p['fc2']['w'] + p['fc2']['b']


def resampler_specs(cfg) -> dict:
  """Qwen-VL's Resampler + ln_post + proj. Queries, kv_proj and the attention weights draw from
  normal(0.02) (Qwen-VL's trunc_normal(std=0.02), whose cut at +-2 is never reached); proj from
  normal(D^-1/2) as released. kv_proj (bias-free) exists only when C != D, as in the release."""
  C, D, N = cfg.vision_width, cfg.llm_width, cfg.n_heads
  specs = {
      'query': ps.ParamSpec((cfg.n_queries, D), ps.normal(0.02), (None, 'embed')),
      'ln_q': _layer_norm_specs(D), 'ln_kv': _layer_norm_specs(D),
      'attn': attention.attention_specs(D, N, N, D // N, bias=True, std=0.02, out_std=0.02),
      'ln_post': _layer_norm_specs(D),
      'proj': ps.ParamSpec((D, D), ps.normal(D ** -0.5), (None, 'embed')),
  }
  if C != D:
    specs['kv_proj'] = ps.ParamSpec((C, D), ps.normal(0.02), (None, 'embed'))
  return specs


def resampler_positions(n_queries: int, n_keys: int, d: int) -> tuple[np.ndarray, np.ndarray]:
  """(pos_TD, pos_SD), float32. Queries get MAE's 2-D sin-cos table of their g x g grid
  (lab.nn.patches.pos_embed: [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k/(d/4)),
  i the row, j the column), as Qwen-VL's get_2d_sincos_pos_embed; keys get that same table
  resized to their own grid by torch's bicubic interpolate (a = -0.75, align_corners=False:
  lab.nn.patches.bicubic_weights, in float64), as Qwen-VL's get_abs_pos does, so a query and a
  key at the same place in the image carry nearby codes."""
  g, gk = math.isqrt(n_queries), math.isqrt(n_keys)
  if gk * gk != n_keys:
    raise ValueError(f'{n_keys} image patches; expected a square grid for the resampler')
  pos_XYD = patches.pos_embed(g, g, d).reshape(g, g, d).astype(np.float64)
  w_AX = patches.bicubic_weights(g, gk)
  pos_SD = np.einsum('AX,XYD,ZY->AZD', w_AX, pos_XYD, w_AX).reshape(n_keys, d)
  return pos_XYD.reshape(n_queries, d).astype(np.float32), pos_SD.astype(np.float32)


def resampler(cfg, p: dict, x_BSC: jax.Array) -> jax.Array:
  """Qwen-VL's adapter (sec. 2.1; VisionTransformer.attn_pool, ln_post, proj in the release):
    kv = LN_kv(x W_kv);   q = LN_q(Q) + pos_T;   k = kv + pos_S;   v = kv
    y_BTD = LN_post(MultiHeadAttention(q, k, v)) W_proj
  with torch's nn.MultiheadAttention (biased in-projections, softmax scale H^-1/2, biased output
  projection), through lab.kernels.flash_attention with T = n_queries, S = patches."""
  B, S, _ = x_BSC.shape
  kv_BSD = x_BSC @ p['kv_proj'].astype(x_BSC.dtype) if 'kv_proj' in p else x_BSC
  kv_BSD = norms.layer_norm(kv_BSD, p['ln_kv']['scale'], p['ln_kv']['bias'], RESAMPLER_LN_EPS)
  D = kv_BSD.shape[-1]
  pos_TD, pos_SD = (jnp.asarray(a, kv_BSD.dtype) for a in resampler_positions(cfg.n_queries, S, D))
  q_TD = norms.layer_norm(p['query'], p['ln_q']['scale'], p['ln_q']['bias'], RESAMPLER_LN_EPS)
  q_BTD = jnp.broadcast_to(q_TD.astype(kv_BSD.dtype) + pos_TD, (B, *q_TD.shape))
  a = p['attn']
  q_BTNH = jnp.einsum('BTD,DNH->BTNH', q_BTD, a['wq']) + a['bq']
  k_BSNH = jnp.einsum('BSD,DNH->BSNH', kv_BSD + pos_SD, a['wk']) + a['bk']
  v_BSNH = jnp.einsum('BSD,DNH->BSNH', kv_BSD, a['wv']) + a['bv']
  o_BTNH = flash_attention(q_BTNH.astype(kv_BSD.dtype), k_BSNH.astype(kv_BSD.dtype),
                           v_BSNH.astype(kv_BSD.dtype),
                           backend=cfg.get('attention_backend', 'auto'))
  y_BTD = attention.project_out(a, o_BTNH)
  y_BTD = norms.layer_norm(y_BTD, p['ln_post']['scale'], p['ln_post']['bias'], RESAMPLER_LN_EPS)
  return y_BTD @ p['proj'].astype(y_BTD.dtype)


def pixel_shuffle(x_BXYC: jax.Array) -> jax.Array:
  """x_BXYU, InternVL's pixel_shuffle(x, scale_factor=0.5) with ps_version 'v2', in its own
  order of steps (x holds the patch rows on axis 1, as InternVL's extract_feature reshapes):
    view (B, X, Y/2, 2C) -> permute (0, 2, 1, 3) -> view (B, Y/2, X/2, 4C) -> permute (0, 2, 1, 3).
  Hence y[b, r, c, (2 m + k) C + ch] = x[b, 2 r + m, 2 c + k, ch] for m, k in {0, 1}: the four
  neighbours in (row offset, column offset, channel) order."""
  B, X, Y, C = x_BXYC.shape
  x = x_BXYC.reshape(B, X, Y // 2, 2 * C).transpose(0, 2, 1, 3)
  return x.reshape(B, Y // 2, X // 2, 4 * C).transpose(0, 2, 1, 3)


def pixel_shuffle_specs(cfg) -> dict:
  """InternVL's mlp1: LayerNorm(4C), Linear(4C -> D), GELU, Linear(D -> D)."""
  U, D = 4 * cfg.vision_width, cfg.llm_width
  return {'ln': _layer_norm_specs(U), 'fc1': _dense(U, D, ('embed', 'mlp')),
          'fc2': _dense(D, D, ('mlp', 'embed'))}


def pixel_shuffle_mlp(cfg, p: dict, x_BPC: jax.Array) -> jax.Array:
  """y_BRD = W2 GELU(W1 LN(pixel_shuffle(x)) + b1) + b2 (InternVL 1.5 sec. 3.2), R = P / 4."""
  B, P, C = x_BPC.shape
  g = grid_size(cfg)
  x_BRU = pixel_shuffle(x_BPC.reshape(B, g, g, C)).reshape(B, P // 4, 4 * C)
  x_BRU = norms.layer_norm(x_BRU, p['ln']['scale'], p['ln']['bias'], PIXEL_SHUFFLE_LN_EPS)
  return mlp(p, x_BRU)


def param_specs(cfg) -> dict:
  """The ParamSpecs of the connector that cfg.connector names."""
  validate(cfg)
  return {'mlp': mlp_specs, 'resampler': resampler_specs,
          'pixel_shuffle': pixel_shuffle_specs}[cfg.connector](cfg)


def apply(cfg, params: dict, x_BPC: jax.Array) -> jax.Array:
  """LLM embeddings y_BTD, T = tokens_per_image(cfg), of the patch features x_BPC of B tiles."""
  P, C = grid_size(cfg) ** 2, cfg.vision_width
  if x_BPC.ndim != 3 or x_BPC.shape[1:] != (P, C):
    raise ValueError(f'patch features have shape {x_BPC.shape}; expected [tiles, {P}, {C}] '
                     '(model.image_size / model.patch_size squared, model.vision_width)')
  if cfg.connector == 'mlp':
    return mlp(params, x_BPC)
  if cfg.connector == 'resampler':
    return resampler(cfg, params, x_BPC)
  return pixel_shuffle_mlp(cfg, params, x_BPC)
