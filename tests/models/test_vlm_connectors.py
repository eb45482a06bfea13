"""VLM connectors against float64 NumPy oracles: LLaVA's MLP, InternVL's pixel shuffle (brute force
and InternVL's own torch steps) + MLP, Qwen-VL's resampler with its 2-D sin-cos positions (keys'
table resized by torch's bicubic interpolate); token counts at paper sizes; gradients."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from scipy.special import erf

from lab.config import ConfigError
from lab.models import vlm_connectors as vc
from lab.nn import param_spec as ps
from oracles import assert_vjp_matches_oracle

# Unoptimised XLA compiles these tiny programs several times faster (as tests/denoisers.py does).
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def make_cfg(connector, **overrides):
  return ml_collections.ConfigDict(dict(
      connector=connector, image_size=8, patch_size=2, vision_width=6, llm_width=8, n_queries=4,
      n_heads=2, attention_backend='reference') | overrides)


def draw_params(cfg, rng):
  """Every leaf N(0, 0.5^2) (LayerNorm scales around 1), rounded to float32, as float64."""
  def draw(path, s):
    shift = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (shift + 0.5 * rng.standard_normal(s.shape)).astype(np.float32).astype(np.float64)
  return jax.tree_util.tree_map_with_path(draw, vc.param_specs(cfg), is_leaf=ps.is_spec)


def draw_x(cfg, rng, B=2):
  P = (cfg.image_size // cfg.patch_size) ** 2
  return rng.standard_normal((B, P, cfg.vision_width)).astype(np.float32).astype(np.float64)


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


# ------------------------------------------------------------------ float64 NumPy oracles


def np_gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def np_ln(x, p, eps):
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_mlp(p, x):
  """LLaVA-1.5 mlp2x_gelu: Linear, GELU (erf), Linear."""
  return np_gelu(x @ p['fc1']['w'] + p['fc1']['b']) @ p['fc2']['w'] + p['fc2']['b']


def np_pixel_shuffle(x_BPC, g):
  """Brute force of InternVL's pixel_shuffle: output token (r, c), row-major, is the concat of
  the patches (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) of the row-major g x g grid."""
  B, _, C = x_BPC.shape
  out = np.zeros((B, (g // 2) ** 2, 4 * C))
  for r in range(g // 2):
    for c in range(g // 2):
      for m in range(2):
        for k in range(2):
          slot = 2 * m + k
          out[:, r * (g // 2) + c, slot * C:(slot + 1) * C] = x_BPC[:, (2 * r + m) * g + 2 * c + k]
  return out


def torch_internvl_pixel_shuffle(x, scale_factor=0.5):
  """InternVL's pixel_shuffle (ps_version 'v2'), its steps in torch."""
  n, w, h, c = x.size()
  x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
  x = x.permute(0, 2, 1, 3).contiguous()
  x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor ** 2)))
  return x.permute(0, 2, 1, 3).contiguous()


def np_qwen_sincos(d, g):
  """Qwen-VL's get_2d_sincos_pos_embed re-derived: meshgrid(w, h) puts the column index first;
  each half is [sin(pos omega), cos(pos omega)], omega_k = 1 / 10000^(k / (d/4))."""
  omega = 1.0 / 10_000 ** (np.arange(d // 4) / (d / 4))
  col, row = (a.reshape(-1) for a in np.meshgrid(np.arange(g), np.arange(g)))
  half = lambda pos: np.concatenate([np.sin(np.outer(pos, omega)), np.cos(np.outer(pos, omega))],
                                    axis=1)
  return np.concatenate([half(col), half(row)], axis=1)


@functools.cache
def np_positions(d, g, g_out):
  pos_q = np_qwen_sincos(d, g)
  return pos_q, torch_bicubic(pos_q, g_out)


def torch_bicubic(table_PD, g_out):
  """Qwen-VL's get_abs_pos: F.interpolate(bicubic, align_corners=False) of the g x g table."""
  g = math.isqrt(len(table_PD))
  t = torch.tensor(table_PD).reshape(1, g, g, -1).permute(0, 3, 1, 2)
  t = torch.nn.functional.interpolate(t, size=(g_out, g_out), mode='bicubic',
                                      align_corners=False)
  return t.permute(0, 2, 3, 1).reshape(g_out * g_out, -1).numpy()


def np_resampler(cfg, p, x_BSC):
  """Qwen-VL sec. 2.1 as released: kv_proj, ln_kv, ln_q(query) + pos, keys + resized pos,
  torch-style multi-head attention with biases, ln_post, proj."""
  T, D, N = cfg.n_queries, cfg.llm_width, cfg.n_heads
  H = D // N
  kv = x_BSC @ p['kv_proj'] if 'kv_proj' in p else x_BSC
  kv = np_ln(kv, p['ln_kv'], 1e-6)
  pos_q, pos_k = np_positions(D, math.isqrt(T), math.isqrt(x_BSC.shape[1]))
  q = np_ln(p['query'], p['ln_q'], 1e-6) + pos_q
  a = p['attn']
  out = np.zeros((x_BSC.shape[0], T, D))
  for b in range(x_BSC.shape[0]):
    for n in range(N):
      qn = q @ a['wq'][:, n] + a['bq'][n]
      kn = (kv[b] + pos_k) @ a['wk'][:, n] + a['bk'][n]
      vn = kv[b] @ a['wv'][:, n] + a['bv'][n]
      s = qn @ kn.T / math.sqrt(H)
      w = np.exp(s - s.max(-1, keepdims=True))
      out[b] += (w / w.sum(-1, keepdims=True)) @ vn @ a['wo'][n]
  out = out + a['bo']
  return np_ln(out, p['ln_post'], 1e-6) @ p['proj']


def np_connector(cfg, p, x_BPC):
  if cfg.connector == 'mlp':
    return np_mlp(p, x_BPC)
  if cfg.connector == 'resampler':
    return np_resampler(cfg, p, x_BPC)
  g = cfg.image_size // cfg.patch_size
  return np_mlp(p, np_ln(np_pixel_shuffle(x_BPC, g), p['ln'], 1e-5))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize('seed', range(2))
@pytest.mark.parametrize('connector,overrides', [
    ('mlp', {}), ('pixel_shuffle', {}), ('resampler', {}),  # 4 queries on a 4 x 4 key grid
    ('resampler', dict(n_queries=9, image_size=10)),  # 3 x 3 queries on 5 x 5 keys
    ('resampler', dict(vision_width=8, n_queries=16)),  # C = D: no kv_proj; equal grids
])
def test_forward_matches_oracle(connector, overrides, seed):
  cfg = make_cfg(connector, **overrides)
  rng = np.random.default_rng(seed)
  p, x = draw_params(cfg, rng), draw_x(cfg, rng)
  if connector == 'resampler':
    assert ('kv_proj' in p) == (cfg.vision_width != cfg.llm_width)
  got = jit(functools.partial(vc.apply, cfg))(f32(p), jnp.asarray(x, jnp.float32))
  want = np_connector(cfg, p, x)
  assert got.shape == (2, vc.tokens_per_image(cfg), cfg.llm_width) == want.shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize('g', [2, 4, 6])
def test_pixel_shuffle_order_matches_internvl(g):
  rng = np.random.default_rng(g)
  x_BPC = rng.standard_normal((2, g * g, 3))
  got = np.asarray(vc.pixel_shuffle(jnp.asarray(x_BPC, jnp.float32).reshape(2, g, g, 3)))
  np.testing.assert_array_equal(got.reshape(2, -1, 12), np_pixel_shuffle(x_BPC, g).astype(
      np.float32))
  ref = torch_internvl_pixel_shuffle(torch.tensor(x_BPC, dtype=torch.float32).reshape(2, g, g, 3))
  np.testing.assert_array_equal(got, ref.numpy())


@pytest.mark.parametrize('g,g_out', [(2, 4), (3, 5), (4, 4), (16, 32), (5, 3)])
def test_resampler_positions_match_qwen_vl(g, g_out):
  d = 8
  pos_TD, pos_SD = vc.resampler_positions(g * g, g_out * g_out, d)
  want_TD = np_qwen_sincos(d, g)
  np.testing.assert_allclose(pos_TD, want_TD, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pos_SD, torch_bicubic(want_TD, g_out), rtol=1e-6, atol=1e-6)


def test_token_counts_at_paper_sizes():
  """448 px tiles, patch 14: 32 x 32 = 1024 patches; pixel shuffle -> 256 (InternVL 1.5);
  Qwen-VL: 256 queries, ViT-bigG width 1664 -> Qwen-7B width 4096, 32 heads of 128. Shapes only
  (eval_shape), nothing allocated."""
  base = dict(image_size=448, patch_size=14, vision_width=1664, llm_width=4096, n_queries=256,
              n_heads=32, attention_backend='xla')
  counts = {c: vc.tokens_per_image(make_cfg(c, **base)) for c in vc.CONNECTORS}
  assert counts == {'mlp': 1024, 'resampler': 256, 'pixel_shuffle': 256}
  x = jax.ShapeDtypeStruct((2, 1024, 1664), jnp.bfloat16)
  for c in vc.CONNECTORS:
    cfg = make_cfg(c, **base)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                          vc.param_specs(cfg), is_leaf=ps.is_spec)
    out = jax.eval_shape(lambda p, x: vc.apply(cfg, p, x), params, x)
    assert out.shape == (2, counts[c], 4096) and out.dtype == jnp.bfloat16
  # Qwen-VL's adapter: 256 queries, kv_proj, in/out projections + biases, 3 LayerNorms, proj.
  D = 4096
  want = 256 * D + 1664 * D + 4 * D * D + 4 * D + 3 * 2 * D + D * D
  assert ps.count(vc.param_specs(make_cfg('resampler', **base))) == want


@pytest.mark.parametrize('connector', ['mlp', 'pixel_shuffle'])
def test_float64_check_grads(x64, connector):
  cfg = make_cfg(connector, image_size=4)
  rng = np.random.default_rng(0)
  p, x = draw_params(cfg, rng), draw_x(cfg, rng, B=1)
  check_grads(jax.jit(functools.partial(vc.apply, cfg)), (p, x), order=1, modes=['rev'])


def test_resampler_gradients_match_oracle():
  """flash_attention takes no float64, so the float32 vjp is checked against finite differences
  of the float64 oracle, for the features and every parameter but the key bias, whose gradient
  is exactly zero (it adds q . b_k to every score of a row) and checked as such."""
  cfg = make_cfg('resampler', image_size=4, vision_width=4, llm_width=4, n_heads=2)
  rng = np.random.default_rng(1)
  p, x = draw_params(cfg, rng), draw_x(cfg, rng, B=1)
  bk = p['attn'].pop('bk')
  leaves, tree = jax.tree.flatten(p)
  def with_bk(leaves, bk):
    q = jax.tree.unflatten(tree, list(leaves))
    return q | {'attn': q['attn'] | {'bk': bk}}
  bk32 = jnp.asarray(bk, jnp.float32)
  assert_vjp_matches_oracle(lambda x, *l: vc.apply(cfg, with_bk(l, bk32), x),
                            lambda x, *l: np_resampler(cfg, with_bk(l, bk), x), (x, *leaves), rng)
  g_bk = jit(jax.grad(lambda b: jnp.sum(vc.apply(cfg, with_bk(f32(leaves), b), f32(x)) ** 2)))(
      bk32)
  np.testing.assert_allclose(g_bk, 0.0, atol=1e-6)


@pytest.mark.parametrize('connector', vc.CONNECTORS)
def test_gradients_finite_and_nonzero(connector):
  cfg = make_cfg(connector)
  rng = np.random.default_rng(2)
  p, x = f32(draw_params(cfg, rng)), jnp.asarray(draw_x(cfg, rng), jnp.float32)
  grads = jit(jax.grad(lambda p, x: jnp.sum(vc.apply(cfg, p, x) ** 2), argnums=(0, 1)))(p, x)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize('overrides,match', [
    (dict(connector='qformer'), 'model.connector'),
    (dict(connector='pixel_shuffle', image_size=6), 'even number'),
    (dict(connector='resampler', n_queries=8), 'model.n_queries=8'),
    (dict(connector='resampler', n_heads=3), 'model.n_heads=3'),
    (dict(connector='mlp', patch_size=3), 'model.patch_size=3'),
])
def test_bad_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    vc.param_specs(make_cfg(**{'connector': 'mlp'} | overrides))


def test_bad_feature_shape_error():
  cfg = make_cfg('mlp')
  p = f32(draw_params(cfg, np.random.default_rng(0)))
  with pytest.raises(ValueError, match=r'expected \[tiles, 16, 6\]'):
    vc.apply(cfg, p, jnp.zeros((2, 15, 6)))
