"""The decoder-only transformer in its GPT-2 and Llama configurations.

The oracle is the whole forward pass re-written in float64 NumPy from the papers' formulas;
decoding with the KV cache, causality, packing, dropout and remat are checked against forward().
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lab.config import ConfigError
from lab.models import transformer
from lab.nn import param_spec as ps


def gpt2_config():
  return ml_collections.ConfigDict(dict(
      vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=0, d_ff=32,
      max_len=12, norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned',
      rope_theta=10_000.0, bias=True, tie_embeddings=True, dropout=0.0, init_std=0.02,
      remat=False, attention_backend='reference'))


def llama_config():
  """GQA (4 query heads, 2 kv heads) and a head_dim (6) other than d_model / n_heads."""
  return ml_collections.ConfigDict(dict(
      vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, d_ff=24,
      max_len=12, norm='rmsnorm', norm_eps=1e-6, mlp='swiglu', positions='rope',
      rope_theta=500.0, bias=False, tie_embeddings=False, dropout=0.0, init_std=0.02,
      remat=False, attention_backend='reference'))


CONFIGS = {'gpt2': gpt2_config, 'llama': llama_config}
B, T = 2, 9


def random_params(cfg, seed):
  """Every parameter drawn at random (biases and norm scales too, which init sets to 0 and 1), so
  the oracle comparison sees each of them."""
  rng = np.random.default_rng(seed)
  def draw(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return jnp.asarray(base + 0.3 * rng.standard_normal(s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, ps.shapes(transformer.param_specs(cfg)))


class Model:
  """A config with random params, tokens_BT, and a jitted forward reused across the tests."""

  def __init__(self, name):
    self.cfg = CONFIGS[name]()
    self.params = random_params(self.cfg, seed=0)
    self.tokens_BT = jnp.asarray(np.random.default_rng(1).integers(0, 11, (B, T)), jnp.int32)
    self.forward = jax.jit(functools.partial(transformer.forward, self.cfg))
    self.logits_BTV = self.forward(self.params, self.tokens_BT)


@pytest.fixture(scope='module', params=list(CONFIGS))
def model(request):
  return Model(request.param)


# ---------------------------------------------------------------- float64 NumPy oracle


def np_norm(cfg, p, x_BTD):
  if cfg.norm == 'rmsnorm':  # Zhang & Sennrich 2019, eq. 4
    return x_BTD / np.sqrt((x_BTD ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p['scale']
  c_BTD = x_BTD - x_BTD.mean(-1, keepdims=True)  # Ba et al. 2016
  return c_BTD / np.sqrt((c_BTD ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * p['scale'] \
      + p['bias']


def np_rope(x_BTNH, theta):
  """RoFormer rotation of pairs (x_i, x_{i+H/2}) by t * theta^(-2i/H), as complex numbers."""
  T, H = x_BTNH.shape[1], x_BTNH.shape[-1]
  angles_Th = np.arange(T)[:, None] * theta ** (-2.0 * np.arange(H // 2) / H)
  z_BTNh = (x_BTNH[..., :H // 2] + 1j * x_BTNH[..., H // 2:]) * np.exp(1j * angles_Th)[:, None]
  return np.concatenate([z_BTNh.real, z_BTNh.imag], -1)


def np_causal_attention(q_BTNH, k_BTKH, v_BTKH):
  """softmax(q k^T / sqrt(H) + causal mask) v; query head n reads kv head n // (N / K)."""
  R = q_BTNH.shape[2] // k_BTKH.shape[2]
  k_BTNH, v_BTNH = np.repeat(k_BTKH, R, axis=2), np.repeat(v_BTKH, R, axis=2)
  s_BNTT = np.einsum('btnh,bsnh->bnts', q_BTNH, k_BTNH) / np.sqrt(q_BTNH.shape[-1])
  T = s_BNTT.shape[-1]
  s_BNTT = np.where(np.tril(np.ones((T, T), bool)), s_BNTT, -np.inf)
  p_BNTT = np.exp(s_BNTT - s_BNTT.max(-1, keepdims=True))
  return np.einsum('bnts,bsnh->btnh', p_BNTT / p_BNTT.sum(-1, keepdims=True), v_BTNH)


def np_mlp(cfg, p, x_BTD):
  if cfg.mlp == 'swiglu':  # Shazeer 2020, eq. 6
    gate_BTF = x_BTD @ p['w_gate']
    return (gate_BTF / (1 + np.exp(-gate_BTF)) * (x_BTD @ p['w_up'])) @ p['w_down']
  h_BTF = x_BTD @ p['w_in'] + p['b_in']  # GELU, tanh form (Hendrycks & Gimpel 2016)
  h_BTF = 0.5 * h_BTF * (1 + np.tanh(np.sqrt(2 / np.pi) * (h_BTF + 0.044715 * h_BTF ** 3)))
  return h_BTF @ p['w_out'] + p['b_out']


def np_forward(cfg, params, tokens_BT):
  """Pre-norm decoder: h = x + Attn(Norm(x)); y = h + MLP(Norm(h)); logits = Norm(y) W_vocab."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  tokens_BT = np.asarray(tokens_BT)
  x_BTD = p['embed']['tokens'][tokens_BT]
  if cfg.positions == 'learned':
    x_BTD = x_BTD + p['embed']['positions'][:tokens_BT.shape[1]]
  for layer in range(cfg.n_layers):
    blk = jax.tree.map(lambda a: a[layer], p['blocks'])
    a, h_BTD = blk['attn'], np_norm(cfg, blk['attn_norm'], x_BTD)
    q_BTNH = np.einsum('btd,dnh->btnh', h_BTD, a['wq']) + a.get('bq', 0.0)
    k_BTKH = np.einsum('btd,dkh->btkh', h_BTD, a['wk']) + a.get('bk', 0.0)
    v_BTKH = np.einsum('btd,dkh->btkh', h_BTD, a['wv']) + a.get('bv', 0.0)
    if cfg.positions == 'rope':
      q_BTNH, k_BTKH = np_rope(q_BTNH, cfg.rope_theta), np_rope(k_BTKH, cfg.rope_theta)
    o_BTNH = np_causal_attention(q_BTNH, k_BTKH, v_BTKH)
    x_BTD = x_BTD + np.einsum('btnh,nhd->btd', o_BTNH, a['wo']) + a.get('bo', 0.0)
    x_BTD = x_BTD + np_mlp(cfg, blk['mlp'], np_norm(cfg, blk['mlp_norm'], x_BTD))
  x_BTD = np_norm(cfg, p['final_norm'], x_BTD)
  return x_BTD @ (p['embed']['tokens'].T if cfg.tie_embeddings else p['head'])


def test_forward_matches_numpy_oracle(model):
  assert model.logits_BTV.shape == (B, T, model.cfg.vocab_size)
  assert model.logits_BTV.dtype == jnp.float32
  want_BTV = np_forward(model.cfg, model.params, model.tokens_BT)
  np.testing.assert_allclose(model.logits_BTV, want_BTV, rtol=1e-5,
                             atol=1e-5 * np.abs(want_BTV).max())


# ---------------------------------------------------------------- consistency of forward


def test_causality(model):
  """Changing token t changes the logits at t but none before it."""
  t = 5
  tokens_BT = model.tokens_BT.at[0, t].set((model.tokens_BT[0, t] + 1) % model.cfg.vocab_size)
  logits_BTV = model.forward(model.params, tokens_BT)
  np.testing.assert_array_equal(logits_BTV[:, :t], model.logits_BTV[:, :t])
  np.testing.assert_array_equal(logits_BTV[1], model.logits_BTV[1])
  assert not np.allclose(logits_BTV[0, t], model.logits_BTV[0, t], rtol=1e-3)


def test_prefill_then_decode_matches_forward(model):
  prompt = 4
  prefill = jax.jit(functools.partial(transformer.prefill, model.cfg), static_argnums=2)
  logits_BPV, cache = prefill(model.params, model.tokens_BT[:, :prompt], T)
  np.testing.assert_allclose(logits_BPV, model.logits_BTV[:, :prompt], rtol=0, atol=1e-5)
  decode = jax.jit(functools.partial(transformer.decode_step, model.cfg))
  for t in range(prompt, T):
    logits_B1V, cache = decode(model.params, model.tokens_BT[:, t:t + 1], cache)
    np.testing.assert_allclose(logits_B1V[:, 0], model.logits_BTV[:, t], rtol=0, atol=1e-5,
                               err_msg=f'position {t}')
  assert int(cache['length']) == T


def test_packed_segments_match_separate_sequences(model):
  """Two sequences packed in one row with segment ids and restarted positions give the logits
  each would get alone (a causal forward of the padded sequence, read on its own positions)."""
  a, b = model.tokens_BT[0, :4], model.tokens_BT[1, :5]
  packed_1T = jnp.concatenate([a, b])[None]
  segment_ids_1T = jnp.asarray([[1] * 4 + [2] * 5])
  positions_1T = jnp.asarray([list(range(4)) + list(range(5))])
  packed_1TV = model.forward(model.params, packed_1T, segment_ids_BT=segment_ids_1T,
                             positions_BT=positions_1T)
  alone_BTV = model.forward(model.params, jnp.stack([jnp.pad(a, (0, 5)), jnp.pad(b, (0, 4))]))
  np.testing.assert_allclose(packed_1TV[0, :4], alone_BTV[0, :4], rtol=0, atol=1e-5)
  np.testing.assert_allclose(packed_1TV[0, 4:], alone_BTV[1, :5], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- dropout and remat


def test_dropout_only_when_training_with_an_rng(model):
  cfg = model.cfg.copy_and_resolve_references()
  cfg.dropout = 0.1
  forward = functools.partial(transformer.forward, cfg)
  variants = jax.jit(lambda params, tokens_BT, key1, key2: {
      'train_key1': forward(params, tokens_BT, rng=key1, train=True),
      'train_key2': forward(params, tokens_BT, rng=key2, train=True),
      'eval_key1': forward(params, tokens_BT, rng=key1, train=False),
      'train_no_rng': forward(params, tokens_BT, rng=None, train=True)})
  logits = variants(model.params, model.tokens_BT, jax.random.key(1), jax.random.key(2))
  again = variants(model.params, model.tokens_BT, jax.random.key(1), jax.random.key(3))
  np.testing.assert_array_equal(logits['train_key1'], again['train_key1'])
  assert not np.allclose(logits['train_key1'], logits['train_key2'], rtol=1e-3)
  assert not np.allclose(logits['train_key1'], model.logits_BTV, rtol=1e-3)
  np.testing.assert_allclose(logits['eval_key1'], model.logits_BTV, rtol=0, atol=1e-6)
  np.testing.assert_allclose(logits['train_no_rng'], model.logits_BTV, rtol=0, atol=1e-6)


def lm_loss(cfg, params, tokens_BT):
  logits_BTV = transformer.forward(cfg, params, tokens_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1])
  return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1).mean()


def test_remat_gives_the_same_gradients(model):
  remat_cfg = model.cfg.copy_and_resolve_references()
  remat_cfg.remat = True
  grads = lambda params, tokens_BT: [jax.grad(functools.partial(lm_loss, cfg))(params, tokens_BT)
                                     for cfg in (model.cfg, remat_cfg)]
  traced = jax.jit(grads).trace(model.params, model.tokens_BT)
  assert 'remat' in str(traced.jaxpr)
  plain, remat = traced.lower().compile()(model.params, model.tokens_BT)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), plain, remat)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(plain))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize('key,value,message', [
    ('n_heads', 3, 'model.n_heads=3'),            # 3 does not divide d_model=16
    ('n_kv_heads', 3, 'model.n_kv_heads=3'),      # 3 does not divide n_heads=4
    ('norm', 'batchnorm', "model.norm='batchnorm'"),
    ('mlp', 'relu', "model.mlp='relu'"),
    ('positions', 'alibi', "model.positions='alibi'"),
    ('head_dim', 5, 'model.head_dim=5'),          # RoPE needs an even head dim
    ('dropout', 1.0, 'model.dropout=1.0'),
    ('d_model', 0, 'model.d_model=0'),
    ('attention_backend', 'cuda_magic', "model.attention_backend='cuda_magic'"),
])
def test_validate_names_the_bad_key(key, value, message):
  cfg = llama_config()
  cfg.head_dim = 0
  cfg[key] = value
  for check in (transformer.validate, transformer.param_specs):
    try:
      check(cfg)
    except ConfigError as e:
      assert message in str(e), str(e)
    else:
      raise AssertionError(f'{check.__name__} accepted model.{key}={value!r}')


def test_forward_longer_than_max_len_raises(model):
  tokens_BT = jnp.zeros((1, model.cfg.max_len + 1), jnp.int32)
  with pytest.raises(ValueError, match='model.max_len=12'):
    transformer.forward(model.cfg, model.params, tokens_BT)
