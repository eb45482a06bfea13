"""BLIP's MED: cross-attention against a float64 NumPy oracle (values and gradients), the text
transformer in its three modes and its heads against a float64 re-derivation of BERT's post-LN
blocks and against transformers' BlipTextModel / BlipTextLMHeadModel, which parameters the
modes share (perturbing each group), decoder causality, encoder bidirectionality, padding,
caption decoding, the clamped temperature, and config errors."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from lab.config import ConfigError
from lab.models import blip
from lab.nn import param_spec as ps
from lab.nn.cross_attention import cross_attention, cross_attention_specs
from oracles import assert_vjp_matches_oracle

B, T, V = 3, 6, 13
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
jit_mode = functools.partial(jit, static_argnames=('mode',))
TASK = {'text': 'cls', 'itm': 'enc', 'lm': 'dec'}


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=16, channels=3, vocab_size=V, max_len=8, embed_dim=6,
      attention_backend='reference',
      vision=dict(patch_size=8, d_model=10, n_layers=1, n_heads=2, mlp_dim=12),
      text=dict(d_model=8, n_layers=2, n_heads=2, mlp_dim=12)) | overrides)


def draw_params(cfg, seed):
  """float32-representable float64 params: norm scales 1 + N(0, 0.2^2), the rest N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  def draw(path, s):
    base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
    return (base + 0.3 * rng.standard_normal(s.shape)).astype(np.float32).astype(np.float64)
  p = jax.tree_util.tree_map_with_path(draw, blip.param_specs(cfg), is_leaf=ps.is_spec)
  return p | {'temp': np.float64(0.07)}


def f32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def texts(seed, lengths=(6, 4, 3)):
  """tokens i32[B, T] (ids 5.. on text, 0 on padding) and mask i32[B, T]."""
  rng = np.random.default_rng(seed)
  mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)
  return np.where(mask, rng.integers(5, V, (B, T)), 0).astype(np.int32), mask


def image_tokens(seed, S=5, W=10):
  return np.random.default_rng(seed).standard_normal((B, S, W)).astype(np.float32)


# ---------------------------------------------------------------- float64 oracle


def np_ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def np_gelu(u):
  return 0.5 * u * (1 + erf(u / np.sqrt(2)))


def np_attention(p, x_q, x_kv, mask_BTS):
  """Vaswani et al. eq. 1 per head with biased projections; mask_BTS: which keys a query sees."""
  q = np.einsum('btd,dnh->btnh', x_q, p['wq']) + p['bq']
  k = np.einsum('bsw,wnh->bsnh', x_kv, p['wk']) + p['bk']
  v = np.einsum('bsw,wnh->bsnh', x_kv, p['wv']) + p['bv']
  s = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask_BTS[:, None], s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('btnh,nhd->btd', np.einsum('bnts,bsnh->btnh', w, v), p['wo']) + p['bo']


def np_text(P, tokens, mask, mode, img=None):
  """BERT / BLIP med.py: LN(E[x] + pos) with the mode's first token, then per layer
  LN(x + SA), LN(x + CA) for 'itm' / 'lm', LN(x + FFN); pads see only pads."""
  t, e = P['text'], P['text']['embed']
  x = e['tokens'][tokens]
  x[:, 0] = e[TASK[mode]]
  x = np_ln(x + e['pos'][:tokens.shape[1]], e['norm'])
  seen = mask[:, :, None] == mask[:, None, :]
  if mode == 'lm':
    seen = seen & np.tril(np.ones((tokens.shape[1],) * 2, bool))
  sa = t['sa_decoder' if mode == 'lm' else 'sa_encoder']
  for l in range(t['ffn']['mlp']['w_in'].shape[0]):
    at = lambda tree: jax.tree.map(lambda a: a[l], tree)
    x = np_ln(x + np_attention(at(sa['attn']), x, x, seen), at(sa['norm']))
    if mode != 'text':
      everything = np.ones((x.shape[0], x.shape[1], img.shape[1]), bool)
      x = np_ln(x + np_attention(at(t['cross']['attn']), x, img, everything),
                at(t['cross']['norm']))
    m = at(t['ffn']['mlp'])
    x = np_ln(x + np_gelu(x @ m['w_in'] + m['b_in']) @ m['w_out'] + m['b_out'],
              at(t['ffn']['norm']))
  return x


def np_normalise(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- cross-attention


def test_cross_attention_matches_oracle():
  rng = np.random.default_rng(0)
  D, W, N, S = 8, 6, 2, 7
  p = jax.tree.map(lambda s: 0.4 * rng.standard_normal(s.shape),
                   cross_attention_specs(D, W, N), is_leaf=ps.is_spec)
  x, c = rng.standard_normal((B, 4, D)), rng.standard_normal((B, S, W))
  got = jit(lambda p, x, c: cross_attention(p, x, c, backend='reference'))(f32(p), f32(x), f32(c))
  want = np_attention(p, x, c, np.ones((B, 4, S), bool))
  assert got.shape == (B, 4, D)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def with_weights(p, wq, wk, wv):
    return {**p, 'wq': wq, 'wk': wk, 'wv': wv}
  f = lambda x, c, wq, wk, wv: cross_attention(with_weights(f32(p), wq, wk, wv), x, c,
                                               backend='reference')
  oracle = lambda x, c, wq, wk, wv: np_attention(with_weights(p, wq, wk, wv), x, c,
                                                 np.ones((B, 4, S), bool))
  assert_vjp_matches_oracle(f, oracle, (x, c, p['wq'], p['wk'], p['wv']), rng)


def test_cross_attention_rejects_mismatched_batches():
  p = ps.init(cross_attention_specs(8, 6, 2), jax.random.key(0))
  with pytest.raises(ValueError, match='same B'):
    cross_attention(p, jnp.zeros((2, 3, 8)), jnp.zeros((3, 4, 6)))


# ---------------------------------------------------------------- the three modes


@pytest.mark.parametrize('mode', ['text', 'itm', 'lm'])
def test_text_modes_match_oracle(mode):
  cfg = make_cfg()
  P = draw_params(cfg, 1)
  tokens, mask = texts(2)
  img = None if mode == 'text' else image_tokens(3)
  run = jit_mode(lambda p, t, m, img, mode: blip.text_hidden(cfg, p, t, m, mode, img))
  got = run(f32(P), tokens, mask, img, mode=mode)
  np.testing.assert_allclose(got, np_text(P, tokens, mask, mode, img), rtol=2e-4, atol=2e-4)


def test_heads_match_oracle():
  cfg = make_cfg()
  P = draw_params(cfg, 4)
  tokens, mask = texts(5)
  img = image_tokens(6)
  p32 = f32(P)
  lm = jit(lambda p, t, m, i: blip.lm_logits(cfg, p, t, m, i))(p32, tokens, mask, img)
  h = P['lm_head']
  u = np_ln(np_gelu(np_text(P, tokens, mask, 'lm', img) @ h['w'] + h['b']), h['norm'])
  np.testing.assert_allclose(lm, u @ P['text']['embed']['tokens'].T + h['bias'], rtol=2e-4,
                             atol=2e-4)
  itm = jit(lambda p, t, m, i: blip.itm_logits(cfg, p, t, m, i))(p32, tokens, mask, img)
  want = np_text(P, tokens, mask, 'itm', img)[:, 0] @ P['itm_head']['w'] + P['itm_head']['b']
  np.testing.assert_allclose(itm, want, rtol=2e-4, atol=2e-4)
  txt = jit(lambda p, t, m: blip.text_features(cfg, p, t, m))(p32, tokens, mask)
  want = np_text(P, tokens, mask, 'text')[:, 0] @ P['text_proj']['w'] + P['text_proj']['b']
  np.testing.assert_allclose(txt, np_normalise(want), rtol=2e-4, atol=2e-4)
  img_f = blip.image_features(cfg, p32, jnp.asarray(img))
  want = img[:, 0] @ P['vision_proj']['w'] + P['vision_proj']['b']
  np.testing.assert_allclose(img_f, np_normalise(want), rtol=1e-5, atol=1e-5)


def _hf_state(P, sa, with_lm_head):
  """transformers' BLIP text keys for our params with self-attention `sa`; Linear weights are
  [out, in], heads flattened head-major."""
  import torch
  t = P['text']

  def linear(w, b, out_proj=False):
    """w_DNH / w_WNH -> [N H, D]; w_NHD (the output projection) -> [D, N H]."""
    w = w.reshape(-1, w.shape[-1]).T if out_proj else w.reshape(w.shape[0], -1).T
    return {'weight': w, 'bias': b.reshape(-1)}

  state = {'embeddings.word_embeddings.weight': t['embed']['tokens'],
           'embeddings.position_embeddings.weight': t['embed']['pos'],
           'embeddings.LayerNorm.weight': t['embed']['norm']['scale'],
           'embeddings.LayerNorm.bias': t['embed']['norm']['bias']}
  for l in range(t['ffn']['mlp']['w_in'].shape[0]):
    at = lambda tree: jax.tree.map(lambda a: a[l], tree)
    for name, layer in (('attention', at(t[sa])), ('crossattention', at(t['cross']))):
      a, pre = layer['attn'], f'encoder.layer.{l}.{name}.'
      for hf, ours in (('query', 'q'), ('key', 'k'), ('value', 'v')):
        for k, v in linear(a[f'w{ours}'], a[f'b{ours}']).items():
          state[f'{pre}self.{hf}.{k}'] = v
      for k, v in linear(a['wo'], a['bo'], out_proj=True).items():
        state[f'{pre}output.dense.{k}'] = v
      state[f'{pre}output.LayerNorm.weight'] = layer['norm']['scale']
      state[f'{pre}output.LayerNorm.bias'] = layer['norm']['bias']
    f, pre = at(t['ffn']), f'encoder.layer.{l}.'
    state |= {pre + 'intermediate.dense.weight': f['mlp']['w_in'].T,
              pre + 'intermediate.dense.bias': f['mlp']['b_in'],
              pre + 'output.dense.weight': f['mlp']['w_out'].T,
              pre + 'output.dense.bias': f['mlp']['b_out'],
              pre + 'output.LayerNorm.weight': f['norm']['scale'],
              pre + 'output.LayerNorm.bias': f['norm']['bias']}
  if with_lm_head:
    h = P['lm_head']
    state = {'bert.' + k: v for k, v in state.items()} | {
        'cls.predictions.transform.dense.weight': h['w'].T,
        'cls.predictions.transform.dense.bias': h['b'],
        'cls.predictions.transform.LayerNorm.weight': h['norm']['scale'],
        'cls.predictions.transform.LayerNorm.bias': h['norm']['bias'],
        'cls.predictions.bias': h['bias'], 'cls.predictions.decoder.bias': h['bias'],
        'cls.predictions.decoder.weight': t['embed']['tokens']}
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def test_text_modes_match_transformers_blip():
  """Our modes against transformers' port of BLIP's med.py (one BERT with cross-attention run
  as encoder or decoder), loaded with our encoder's or decoder's self-attention; compared on the
  text positions (HF lets padded queries see the text, we let them see padding only)."""
  import torch
  from transformers import BlipTextConfig
  from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel
  cfg = make_cfg()
  P = draw_params(cfg, 7)
  tokens, mask = texts(8)
  img = image_tokens(9).astype(np.float64)
  hf_cfg = BlipTextConfig(vocab_size=V, hidden_size=8, encoder_hidden_size=10,
                          intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                          max_position_embeddings=8, layer_norm_eps=1e-12, hidden_act='gelu',
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          is_decoder=True, pad_token_id=0)
  hf_cfg._attn_implementation = 'eager'
  p32 = f32(P)
  text_mask = mask.astype(bool)

  def embeds(mode):
    x = P['text']['embed']['tokens'][tokens]
    x[:, 0] = P['text']['embed'][TASK[mode]]
    return torch.from_numpy(x)

  run = jit_mode(lambda p, t, m, i, mode: blip.text_hidden(cfg, p, t, m, mode, i))
  encoder = BlipTextModel(hf_cfg, add_pooling_layer=False).double().eval()
  encoder.load_state_dict(_hf_state(P, 'sa_encoder', False))
  with torch.no_grad():
    for mode, image in (('text', None), ('itm', torch.from_numpy(img))):
      want = encoder(inputs_embeds=embeds(mode), attention_mask=torch.from_numpy(mask),
                     encoder_hidden_states=image, is_decoder=False).last_hidden_state.numpy()
      got = run(p32, tokens, mask, None if image is None else img.astype(np.float32), mode=mode)
      np.testing.assert_allclose(np.asarray(got)[text_mask], want[text_mask], rtol=2e-4,
                                 atol=2e-4)
  decoder = BlipTextLMHeadModel(hf_cfg).double().eval()
  missing = decoder.load_state_dict(_hf_state(P, 'sa_decoder', True), strict=False)
  assert not missing.unexpected_keys and not missing.missing_keys
  with torch.no_grad():
    want = decoder(inputs_embeds=embeds('lm'), attention_mask=torch.from_numpy(mask),
                   encoder_hidden_states=torch.from_numpy(img), is_decoder=True).logits.numpy()
  got = jit(lambda p, t, m, i: blip.lm_logits(cfg, p, t, m, i))(p32, tokens, mask, img)
  np.testing.assert_allclose(np.asarray(got)[text_mask], want[text_mask], rtol=2e-4, atol=2e-4)


# ---------------------------------------------------------------- sharing, masks, causality


def test_parameter_tree_shares_all_but_self_attention():
  cfg = make_cfg()
  specs = blip.param_specs(cfg)
  assert set(specs) == {'vision', 'text', 'lm_head', 'vision_proj', 'text_proj', 'itm_head',
                        'temp'}
  assert set(specs['text']) == {'embed', 'sa_encoder', 'sa_decoder', 'cross', 'ffn'}
  shapes = lambda tree: jax.tree.map(lambda s: s.shape, tree, is_leaf=ps.is_spec)
  assert shapes(specs['text']['sa_encoder']) == shapes(specs['text']['sa_decoder'])
  assert specs['text']['cross']['attn']['wk'].shape == (2, 10, 2, 4)  # L, W, N, H
  assert specs['text']['embed']['tokens'].axes == ('vocab', 'embed')
  assert specs['itm_head']['w'].shape == (8, 2) and specs['temp'].shape == ()
  D, F, L = 8, 12, 2
  sa = 4 * D * D + 4 * D + 2 * D
  cross = 2 * D * D + 2 * 10 * D + 4 * D + 2 * D
  ffn = 2 * D * F + F + D + 2 * D
  embed = V * D + 8 * D + 3 * D + 2 * D
  assert ps.count(specs['text']) == embed + L * (2 * sa + cross + ffn)


def test_each_mode_uses_exactly_its_parameters():
  """Perturb one group of text parameters at a time and see which outputs move: the unimodal
  encoder is the grounded encoder minus cross-attention, and the decoder differs from the
  grounded encoder only in its self-attention."""
  cfg = make_cfg()
  P = f32(draw_params(cfg, 10))
  tokens, mask = texts(11)
  img = image_tokens(12)
  outputs = jit(lambda p: {'text': blip.text_hidden(cfg, p, tokens, mask, 'text'),
                           'itm': blip.text_hidden(cfg, p, tokens, mask, 'itm', img),
                           'lm': blip.text_hidden(cfg, p, tokens, mask, 'lm', img)})
  base = outputs(P)
  uses = {'embed': {'text', 'itm', 'lm'}, 'sa_encoder': {'text', 'itm'}, 'sa_decoder': {'lm'},
          'cross': {'itm', 'lm'}, 'ffn': {'text', 'itm', 'lm'}}
  for group, users in uses.items():
    bumped = {**P, 'text': {**P['text'], group: jax.tree.map(lambda a: a + 0.1,
                                                             P['text'][group])}}
    moved = {m for m, h in outputs(bumped).items() if np.abs(h - base[m]).max() > 1e-3}
    assert moved == users, group


def test_decoder_is_causal_and_encoders_bidirectional():
  cfg = make_cfg()
  P = f32(draw_params(cfg, 13))
  tokens, _ = texts(14, lengths=(T, T, T))
  mask = np.ones_like(tokens)
  img = image_tokens(15)
  changed = tokens.copy()
  changed[:, 3] = (changed[:, 3] - 5 + 1) % (V - 5) + 5
  run = jit_mode(lambda p, t, mode: blip.text_hidden(cfg, p, t, mask, mode,
                                                None if mode == 'text' else img))
  for mode in ('text', 'itm', 'lm'):
    diff = np.abs(run(P, changed, mode=mode) - run(P, tokens, mode=mode)).max(axis=(0, 2))
    if mode == 'lm':
      assert diff[:3].max() < 1e-6 and diff[3:].min() > 1e-3, diff
    else:
      assert diff.min() > 1e-3, (mode, diff)


def test_padding_is_invisible_to_text_tokens():
  cfg = make_cfg()
  P = f32(draw_params(cfg, 16))
  tokens, mask = texts(17)
  img = image_tokens(18)
  other = np.where(mask, tokens, 7).astype(np.int32)
  run = jit_mode(lambda p, t, mode: blip.text_hidden(cfg, p, t, mask, mode,
                                                None if mode == 'text' else img))
  for mode in ('text', 'itm', 'lm'):
    a, b = np.asarray(run(P, tokens, mode=mode)), np.asarray(run(P, other, mode=mode))
    np.testing.assert_allclose(a[mask == 1], b[mask == 1], rtol=1e-6, atol=1e-6)
    assert np.abs(a[mask == 0] - b[mask == 0]).max() > 1e-3


# ---------------------------------------------------------------- captions and temperature


def test_caption_with_a_vanishing_nucleus_is_greedy_decoding():
  """top_p -> 0 keeps only the most likely token: the result equals greedy decoding done here
  step by step on lm_logits; after <eos> only <pad> follows and the mask ends at <eos>."""
  cfg = make_cfg()
  P = f32(draw_params(cfg, 19))
  img = jnp.asarray(image_tokens(20))
  bos, eos, pad, length = 1, 2, 0, 8
  got, got_mask = jit(lambda p, i, r: blip.caption(cfg, p, i, r, length=length, bos_id=bos,
                                                   eos_id=eos, pad_id=pad, top_p=1e-6))(
      P, img, jax.random.key(0))
  logits = jit(lambda p, t, i: blip.lm_logits(cfg, p, t, jnp.ones_like(t), i))
  want = np.full((B, length), pad, np.int32)
  want[:, 0] = bos
  for t in range(1, length):
    want[:, t] = np.argmax(np.asarray(logits(P, jnp.asarray(want), img))[:, t - 1], axis=-1)
  done = np.cumsum(want == eos, axis=1) - (want == eos) > 0  # strictly after the first <eos>
  want = np.where(done, pad, want)
  np.testing.assert_array_equal(got, want)
  first = np.where((want == eos).any(1), np.argmax(want == eos, axis=1), length - 1)
  np.testing.assert_array_equal(got_mask, np.arange(length)[None] <= first[:, None])


def test_caption_stops_at_eos_and_pads():
  """Make <eos> the only likely token after the first step: every caption is <bos> x <eos>."""
  cfg = make_cfg()
  P = f32(draw_params(cfg, 21))
  P['lm_head']['bias'] = P['lm_head']['bias'].at[2].set(50.0)
  tokens, mask = jit(lambda p, i, r: blip.caption(cfg, p, i, r, length=6, bos_id=1, eos_id=2,
                                                  pad_id=0))(P, jnp.asarray(image_tokens(22)),
                                                             jax.random.key(1))
  np.testing.assert_array_equal(tokens, np.tile([1, 2, 0, 0, 0, 0], (B, 1)))
  np.testing.assert_array_equal(mask, np.tile([1, 1, 0, 0, 0, 0], (B, 1)))


def test_temperature_is_clamped_with_a_straight_through_gradient():
  for t, want in ((0.07, 0.07), (0.0001, 0.001), (0.9, 0.5)):
    value, grad = jax.value_and_grad(lambda t: blip.temperature({'temp': t}))(jnp.float32(t))
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert grad == 1.0
  init = ps.init(blip.param_specs(make_cfg()), jax.random.key(0))
  np.testing.assert_allclose(init['temp'], 0.07, rtol=1e-6)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize('overrides, match', [
    (dict(vision=dict(patch_size=5, d_model=10, n_layers=1, n_heads=2, mlp_dim=12)),
     'patch_size=5 does not divide model.image_size=16'),
    (dict(text=dict(d_model=8, n_layers=2, n_heads=3, mlp_dim=12)),
     'model.text.n_heads=3 does not divide model.text.d_model=8'),
    (dict(text=dict(d_model=8, n_layers=0, n_heads=2, mlp_dim=12)), 'model.text.n_layers=0'),
    (dict(text=dict(d_model=8, n_heads=2, mlp_dim=12)), r"model.text lacks fields \['n_layers'\]"),
    (dict(max_len=0), 'model.max_len=0'),
    (dict(attention_backend='cuda'), "attention_backend='cuda'")])
def test_validate_rejects(overrides, match):
  with pytest.raises(ConfigError, match=match):
    blip.param_specs(make_cfg(**overrides))


def test_bad_inputs_raise():
  cfg = make_cfg()
  P = ps.init(blip.param_specs(cfg), jax.random.key(0))
  tokens = jnp.zeros((B, 9), jnp.int32)
  with pytest.raises(ValueError, match=r'texts of 9 tokens; expected 1..8'):
    blip.text_hidden(cfg, P, tokens, jnp.ones_like(tokens), 'text')
  tokens = jnp.zeros((B, 4), jnp.int32)
  with pytest.raises(ValueError, match="mode='itm' with img_BSW=None"):
    blip.text_hidden(cfg, P, tokens, jnp.ones_like(tokens), 'itm')
  with pytest.raises(ValueError, match="mode='mlm'"):
    blip.embed_text(cfg, P, tokens, 'mlm')
  with pytest.raises(ValueError, match='caption length=9'):
    blip.caption(cfg, P, jnp.zeros((B, 5, 10)), jax.random.key(0), length=9, bos_id=1,
                 eos_id=2, pad_id=0)
