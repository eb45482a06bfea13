"""BLIP's multimodal mixture of encoder-decoder, MED (Li, Li, Xiong & Hoi 2022, "BLIP:
Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding and
Generation", arXiv:2201.12086, sec. 3.1, fig. 2).

  image encoder    a ViT with a class token (lab.models.vit); img_BSW are its final-normed
                   tokens, img_BSW[:, 0] the global image feature.
  text transformer BERT's post-LN blocks (Devlin et al. 2019, arXiv:1810.04805) in three modes
                   over one set of parameters; the first token of every text (the data's <bos>)
                   is replaced by the mode's learned token:
    'text'  unimodal text encoder: [CLS], bidirectional self-attention (SA), no cross-attention;
    'itm'   image-grounded text encoder: [Encode], bidirectional SA, then cross-attention (CA) to
            img_BSW in every block, between SA and the FFN;
    'lm'    image-grounded text decoder: [Decode], causal SA, CA as in 'itm'.
  A block, with BERT's (and BLIP's med.py) residual-then-LayerNorm placement:
    x = LN(x + SA(x));   x = LN(x + CA(x, img))  ('itm', 'lm');   x = LN(x + FFN(x))
  Embeddings: e = LN(E_tok[x] + E_pos); FFN(u) = GELU(u W_in + b_in) W_out + b_out (exact GELU).

Sharing (sec. 3.1: "the text encoder and text decoder share all parameters except for the SA
layers"): the embeddings, CA and FFN layers (each with its LayerNorm) are one set; 'text' and
'itm' run sa_encoder, 'lm' runs sa_decoder (an SA layer with its output projection and
LayerNorm, as BLIP ties everything but '/attention'). The unimodal encoder is the grounded
encoder without its CA. Heads: vision_proj and text_proj map the two class-token outputs to the
J-dim ITC space; itm_head (2-way, on the [Encode] output; index 1 = matched); lm_head, BERT's
prediction head (dense, GELU, LN, then the transposed token embeddings plus a bias: the output
layer tied to the input embeddings); temp, the ITC temperature (0.07 at init, used clamped to
[0.001, 0.5] as BLIP clamps it). Embeddings are N(0, 0.02^2) as BERT's; every matrix is normal
with Glorot's variance 2 / (fan_in + fan_out), lab's ViT init, rather than BERT's fixed 0.02,
which suits width 768 but leaves a width-64 model's attention uniform at init; zero biases, unit
LayerNorm scales, LayerNorm eps 1e-12 in the text transformer. No dropout (a toy-scale choice).

Config fields (`cfg` is `config.model`): image_size, channels, vocab_size, max_len (text
positions), embed_dim (J), attention_backend, vision {patch_size, d_model, n_layers, n_heads,
mlp_dim}, text {d_model, n_layers, n_heads, mlp_dim}.
Letters beyond DESIGN.md's: W the image tokens' width (the ViT's d_model), J the ITC embedding
width, L text layers.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from lab.config import require
from lab.kernels import available_backends, flash_attention
from lab.models import vit
from lab.nn import attention, norms
from lab.nn import param_spec as ps
from lab.nn import transformer_encoder as te
from lab.nn.cross_attention import cross_attention, cross_attention_specs
from lab.objectives.contrastive_losses import l2_normalize
from lab.sampling import logits_filters

FIELDS = ('image_size', 'channels', 'vocab_size', 'max_len', 'embed_dim', 'attention_backend',
          'vision', 'text')
VISION_FIELDS = ('patch_size', 'd_model', 'n_layers', 'n_heads', 'mlp_dim')
TEXT_FIELDS = ('d_model', 'n_layers', 'n_heads', 'mlp_dim')
MODES = {'text': 'cls', 'itm': 'enc', 'lm': 'dec'}  # mode -> its first-token embedding
EMBED_STD = 0.02  # BERT's initializer_range, for the embeddings
BERT_LN_EPS = 1e-12
TEMP_INIT, TEMP_MIN, TEMP_MAX = 0.07, 0.001, 0.5


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network, before any device work."""
  missing = [key for key in FIELDS if key not in cfg]
  require(not missing, f'model lacks fields {missing}; BLIP needs {list(FIELDS)}')
  for group, fields in (('vision', VISION_FIELDS), ('text', TEXT_FIELDS)):
    lacking = [key for key in fields if key not in cfg[group]]
    require(not lacking, f'model.{group} lacks fields {lacking}; expected {list(fields)}')
    for key in fields:
      require(cfg[group][key] > 0, f'model.{group}.{key}={cfg[group][key]}; expected a positive '
                                   'integer')
    require(cfg[group].d_model % cfg[group].n_heads == 0, f'model.{group}.n_heads='
            f'{cfg[group].n_heads} does not divide model.{group}.d_model={cfg[group].d_model}')
  for key in ('image_size', 'channels', 'vocab_size', 'max_len', 'embed_dim'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  require(cfg.image_size % cfg.vision.patch_size == 0, f'model.vision.patch_size='
          f'{cfg.vision.patch_size} does not divide model.image_size={cfg.image_size}')
  require(cfg.attention_backend in available_backends(), f'model.attention_backend='
          f'{cfg.attention_backend!r}; expected one of {available_backends()}')


def vision_cfg(cfg) -> ml_collections.ConfigDict:
  """The ViT's config: BLIP's image encoder (class token, learned positions, exact GELU, LN eps
  1e-6, no classifier) at the sizes of cfg.vision."""
  v = cfg.vision
  return ml_collections.ConfigDict(dict(
      image_size=cfg.image_size, patch_size=v.patch_size, channels=cfg.channels,
      d_model=v.d_model, n_layers=v.n_layers, n_heads=v.n_heads, mlp_dim=v.mlp_dim,
      pooling='cls', class_token=True, pos_embed='learned', num_classes=0,
      attention_backend=cfg.attention_backend, mlp_activation='gelu', norm_eps=1e-6,
      dropout=0.0, drop_path=0.0))


def _embedding(shape, axes) -> ps.ParamSpec:
  return ps.ParamSpec(shape, ps.normal(EMBED_STD), axes)


def _dense(d_in: int, d_out: int) -> dict:
  """w_DJ (Glorot-variance normal) and b_J (zeros) of a linear layer."""
  return {'w': ps.ParamSpec((d_in, d_out), ps.normal(math.sqrt(2.0 / (d_in + d_out))),
                            ('embed', None)),
          'b': ps.ParamSpec((d_out,), ps.zeros, (None,))}


def _layer_specs(cfg) -> dict:
  """One text block's parameters by role: sa_encoder, sa_decoder ({attn, norm} each), cross
  ({attn, norm}) and ffn ({mlp, norm})."""
  t, W = cfg.text, cfg.vision.d_model
  D, N = t.d_model, t.n_heads
  sa = lambda: {'attn': attention.attention_specs(D, N, N, D // N, bias=True, std=D ** -0.5,
                                                  out_std=D ** -0.5), 'norm': te.norm_specs(D)}
  return {'sa_encoder': sa(), 'sa_decoder': sa(),
          'cross': {'attn': cross_attention_specs(D, W, N), 'norm': te.norm_specs(D)},
          'ffn': {'mlp': te.mlp_specs(D, t.mlp_dim), 'norm': te.norm_specs(D)}}


def param_specs(cfg) -> dict:
  """ParamSpecs: vision (the ViT's), text {embed {tokens_VD, pos_TD, cls_D, enc_D, dec_D, norm},
  sa_encoder, sa_decoder, cross, ffn (each stacked on a leading L axis)}, lm_head {w_DD, b_D,
  norm, bias_V}, vision_proj {w_WJ, b_J}, text_proj {w_DJ, b_J}, itm_head {w_D2, b_2}, temp."""
  validate(cfg)
  D, W, J, V = cfg.text.d_model, cfg.vision.d_model, cfg.embed_dim, cfg.vocab_size
  embed = {'tokens': _embedding((V, D), ('vocab', 'embed')),
           'pos': _embedding((cfg.max_len, D), (None, 'embed')), 'norm': te.norm_specs(D)}
  embed |= {name: _embedding((D,), ('embed',)) for name in MODES.values()}
  layers = jax.tree.map(lambda s: ps.stack(s, cfg.text.n_layers), _layer_specs(cfg),
                        is_leaf=ps.is_spec)
  return {'vision': vit.param_specs(vision_cfg(cfg)),
          'text': {'embed': embed, **layers},
          'lm_head': {**_dense(D, D), 'norm': te.norm_specs(D),
                      'bias': ps.ParamSpec((V,), ps.zeros, ('vocab',))},
          'vision_proj': _dense(W, J), 'text_proj': _dense(D, J), 'itm_head': _dense(D, 2),
          'temp': ps.ParamSpec((), lambda key, shape, dtype: jnp.full(shape, TEMP_INIT, dtype),
                               ())}


def temperature(params) -> jax.Array:
  """The ITC temperature clamped to [0.001, 0.5] in the forward pass, with the identity as its
  gradient (straight-through; BLIP clamps the parameter in place instead, which lab's params,
  moved only by the optimizer, cannot do)."""
  t = params['temp']
  return t + jax.lax.stop_gradient(jnp.clip(t, TEMP_MIN, TEMP_MAX) - t)


def encode_image(cfg, params, images_BXYC: jax.Array) -> jax.Array:
  """img_BSW: the ViT's final-normed tokens (S = 1 + P, the class token first)."""
  vcfg = vision_cfg(cfg)
  p = params['vision']
  return vit.encode(vcfg, p, vit.with_cls(vcfg, p, vit.patch_tokens(vcfg, p, images_BXYC)))


def _post_norm(p: dict, x_BTD: jax.Array, y_BTD: jax.Array) -> jax.Array:
  """LN(x + y): BERT's residual-then-LayerNorm."""
  return norms.layer_norm(x_BTD + y_BTD, p['scale'], p['bias'], BERT_LN_EPS)


def embed_text(cfg, params, tokens_BT: jax.Array, mode: str) -> jax.Array:
  """x_BTD = LN(E_tok[x] + E_pos[:T]) with position 0's token embedding replaced by the mode's
  [CLS] / [Encode] / [Decode] vector."""
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; expected one of {tuple(MODES)}')
  B, T = tokens_BT.shape
  if not 1 <= T <= cfg.max_len:
    raise ValueError(f'texts of {T} tokens; expected 1..{cfg.max_len} (model.max_len)')
  e = params['text']['embed']
  first_B1D = jnp.broadcast_to(e[MODES[mode]], (B, 1, cfg.text.d_model))
  x_BTD = jnp.concatenate([first_B1D, jnp.take(e['tokens'], tokens_BT[:, 1:], axis=0)], axis=1)
  return norms.layer_norm(x_BTD + e['pos'][:T], e['norm']['scale'], e['norm']['bias'],
                          BERT_LN_EPS)


def text_block(cfg, layer: dict, x_BTD: jax.Array, mask_BT: jax.Array, *, causal: bool,
               img_BSW: jax.Array | None) -> jax.Array:
  """One block (module docstring) -> x_BTD. layer: {sa, ffn} and, with img_BSW, cross. Keys
  where mask_BT is 0 (padding) are hidden from the other tokens' self-attention."""
  a = layer['sa']['attn']
  q_BTNH, k_BTNH, v_BTNH = attention.project_qkv(a, x_BTD)
  o_BTNH = flash_attention(q_BTNH, k_BTNH, v_BTNH, causal=causal, segment_ids=mask_BT,
                           backend=cfg.attention_backend)
  x_BTD = _post_norm(layer['sa']['norm'], x_BTD, attention.project_out(a, o_BTNH))
  if img_BSW is not None:
    c = layer['cross']
    x_BTD = _post_norm(c['norm'], x_BTD, cross_attention(c['attn'], x_BTD, img_BSW,
                                                         backend=cfg.attention_backend))
  f = layer['ffn']
  return _post_norm(f['norm'], x_BTD, te.mlp(f['mlp'], x_BTD, 'gelu'))


def text_hidden(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array, mode: str,
                img_BSW: jax.Array | None = None) -> jax.Array:
  """h_BTD of the text transformer in `mode` ('text' | 'itm' | 'lm'); 'itm' and 'lm' need the
  image tokens img_BSW, 'text' takes none. mask_BT: 1 on text tokens, 0 on padding."""
  if (mode == 'text') != (img_BSW is None):
    raise ValueError(f"mode={mode!r} with img_BSW={'None' if img_BSW is None else 'given'}; "
                     "expected image tokens for 'itm' and 'lm' and none for 'text'")
  if mask_BT.shape != tokens_BT.shape:
    raise ValueError(f'mask of shape {mask_BT.shape}; expected the tokens\' {tokens_BT.shape}')
  p = params['text']
  layers = {'sa': p['sa_decoder' if mode == 'lm' else 'sa_encoder'], 'ffn': p['ffn']}
  if img_BSW is not None:
    layers['cross'] = p['cross']

  def body(x_BTD, layer):
    return text_block(cfg, layer, x_BTD, mask_BT.astype(jnp.int32), causal=mode == 'lm',
                      img_BSW=img_BSW), None

  x_BTD, _ = jax.lax.scan(body, embed_text(cfg, params, tokens_BT, mode), layers)
  return x_BTD


def _project(p: dict, x_BD: jax.Array) -> jax.Array:
  return jnp.einsum('BD,DJ->BJ', x_BD, p['w']) + p['b']


def image_features(cfg, params, img_BSW: jax.Array) -> jax.Array:
  """f_BJ = normalise(vision_proj(img_BSW[:, 0])): the image's ITC embedding."""
  del cfg
  return l2_normalize(_project(params['vision_proj'], img_BSW[:, 0]))


def text_features(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """g_BJ = normalise(text_proj(h_[CLS])) of the unimodal text encoder: the text's ITC embedding."""
  return l2_normalize(_project(params['text_proj'], text_hidden(cfg, params, tokens_BT, mask_BT,
                                                                'text')[:, 0]))


def itm_logits(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array,
               img_BSW: jax.Array) -> jax.Array:
  """logits_B2 = itm_head(h_[Encode]) of the image-grounded encoder; softmax index 1 is
  p(matched | image, text)."""
  h_BTD = text_hidden(cfg, params, tokens_BT, mask_BT, 'itm', img_BSW)
  return _project(params['itm_head'], h_BTD[:, 0])


def lm_logits(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array,
              img_BSW: jax.Array) -> jax.Array:
  """logits_BTV of the image-grounded decoder: row t predicts token t + 1,
  z = LN(GELU(h W + b)) E_tok^T + bias (BERT's prediction head, tied output layer)."""
  h_BTD = text_hidden(cfg, params, tokens_BT, mask_BT, 'lm', img_BSW)
  p = params['lm_head']
  u_BTD = jax.nn.gelu(h_BTD @ p['w'] + p['b'], approximate=False)
  u_BTD = norms.layer_norm(u_BTD, p['norm']['scale'], p['norm']['bias'], BERT_LN_EPS)
  return jnp.einsum('BTD,VD->BTV', u_BTD, params['text']['embed']['tokens']) + p['bias']


def caption(cfg, params, img_BSW: jax.Array, rng: jax.Array, *, length: int, bos_id: int,
            eos_id: int, pad_id: int, top_p: float = 0.9, temperature: float = 1.0):
  """(tokens_BT, mask_BT), T = length: <bos>, then tokens drawn one at a time from the decoder,
  x_t ~ softmax(filter(z_{t-1}) / temperature) (nucleus filter of lab.sampling.logits_filters,
  BLIP's captioner uses top_p = 0.9, sec. 3.3 and 4.5), <pad> after the first <eos>. mask_BT is
  1 up to and including the first <eos> (everywhere when none is drawn). The whole prefix is
  re-run at every step (no KV cache: the captions are short)."""
  if not 2 <= length <= cfg.max_len:
    raise ValueError(f'caption length={length}; expected 2..{cfg.max_len} (model.max_len)')
  B = img_BSW.shape[0]
  tokens_BT = jnp.full((B, length), pad_id, jnp.int32).at[:, 0].set(bos_id)
  ones_BT = jnp.ones((B, length), jnp.int32)

  def step(t, carry):
    tokens_BT, done_B = carry
    logits_BTV = lm_logits(cfg, params, tokens_BT, ones_BT, img_BSW)
    logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, t - 1, axis=1, keepdims=False)
    next_B = logits_filters.choose(logits_BV, jax.random.fold_in(rng, t),
                                   temperature=temperature, top_p=top_p)
    next_B = jnp.where(done_B, pad_id, next_B)
    return tokens_BT.at[:, t].set(next_B), done_B | (next_B == eos_id)

  tokens_BT, _ = jax.lax.fori_loop(1, length, step, (tokens_BT, jnp.zeros(B, bool)))
  is_eos_BT = tokens_BT == eos_id
  last_B = jnp.where(is_eos_BT.any(1), jnp.argmax(is_eos_BT, axis=1), length - 1)
  mask_BT = (jnp.arange(length)[None] <= last_B[:, None]).astype(jnp.int32)
  return tokens_BT, mask_BT

