"""The pre-norm encoder stack against a float64 NumPy re-derivation of ViT eqs. 2-3 (one block and
a stack, causal and not, with segment masks, every activation), its gradients against float64
finite differences, stochastic depth per example, dropout in train mode only, and bad options."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from lab.nn import param_spec as ps
from lab.nn import transformer_encoder as te
from oracles import assert_vjp_matches_oracle

B, T, D, N, F = 2, 5, 8, 2, 12
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0},
                        static_argnames=('opts',))


def key(i):
  return jax.random.key(i, impl='rbg')  # threefry's bits add seconds to each CPU compile

NP_ACTIVATIONS = {
    'gelu': lambda u: 0.5 * u * (1 + erf(u / np.sqrt(2))),
    'gelu_tanh': lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3))),
    'quick_gelu': lambda u: u / (1 + np.exp(-1.702 * u)),
}


def draw_params(specs, rng):
  """float32-representable float64 params: norm scales 1 + N(0, 0.2^2), the rest N(0, 0.3^2)."""
  def draw(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    value = base + (0.2 if base else 0.3) * rng.standard_normal(s.shape)
    return value.astype(np.float32).astype(np.float64)
  return jax.tree_util.tree_map_with_path(draw, specs, is_leaf=ps.is_spec)


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_attention(p, x_BTD, causal, seg_BT):
  """Vaswani et al. 2017 eq. 1 per head, heads concatenated and projected (with biases)."""
  q = np.einsum('btd,dnh->btnh', x_BTD, p['wq']) + p['bq']
  k = np.einsum('btd,dnh->btnh', x_BTD, p['wk']) + p['bk']
  v = np.einsum('btd,dnh->btnh', x_BTD, p['wv']) + p['bv']
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  Tq = x_BTD.shape[1]
  mask = np.ones((x_BTD.shape[0], 1, Tq, Tq), bool)
  if causal:
    mask &= np.tril(np.ones((Tq, Tq), bool))
  if seg_BT is not None:
    mask &= (seg_BT[:, :, None] == seg_BT[:, None, :])[:, None]
  s = np.where(mask, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum('bnts,bsnh->btnh', w, v)
  return np.einsum('btnh,nhd->btd', o, p['wo']) + p['bo']


def np_block(p, x, activation, causal=False, seg=None, eps=1e-6, gates=(1.0, 1.0)):
  """ViT eqs. 2-3: x + g1 MSA(LN(x)), then + g2 MLP(LN(.)); g_b are per-example branch scales."""
  g1, g2 = (np.broadcast_to(np.asarray(g, float), (x.shape[0],))[:, None, None] for g in gates)
  x = x + g1 * np_attention(p['attn'], np_layer_norm(x, p['attn_norm'], eps), causal, seg)
  m = p['mlp']
  h = NP_ACTIVATIONS[activation](np_layer_norm(x, p['mlp_norm'], eps) @ m['w_in'] + m['b_in'])
  return x + g2 * (h @ m['w_out'] + m['b_out'])


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def layer(p, l):
  return jax.tree.map(lambda a: a[l], p)


@pytest.mark.parametrize('activation', sorted(te.ACTIVATIONS))
@pytest.mark.parametrize('causal', [False, True])
def test_block_matches_oracle(activation, causal):
  rng = np.random.default_rng(sorted(te.ACTIVATIONS).index(activation) + 10 * causal)
  p = draw_params(te.block_specs(D, N, F), rng)
  x = rng.standard_normal((B, T, D)).astype(np.float32).astype(np.float64)
  opts = te.Options(causal=causal, activation=activation, norm_eps=1e-3,
                    attention_backend='reference')
  got = jit(lambda p, x, opts: te.block(p, x, opts))(f32(p), f32(x), opts=opts)
  assert got.shape == (B, T, D) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_block(p, x, activation, causal, eps=1e-3), rtol=2e-5,
                             atol=2e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_segment_ids_mask_keys(causal):
  rng = np.random.default_rng(7)
  p = draw_params(te.block_specs(D, N, F), rng)
  x = rng.standard_normal((B, T, D))
  seg = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
  opts = te.Options(causal=causal, attention_backend='reference')
  got = jit(lambda p, x, s, opts: te.block(p, x, opts, segment_ids=s))(
      f32(p), f32(x), jnp.asarray(seg, jnp.int32), opts=opts)
  np.testing.assert_allclose(got, np_block(p, x, 'gelu', causal, seg), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_encoder_stack_matches_oracle(causal):
  L = 3
  rng = np.random.default_rng(11 + causal)
  p = draw_params(te.stack_specs(L, D, N, F), rng)
  x = rng.standard_normal((B, 7, D))
  want = x
  for l in range(L):
    want = np_block(layer(p, l), want, 'quick_gelu', causal)
  opts = te.Options(causal=causal, activation='quick_gelu', attention_backend='xla')
  got = jit(lambda p, x, opts: te.encoder(p, x, opts))(f32(p), f32(x), opts=opts)
  np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize('activation', sorted(te.ACTIVATIONS))
def test_block_gradients_match_oracle(activation):
  """d/dx and d/d(a weight of each sub-layer) of the float32 block against float64 differences."""
  rng = np.random.default_rng(3)
  p = draw_params(te.block_specs(D, N, F), rng)
  x = rng.standard_normal((B, 3, D))
  opts = te.Options(causal=True, activation=activation, attention_backend='reference')

  def replace(p, wq, w_in, scale):
    return {**p, 'attn': {**p['attn'], 'wq': wq}, 'mlp': {**p['mlp'], 'w_in': w_in},
            'mlp_norm': {**p['mlp_norm'], 'scale': scale}}

  f = lambda x, wq, w_in, scale: te.block(replace(f32(p), wq, w_in, scale), x, opts)
  oracle = lambda x, wq, w_in, scale: np_block(replace(p, wq, w_in, scale), x, activation, True)
  assert_vjp_matches_oracle(f, oracle, (x, p['attn']['wq'], p['mlp']['w_in'],
                                        p['mlp_norm']['scale']), rng)


def test_drop_path_is_per_example_and_unbiased():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4000, 3, 2)), jnp.float32)
  y = np.asarray(te.drop_path(x, 0.3, key(0)))
  kept = np.all(np.isclose(y, np.asarray(x) / 0.7, rtol=1e-6), axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped)  # one draw per example, never per element
  assert abs(kept.mean() - 0.7) < 0.03
  np.testing.assert_array_equal(te.drop_path(x, 0.3, None), x)
  np.testing.assert_array_equal(te.drop_path(x, 0.0, key(0)), x)


def test_drop_path_rates_rise_linearly():
  np.testing.assert_allclose(te.drop_path_rates(0.3, 4), [0.0, 0.1, 0.2, 0.3], rtol=1e-6)


def test_block_drop_path_drops_whole_branches():
  """With rate 0.5 each example's output is one of the four branch combinations, with kept
  branches scaled by 2, and more than one combination occurs."""
  rng = np.random.default_rng(5)
  p = draw_params(te.block_specs(D, N, F), rng)
  x = rng.standard_normal((16, T, D))
  opts = te.Options(drop_path=0.5, attention_backend='reference')
  got = np.asarray(jit(lambda p, x, opts: te.block(p, x, opts, drop_path_rate=0.5,
                                                   rng=key(1)))(f32(p), f32(x),
                                                                           opts=opts))
  combos = [(g1, g2) for g1 in (0.0, 2.0) for g2 in (0.0, 2.0)]
  err_CB = np.stack([np.abs(got - np_block(p, x, 'gelu', gates=g)).max(axis=(1, 2))
                     for g in combos])
  assert np.all(err_CB.min(0) < 1e-4)
  assert len(set(err_CB.argmin(0))) > 1


def test_dropout_acts_only_with_rng():
  rng = np.random.default_rng(9)
  p = f32(draw_params(te.stack_specs(2, D, N, F), rng))
  x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  run = jit(lambda p, x, key, opts: te.encoder(p, x, opts, rng=key))
  plain = te.Options(attention_backend='reference')
  noisy = te.Options(dropout=0.3, drop_path=0.2, attention_backend='reference')
  evaluated = jit(lambda p, x, opts: te.encoder(p, x, opts))(p, x, opts=noisy)
  np.testing.assert_allclose(evaluated, run(p, x, key(0), opts=plain), rtol=1e-6)
  a, b = run(p, x, key(0), opts=noisy), run(p, x, key(1), opts=noisy)
  np.testing.assert_array_equal(a, run(p, x, key(0), opts=noisy))
  assert np.abs(a - evaluated).max() > 1e-2 and np.abs(a - b).max() > 1e-2


def test_specs_stack_blocks_on_layers():
  specs = te.stack_specs(3, D, N, F)
  assert specs['attn']['wq'].shape == (3, D, N, D // N)
  assert specs['attn']['wq'].axes == ('layers', 'embed', 'heads', 'head_dim')
  assert specs['mlp']['w_in'].shape == (3, D, F) and specs['mlp']['w_in'].axes[-1] == 'mlp'
  assert ps.count(specs) == 3 * (4 * D * D + 4 * D + 2 * D * F + F + D + 4 * D)


@pytest.mark.parametrize('kwargs, match', [
    (dict(activation='relu'), 'activation'), (dict(dropout=1.0), 'dropout'),
    (dict(drop_path=-0.1), 'drop_path'), (dict(norm_eps=0.0), 'norm_eps'),
    (dict(attention_backend='cuda'), 'attention_backend')])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    te.Options(**kwargs)


def test_heads_must_divide_width():
  with pytest.raises(ValueError, match='n_heads=3'):
    te.block_specs(8, 3, 12)
