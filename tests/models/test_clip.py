"""The CLIP / SigLIP dual encoder: both towers end to end against a float64 NumPy re-derivation
(patch embedding, CLIP's pre-norm, pre-LN blocks with causal and padding masks, final norm, cls
and MAP pooling, eos / max_id / last text pooling, heads with and without bias), gradients of the
text tower against float64 finite differences, padding that leaves the embedding unchanged,
causal against bidirectional text attention, and config errors. The whole model is checked
against transformers in test_clip_hf.py."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from lab.config import ConfigError
from lab.models import clip
from lab.nn import param_spec as ps
from oracles import assert_vjp_matches_oracle

B, T, V, EOS = 3, 7, 20, 2
jit = functools.partial(jax.jit, static_argnums=0,
                        compiler_options={'xla_backend_optimization_level': 0})


def make_cfg(flavour='clip', **text):
  """Tiny towers; SigLIP without an image head, so its embedding width is the image width."""
  siglip = flavour == 'siglip'
  return ml_collections.FrozenConfigDict(dict(
      name='clip', flavour=flavour, embed_dim=16 if siglip else 12, image_head=not siglip,
      image_size=8, channels=3, vocab_size=V, attention_backend='reference',
      image=dict(patch_size=4, d_model=16, n_layers=2, n_heads=2, mlp_dim=24,
                 pooling='map' if siglip else 'cls', class_token=not siglip, pos_embed='learned',
                 mlp_activation='gelu_tanh' if siglip else 'quick_gelu', norm_eps=1e-5,
                 dropout=0.0, drop_path=0.0, pre_norm=not siglip),
      text=dict(dict(max_len=10, d_model=24, n_layers=2, n_heads=4, mlp_dim=32,
                     mlp_activation='gelu' if siglip else 'quick_gelu', norm_eps=1e-3,
                     dropout=0.0, pooling='last' if siglip else 'eos', eos_id=EOS), **text)))


def draw_params(cfg, seed):
  """float32-representable float64 params: norm scales 1 + N(0, 0.2^2), the rest N(0, 0.3^2)
  (non-zero biases, so a dropped bias shows)."""
  rng = np.random.default_rng(seed)
  def draw(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    std = 0.2 if base else 0.3
    return (base + std * rng.standard_normal(s.shape)).astype(np.float32).astype(np.float64)
  return jax.tree_util.tree_map_with_path(draw, clip.param_specs(cfg), is_leaf=ps.is_spec)


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def draw_text(seed, length=T, pad_id=0):
  """ids [B, length]: <bos>-free random words, one <eos> per row at a random position, then
  padding; mask [B, length], 1 through the <eos>."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, V, (B, length))
  ends = rng.choice(np.arange(1, length - 1), B, replace=False)
  ids[np.arange(B), ends] = EOS
  mask = (np.arange(length)[None] <= ends[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, pad_id).astype(np.int32), mask


# ---------------------------------------------------------------- float64 NumPy oracle

ACTIVATIONS = {'gelu': lambda u: 0.5 * u * (1 + erf(u / np.sqrt(2))),
               'gelu_tanh': lambda u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) *
                                                             (u + 0.044715 * u ** 3))),
               'quick_gelu': lambda u: u / (1 + np.exp(-1.702 * u))}


def np_layer_norm(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_attention(a, x_q, x_kv, visible_BTS):
  """Multi-head softmax attention with biased projections; keys outside visible_BTS are hidden."""
  q = np.einsum('btd,dnh->btnh', x_q, a['wq']) + a['bq']
  k = np.einsum('bsd,dnh->bsnh', x_kv, a['wk']) + a['bk']
  v = np.einsum('bsd,dnh->bsnh', x_kv, a['wv']) + a['bv']
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  s = np.where(visible_BTS[:, None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  o = np.einsum('bnts,bsnh->btnh', w / w.sum(-1, keepdims=True), v)
  return np.einsum('btnh,nhd->btd', o, a['wo']) + a['bo']


def np_mlp(m, x, act):
  return ACTIVATIONS[act](x @ m['w_in'] + m['b_in']) @ m['w_out'] + m['b_out']


def np_encoder(p, x, visible_BTS, act, eps):
  """Pre-LN blocks (ViT eqs. 2-3), one layer of the stacked params at a time."""
  for layer in range(p['attn']['wq'].shape[0]):
    b = jax.tree.map(lambda a: a[layer], p)
    h = np_layer_norm(x, b['attn_norm'], eps)
    x = x + np_attention(b['attn'], h, h, visible_BTS)
    x = x + np_mlp(b['mlp'], np_layer_norm(x, b['mlp_norm'], eps), act)
  return x


def np_image(cfg, p, x_BXYC):
  """ViT of CLIP (class token, pre-norm, cls pooling) or SigLIP (MAP pooling), then the head."""
  i, t = cfg.image, p['image']
  n = x_BXYC.shape[1] // i.patch_size
  patches = x_BXYC.reshape(B, n, i.patch_size, n, i.patch_size, -1).transpose(0, 1, 3, 2, 4, 5)
  x = np.einsum('bijxyc,xyco->bijo', patches, t['patch']['w']).reshape(B, n * n, -1)
  x = x + t['patch']['b']
  if i.class_token:
    x = np.concatenate([np.broadcast_to(t['cls'], (B, 1, i.d_model)), x], 1)
  x = x + t['pos_embed']
  if i.pre_norm:
    x = np_layer_norm(x, t['pre_norm'], i.norm_eps)
  visible = np.ones((B, x.shape[1], x.shape[1]), bool)
  h = np_layer_norm(np_encoder(t['encoder'], x, visible, i.mlp_activation, i.norm_eps),
                    t['final_norm'], i.norm_eps)
  if i.pooling == 'cls':
    z = h[:, 0]
  else:
    m = t['map']
    probe = np.broadcast_to(m['probe'], (B, 1, i.d_model))
    u = np_attention(m['attn'], probe, h, np.ones((B, 1, h.shape[1]), bool))
    z = (u + np_mlp(m['mlp'], np_layer_norm(u, m['norm'], i.norm_eps), i.mlp_activation))[:, 0]
  if not cfg.image_head:
    return z
  return z @ p['image_head']['w'] + p['image_head'].get('b', 0.0)


def np_pool_index(cfg, row) -> int:
  """The position CLIP / SigLIP read: the first <eos>, the first highest id, or the last."""
  row = list(row)
  return {'eos': lambda: row.index(cfg.text.eos_id), 'max_id': lambda: row.index(max(row)),
          'last': lambda: len(row) - 1}[cfg.text.pooling]()


def np_text(cfg, p, ids_BT, mask_BT, pos_embed=None):
  """The text tower and head; pos_embed replaces the params' (the gradient check's argument)."""
  t, tp = cfg.text, p['text']
  pos_embed = tp['pos_embed'] if pos_embed is None else pos_embed
  n = ids_BT.shape[1]
  x = tp['embed'][ids_BT] + pos_embed[:n]
  visible = np.ones((B, n, n), bool)
  if cfg.flavour == 'clip':
    visible &= np.tril(np.ones((n, n), bool))
  if mask_BT is not None:
    visible &= mask_BT[:, None, :] == 1
  h = np_layer_norm(np_encoder(tp['encoder'], x, visible, t.mlp_activation, t.norm_eps),
                    tp['final_norm'], t.norm_eps)
  z = np.stack([h[b, np_pool_index(cfg, ids_BT[b])] for b in range(B)])
  return z @ p['text_head']['w'] + p['text_head'].get('b', 0.0)


# ---------------------------------------------------------------- towers against the oracle

_forward = jit(clip.forward)
_text_tokens = jit(clip.text_tokens)


@pytest.mark.parametrize('flavour, pooling, masked', [
    ('clip', 'eos', True), ('clip', 'max_id', False), ('siglip', 'last', True),
    ('siglip', 'last', False)])
def test_towers_match_numpy(flavour, pooling, masked):
  cfg = make_cfg(flavour, pooling=pooling)
  params = draw_params(cfg, 0)
  x = np.random.default_rng(1).standard_normal((B, 8, 8, 3)).astype(np.float32)
  ids, mask = draw_text(2)
  img, txt = _forward(cfg, f32(params), x, ids, mask if masked else None)
  assert img.shape == txt.shape == (B, cfg.embed_dim)
  np.testing.assert_allclose(img, np_image(cfg, params, x.astype(np.float64)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(txt, np_text(cfg, params, ids, mask if masked else None),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('flavour', ['clip', 'siglip'])
def test_text_gradients_match_finite_differences(flavour):
  """d txt / d (the positions used) through the blocks, the masks, the pooling and the head."""
  cfg = make_cfg(flavour)
  params = draw_params(cfg, 3)
  ids, mask = draw_text(4, length=5)

  def f(pos_TD):
    p = dict(params, text=dict(params['text'], pos_embed=pos_TD))
    return clip.encode_text(cfg, f32(p), ids, mask)

  oracle = lambda pos_TD: np_text(cfg, params, ids, mask, pos_embed=pos_TD)
  assert_vjp_matches_oracle(f, oracle, [params['text']['pos_embed'][:5]],
                            np.random.default_rng(5))


# ---------------------------------------------------------------- padding and causality

def test_padding_does_not_change_the_text_embedding():
  """CLIP ('eos', causal) with the mask: more padding and any ids in the padded slots give the
  same embedding. SigLIP ('last'): with the mask, ids in the padded slots before the last do not
  matter; without it they do (the pooled token attends to them)."""
  rng = np.random.default_rng(6)
  cfg = make_cfg('clip')
  params = f32(draw_params(cfg, 7))
  ids, mask = draw_text(8)
  _, txt = _forward(cfg, params, np.zeros((B, 8, 8, 3)), ids, mask)
  longer, mask2 = np.pad(ids, ((0, 0), (0, 3))), np.pad(mask, ((0, 0), (0, 3)))
  junk = np.where(mask2 == 1, longer, rng.integers(3, V, longer.shape))
  for ids2 in (longer, junk):
    _, txt2 = _forward(cfg, params, np.zeros((B, 8, 8, 3)), ids2, mask2)
    np.testing.assert_allclose(txt2, txt, rtol=1e-6, atol=1e-6)

  cfg = make_cfg('siglip')
  params = f32(draw_params(cfg, 9))
  junk = ids.copy()
  before_last = (mask == 0) & (np.arange(T) < T - 1)
  junk[before_last] = rng.integers(3, V, before_last.sum())
  assert before_last.any()
  for m, same in ((mask, True), (None, False)):
    _, txt = _forward(cfg, params, np.zeros((B, 8, 8, 3)), ids, m)
    _, txt2 = _forward(cfg, params, np.zeros((B, 8, 8, 3)), junk, m)
    assert np.allclose(txt2, txt, rtol=1e-6, atol=1e-6) == same


def test_clip_text_is_causal_and_siglip_text_is_not():
  """Changing tokens from position 4 on leaves CLIP's hidden states before 4 unchanged and
  changes all of SigLIP's."""
  ids, _ = draw_text(10)
  later = ids.copy()
  later[:, 4:] = (later[:, 4:] + 1) % V
  for flavour in ('clip', 'siglip'):
    cfg = make_cfg(flavour)
    params = f32(draw_params(cfg, 11))['text']
    h, h2 = (np.asarray(_text_tokens(cfg, params, t)) for t in (ids, later))
    change = np.abs(h - h2).max(axis=(0, 2))
    if flavour == 'clip':
      assert change[:4].max() == 0 and change[4:].min() > 1e-3
    else:
      assert change.min() > 1e-3


# ---------------------------------------------------------------- config and input errors

def test_config_and_input_errors():
  for path, value, match in [
      ('embed_dim', 12, r'model.embed_dim=12 with model.image_head=False; expected the image'),
      ('text.n_heads', 5, 'model.text.n_heads=5 does not divide model.text.d_model=24'),
      ('text.pooling', 'mean', "model.text.pooling='mean'; expected one of"),
      ('image.n_heads', 3, 'model.image \\(a lab.models.vit config\\): model.n_heads=3'),
      ('flavour', 'blip', "model.flavour='blip'; expected one of")]:
    cfg = make_cfg('siglip').as_configdict()
    *parents, leaf = path.split('.')
    node = cfg
    for name in parents:
      node = node[name]
    node[leaf] = value
    with pytest.raises(ConfigError, match=match):
      clip.validate(cfg)
  cfg = make_cfg('siglip').as_configdict()
  cfg.text.causal = True
  with pytest.raises(ConfigError, match=r"model.text lacks fields \[\] and has unknown fields "
                                        r"\['causal'\]"):
    clip.validate(cfg)
  cfg = make_cfg('clip')
  params = f32(draw_params(cfg, 0))
  with pytest.raises(ValueError, match='text of 11 tokens; expected at most model.text.max_len'):
    clip.encode_text(cfg, params, np.zeros((B, 11), np.int32))
