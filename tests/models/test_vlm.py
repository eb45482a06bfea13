"""lab.models.vlm against independent oracles: transformers' ViTModel and GPT-2 (torch, CPU) run the
towers, with the LLaVA MLP connector in float64 NumPy and the placeholder scatter in NumPy between
them (the LLM fed HF's inputs_embeds); the transformer's embeds path against its token path;
placement (text before the first placeholder ignores the image); layout and config errors;
the merge's gradients."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from scipy.special import erf

from lab.config import ConfigError
from lab.models import transformer, transformer_hf, vit_hf, vlm, vlm_layout
from lab.nn import param_spec as ps

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
IMAGE_ID, VOCAB = 5, 24
GPT2 = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=0, d_ff=32,
            max_len=24, norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned',
            rope_theta=10000.0, bias=True, tie_embeddings=True, dropout=0.0, init_std=0.3,
            remat=False, attention_backend='reference')
LLAMA = GPT2 | dict(norm='rmsnorm', mlp='swiglu', positions='rope', bias=False,
                    tie_embeddings=False, n_kv_heads=1)


def _randomise(model, norm_words):
  """Weights and biases ~ N(0, 0.2), norm scales ~ N(1, 0.2), so a wrong wiring shows."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = any(w in name for w in norm_words) and name.endswith('weight')
      p.normal_(mean=1.0 if scale else 0.0, std=0.2)
  return model.eval()


@functools.cache
def hf_towers():
  """(HF ViTModel, HF GPT-2 LM) with random weights, tiny."""
  vit_model = _randomise(transformers.ViTModel(transformers.ViTConfig(
      image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=24, attn_implementation='eager')),
      ('layernorm',))
  gpt = _randomise(transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, layer_norm_epsilon=1e-2,
      bos_token_id=0, eos_token_id=1), attn_implementation='eager'), ('ln',))
  return vit_model, gpt


def draw_params(specs, seed: int, std: float = 0.3):
  """Every weight ~ N(0, std^2), norm scales around 1, drawn in NumPy (nothing to compile)."""
  rng = np.random.default_rng(seed)
  draw = lambda path, s: jnp.asarray(jax.tree_util.keystr(path).endswith("['scale']")
                                     + std * rng.standard_normal(s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, specs, is_leaf=ps.is_spec)


def vlm_config(vision_cfg, llm_cfg, connector='mlp', **connector_fields):
  """A VLM config whose parts are the given tower configs less the fields the VLM derives."""
  drop = lambda c, keys: {k: v for k, v in dict(c).items() if k not in keys}
  return ml_collections.FrozenConfigDict(dict(
      name='vlm', vocab_size=llm_cfg['vocab_size'], image_size=vision_cfg['image_size'],
      channels=vision_cfg['channels'], image_token_id=IMAGE_ID, attention_backend='reference',
      vision=drop(vision_cfg, vlm._DERIVED['vision']),
      connector=dict(connector=connector, **connector_fields),
      llm=drop(llm_cfg, vlm._DERIVED['llm'])))


@functools.cache
def hf_vlm():
  """(cfg, params) of a VLM whose towers are the HF models', with an MLP connector ~ N(0, 0.5)."""
  vit_model, gpt = hf_towers()
  vision_cfg, vision_params = vit_hf.from_hf_model(vit_model)
  llm_cfg = transformer_hf.config_from_hf(gpt.config.to_dict())
  state_dict = {k: v.numpy() for k, v in gpt.state_dict().items() if k != 'lm_head.weight'}
  llm_params = transformer_hf.params_from_hf(llm_cfg, state_dict, 'gpt2')
  cfg = vlm_config(vision_cfg, llm_cfg)
  connector = draw_params(vlm.param_specs(cfg)['connector'], 0, std=0.5)
  return cfg, {'vision': vision_params, 'connector': connector, 'llm': llm_params}


def layout(rng, B: int, T: int, M: int, starts) -> np.ndarray:
  """Text ids (never the image id) with M placeholders from position starts[b] of row b."""
  ids_BT = rng.integers(IMAGE_ID + 1, VOCAB, (B, T))
  ids_BT[:, 0] = 1
  for b, s in enumerate(starts):
    ids_BT[b, s:s + M] = IMAGE_ID
  return ids_BT


def np_gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def oracle_logits(params, images_BXYC, tokens_BT):
  """HF ViT's last_hidden_state without the class token -> float64 LLaVA MLP -> NumPy scatter
  into HF GPT-2's token embeddings -> HF GPT-2 on inputs_embeds."""
  vit_model, gpt = hf_towers()
  with torch.no_grad():
    h_BPC = vit_model(torch.from_numpy(images_BXYC.transpose(0, 3, 1, 2))).last_hidden_state
  h_BPC = h_BPC.numpy()[:, 1:].astype(np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params['connector'])
  y_BMD = np_gelu(h_BPC @ p['fc1']['w'] + p['fc1']['b']) @ p['fc2']['w'] + p['fc2']['b']
  e_BTD = gpt.transformer.wte.weight.detach().numpy()[tokens_BT].astype(np.float64)
  for b in range(len(tokens_BT)):
    e_BTD[b, tokens_BT[b] == IMAGE_ID] = y_BMD[b]
  with torch.no_grad():
    return gpt(inputs_embeds=torch.from_numpy(e_BTD.astype(np.float32))).logits.numpy()


def test_forward_matches_hf_towers_with_numpy_connector_and_merge():
  cfg, params = hf_vlm()
  M = vlm.tokens_per_image(cfg)
  assert M == 16
  rng = np.random.default_rng(1)
  images = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  tokens = layout(rng, 2, 28, M, starts=(1, 5))
  got = jit(functools.partial(vlm.forward, cfg))(params, images, tokens)
  want = oracle_logits(params, images, tokens)
  assert got.shape == want.shape == (2, 28, VOCAB)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want).max() > 1.0  # logits far from zero: a tolerance of 1e-4 means something


def test_text_before_the_first_placeholder_ignores_the_image():
  cfg, params = hf_vlm()
  rng = np.random.default_rng(2)
  start = 6
  tokens = layout(rng, 1, 28, vlm.tokens_per_image(cfg), starts=(start,))
  images = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
  forward = jit(functools.partial(vlm.forward, cfg))
  a, b = (np.asarray(forward(params, images[i:i + 1], tokens)) for i in range(2))
  np.testing.assert_array_equal(a[:, :start], b[:, :start])
  assert np.abs(a[:, start:] - b[:, start:]).max(axis=-1).min() > 1e-3  # every later one moves


def test_placeholder_index_equals_image_token_index():
  rng = np.random.default_rng(3)
  tokens = layout(rng, 3, 12, 4, starts=(1, 3, 8))
  np.testing.assert_array_equal(vlm.placeholder_index(jnp.asarray(tokens), IMAGE_ID),
                                vlm_layout.image_token_index(tokens, IMAGE_ID, 12))


def test_insert_image_tokens_and_check_layout():
  cfg, _ = hf_vlm()
  M = vlm.tokens_per_image(cfg)
  tokens = np.array([[1, 7, 8, 2], [1, 9, 2, 0]])
  laid = np.asarray(vlm.insert_image_tokens(tokens, IMAGE_ID, M))
  np.testing.assert_array_equal(laid[:, 0], [1, 1])
  np.testing.assert_array_equal(laid[:, 1:1 + M], IMAGE_ID)
  np.testing.assert_array_equal(laid[:, 1 + M:], tokens[:, 1:])
  vlm.check_layout(cfg, laid)
  short = laid.copy()
  short[1, 3] = 7
  with pytest.raises(ValueError, match=f'expected {M} per image'):
    vlm.check_layout(cfg, short)


@pytest.mark.parametrize('arch', [GPT2, LLAMA], ids=['gpt2', 'llama'])
def test_embeds_path_equals_token_path(arch):
  cfg = ml_collections.FrozenConfigDict(arch)
  params = draw_params(transformer.param_specs(cfg), 0)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9)))
  embeds = transformer.embed_tokens(params, tokens)
  np.testing.assert_array_equal(embeds, np.asarray(params['embed']['tokens'])[np.asarray(tokens)])

  @jit
  def both(params, tokens, embeds):
    return [(transformer.forward_hidden(cfg, params, t, embeds_BTD=e)[0],
             transformer.prefill(cfg, params, t, 12, embeds_BTD=e))
            for t, e in ((None, embeds), (tokens, None))]

  (hidden_e, (logits_e, cache_e)), (hidden_t, (logits_t, cache_t)) = both(params, tokens, embeds)
  for got, want in ((hidden_e, hidden_t), (logits_e, logits_t), (cache_e['k'], cache_t['k']),
                    (cache_e['v'], cache_t['v'])):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert int(cache_e['length']) == 9
  with pytest.raises(ValueError, match='exactly one of tokens_BT and embeds_BTD, got both'):
    transformer.forward_hidden(cfg, params, tokens, embeds_BTD=embeds)
  with pytest.raises(ValueError, match='got neither'):
    transformer.prefill(cfg, params, None, 12)


def _small_cfg(connector='resampler', **changes):
  vision = dict(image_size=8, channels=3, patch_size=2, d_model=8, n_layers=1, n_heads=2,
                mlp_dim=16, class_token=False, pos_embed='sincos', mlp_activation='gelu',
                norm_eps=1e-6, dropout=0.0, drop_path=0.0)
  cfg = vlm_config(vision, GPT2, connector, n_queries=4, n_heads=2).as_configdict()
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = cfg
    for name in parents:
      node = node[name]
    node[leaf] = value
  return ml_collections.FrozenConfigDict(cfg)


@pytest.mark.parametrize('key, value, match', [
    ('vision.image_size', 8, 'model.vision.image_size is set by the VLM'),
    ('llm.max_len', 5, 'model.llm.max_len=5 leaves no room'),
    ('connector.connector', 'qformer', "model.connector: model.connector='qformer'"),
    ('llm.n_heads', 3, 'model.llm: model.n_heads=3 does not divide'),
    ('image_token_id', 40, 'model.image_token_id=40'),
])
def test_config_errors(key, value, match):
  with pytest.raises(ConfigError, match=match):
    vlm.validate(_small_cfg(**{key: value}))


def test_wrong_image_size_is_an_error():
  cfg = _small_cfg()
  tokens = vlm.insert_image_tokens(jnp.ones((1, 3), jnp.int32), IMAGE_ID, 4)
  with pytest.raises(ValueError, match=r'expected \[tiles, 16, 8\]'):
    jax.eval_shape(lambda p: vlm.forward(cfg, p, jnp.zeros((1, 12, 12, 3)), tokens),
                   ps.shapes(vlm.param_specs(cfg)))


def test_gradients_reach_the_connector_through_the_placeholders():
  """The merge's VJP is a gather: dL/dy_BMD equals the decoder's dL/de_BTD at the placeholder
  positions (row b's to image b, in order)."""
  cfg = _small_cfg()
  params = draw_params(vlm.param_specs(cfg), 1)
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  tokens = jnp.asarray(layout(rng, 2, 9, 4, starts=(1, 2)))
  w_BTV = jnp.asarray(rng.standard_normal((2, 9, GPT2['vocab_size'])), jnp.float32)
  lcfg = vlm.llm_config(cfg)

  @jit
  def grads(params):
    decoder_loss = lambda e_BTD: (transformer.unembed(lcfg, params['llm'], transformer.
                                                      forward_hidden(lcfg, params['llm'], None,
                                                                     embeds_BTD=e_BTD)[0])
                                  * w_BTV).sum()
    text_BTD = transformer.embed_tokens(params['llm'], tokens)
    index_BT = vlm.placeholder_index(tokens, IMAGE_ID)
    merged = lambda y: vlm_layout.merge_image_embeddings(text_BTD, y, index_BT)
    y_BMD = vlm.image_embeddings(cfg, params, images)
    return jax.grad(lambda y: decoder_loss(merged(y)))(y_BMD), jax.grad(decoder_loss)(merged(y_BMD))

  g_y, g_e = (np.asarray(g) for g in grads(params))
  np.testing.assert_allclose(g_y, g_e[np.asarray(tokens) == IMAGE_ID].reshape(g_y.shape),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(g_y).min() > 0
