"""Dual image-text encoders: CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision", arXiv:2103.00020) and SigLIP (Zhai, Mustafa, Kolesnikov & Beyer
2023, "Sigmoid Loss for Language Image Pre-Training", arXiv:2303.15343).

  img_BJ = g_I(ViT(x))            the image tower (lab.models.vit) pooled, then an optional head
  txt_BJ = g_T(pool(LN(Enc(W_tok[t] + W_pos))))   the text tower (lab.nn.transformer_encoder)
Both land in one embedding space of width J; the losses (lab.objectives.contrastive_losses)
L2-normalise them. The flavour fixes the text tower and the heads:
  'clip'    causal text attention (CLIP sec. 2.4, as GPT-2); linear heads without bias; CLIP's
            image tower also LayerNorms the embedded tokens before the first block
            (image.pre_norm, OpenAI's ln_pre, Hugging Face's pre_layrnorm).
  'siglip'  bidirectional text attention; linear heads with bias (big_vision's Dense); SigLIP's
            image tower has no class token and MAP pooling, and no image head
            (big_vision's out_dim = (None, J): the pooled features are the embedding).
Text pooling (text.pooling) of the final-normed tokens h_BTD:
  'eos'     h at the first position holding text.eos_id (Hugging Face CLIP, eos_token_id != 2),
  'max_id'  h at the position of the highest token id (OpenAI CLIP's text.argmax(-1): its <eot>
            token has the largest id; Hugging Face CLIP with the legacy eos_token_id == 2),
  'last'    h at position T - 1 (SigLIP, Hugging Face's SiglipTextModel), which may be padding.
Padding is masked through segment ids: with mask_BT given, every query sees only the keys where
mask = 1 (Hugging Face's attention_mask), so a padding query still reads the text; without it
every token sees every token (SigLIP's default, max_length padding without a mask). A sequence
without <eos> pools position 0 under 'eos' (as Hugging Face's argmax does).

Initialisation: token embeddings normal(0.02), text positions normal(0.01) (OpenAI CLIP), heads
normal(1 / sqrt(D)) with zero bias; the image tower as lab.models.vit. Our ViT's patch embedding
carries a bias, which CLIP's conv1 lacks (lab.models.clip_hf loads it as zero).

Config fields (`cfg` is `config.model`): name ('clip'), flavour, embed_dim (J), image_head (bool:
a linear image head to J; False needs embed_dim == image.d_model), image_size, channels,
vocab_size (the data fills these three), attention_backend, and
  image: IMAGE_FIELDS, lab.models.vit's fields without image_size, channels, num_classes and
         attention_backend (taken from above), plus pre_norm;
  text: TEXT_FIELDS (max_len: learned positions; eos_id: for 'eos' pooling).
Letters beyond DESIGN.md's: J the shared embedding width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from lab.config import ConfigError, require
from lab.kernels import available_backends
from lab.models import vit
from lab.nn import norms
from lab.nn import param_spec as ps
from lab.nn import transformer_encoder as te
from lab.nn.dropout import dropout
from lab.parallel.rules import constrain

FLAVOURS = ('clip', 'siglip')
TEXT_POOLINGS = ('eos', 'max_id', 'last')
FIELDS = ('flavour', 'embed_dim', 'image_head', 'image_size', 'channels', 'vocab_size',
          'attention_backend', 'image', 'text')
_FROM_TOP = ('image_size', 'channels', 'attention_backend')
IMAGE_FIELDS = tuple(k for k in vit.FIELDS if k not in _FROM_TOP + ('num_classes',)) + (
    'pre_norm',)
TEXT_FIELDS = ('max_len', 'd_model', 'n_layers', 'n_heads', 'mlp_dim', 'mlp_activation',
               'norm_eps', 'dropout', 'pooling', 'eos_id')


def _exact_fields(node, fields, where: str) -> None:
  missing = [k for k in fields if k not in node]
  extra = sorted(set(node) - set(fields))
  require(not missing and not extra, f'{where} lacks fields {missing} and has unknown fields '
          f'{extra}; expected exactly {list(fields)}')


def image_config(cfg) -> ml_collections.ConfigDict:
  """The lab.models.vit config of the image tower: model.image's ViT fields with image_size,
  channels and attention_backend from the model, and num_classes = 0 (pooled features)."""
  fields = {k: cfg.image[k] for k in IMAGE_FIELDS if k != 'pre_norm'}
  return ml_collections.ConfigDict(dict(fields, num_classes=0,
                                        **{k: cfg[k] for k in _FROM_TOP}))


def text_options(cfg) -> te.Options:
  """The text blocks' options: causal for 'clip', bidirectional for 'siglip'."""
  t = cfg.text
  return te.Options(causal=cfg.flavour == 'clip', activation=t.mlp_activation,
                    norm_eps=t.norm_eps, dropout=t.dropout,
                    attention_backend=cfg.attention_backend)


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network, before any device work."""
  _exact_fields(cfg, FIELDS + ('name',) if 'name' in cfg else FIELDS, 'model')
  require(cfg.flavour in FLAVOURS, f'model.flavour={cfg.flavour!r}; expected one of {FLAVOURS}')
  require(cfg.embed_dim > 0, f'model.embed_dim={cfg.embed_dim}; expected a positive integer')
  require(isinstance(cfg.image_head, bool), f'model.image_head={cfg.image_head!r}; expected a bool')
  require(cfg.vocab_size > 0, f'model.vocab_size={cfg.vocab_size}; expected a positive integer '
          '(0 is filled by the data)')
  require(cfg.attention_backend in available_backends(), f'model.attention_backend='
          f'{cfg.attention_backend!r}; expected one of {available_backends()}')
  _exact_fields(cfg.image, IMAGE_FIELDS, 'model.image')
  require(isinstance(cfg.image.pre_norm, bool),
          f'model.image.pre_norm={cfg.image.pre_norm!r}; expected a bool')
  try:
    vit.validate(image_config(cfg))
  except ConfigError as e:
    raise ConfigError(f'model.image (a lab.models.vit config): {e}') from None
  require(cfg.image_head or cfg.embed_dim == cfg.image.d_model,
          f'model.embed_dim={cfg.embed_dim} with model.image_head=False; expected the image '
          f'features width model.image.d_model={cfg.image.d_model}')
  t = cfg.text
  _exact_fields(t, TEXT_FIELDS, 'model.text')
  for key in ('max_len', 'd_model', 'n_layers', 'n_heads', 'mlp_dim'):
    require(t[key] > 0, f'model.text.{key}={t[key]}; expected a positive integer')
  require(t.d_model % t.n_heads == 0,
          f'model.text.n_heads={t.n_heads} does not divide model.text.d_model={t.d_model}')
  require(t.mlp_activation in te.ACTIVATIONS, f'model.text.mlp_activation={t.mlp_activation!r}; '
          f'expected one of {tuple(te.ACTIVATIONS)}')
  require(t.norm_eps > 0, f'model.text.norm_eps={t.norm_eps}; expected > 0')
  require(0.0 <= t.dropout < 1.0, f'model.text.dropout={t.dropout}; expected a value in [0, 1)')
  require(t.pooling in TEXT_POOLINGS,
          f'model.text.pooling={t.pooling!r}; expected one of {TEXT_POOLINGS}')
  require(0 <= t.eos_id < cfg.vocab_size,
          f'model.text.eos_id={t.eos_id}; expected a token id in [0, {cfg.vocab_size})')


def _head_specs(d_in: int, d_out: int, bias: bool) -> dict:
  specs = {'w': ps.ParamSpec((d_in, d_out), ps.normal(d_in ** -0.5), ('embed', None))}
  if bias:
    specs['b'] = ps.ParamSpec((d_out,), ps.zeros, (None,))
  return specs


def param_specs(cfg) -> dict:
  """ParamSpecs: image (the ViT's, plus pre_norm when image.pre_norm), image_head (w_DJ [+ b_J];
  image_head only), text (embed_VD, pos_embed_TD with T = max_len, encoder, final_norm) and
  text_head (w_DJ [+ b_J]); biases in the 'siglip' flavour."""
  validate(cfg)
  t, bias = cfg.text, cfg.flavour == 'siglip'
  image = vit.param_specs(image_config(cfg))
  if cfg.image.pre_norm:
    image['pre_norm'] = te.norm_specs(cfg.image.d_model)
  specs = {
      'image': image,
      'text': {'embed': ps.ParamSpec((cfg.vocab_size, t.d_model), ps.normal(0.02),
                                     ('vocab', 'embed')),
               'pos_embed': ps.ParamSpec((t.max_len, t.d_model), ps.normal(0.01),
                                         (None, 'embed')),
               'encoder': te.stack_specs(t.n_layers, t.d_model, t.n_heads, t.mlp_dim),
               'final_norm': te.norm_specs(t.d_model)},
      'text_head': _head_specs(t.d_model, cfg.embed_dim, bias)}
  if cfg.image_head:
    specs['image_head'] = _head_specs(cfg.image.d_model, cfg.embed_dim, bias)
  return specs


def _head(p: dict, z_BD: jax.Array) -> jax.Array:
  """y_BJ = z W (+ b)."""
  y_BJ = jnp.einsum('BD,DJ->BJ', z_BD, p['w'])
  return y_BJ + p['b'] if 'b' in p else y_BJ


def image_tokens(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
                 rng: jax.Array | None = None) -> jax.Array:
  """h_BTD: the image tower's final-normed tokens (ViT eqs. 1-4, class token first when it has
  one); with image.pre_norm, z_0 <- LN_pre(z_0) before the first block (CLIP's ln_pre).
  params: the image tower (param_specs' 'image')."""
  icfg = image_config(cfg)
  x_BTD = vit.patch_tokens(icfg, params, images_BXYC)
  if icfg.class_token:
    x_BTD = vit.with_cls(icfg, params, x_BTD)
  if cfg.image.pre_norm:
    x_BTD = norms.layer_norm(x_BTD, params['pre_norm']['scale'], params['pre_norm']['bias'],
                             icfg.norm_eps)
  return vit.encode(icfg, params, x_BTD, train=train, rng=rng)


def image_features(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
                   rng: jax.Array | None = None) -> jax.Array:
  """z_BD: image_tokens pooled as image.pooling ('cls' | 'gap' | 'map', lab.models.vit.pool)."""
  h_BTD = image_tokens(cfg, params, images_BXYC, train=train, rng=rng)
  return vit.pool(image_config(cfg), params, h_BTD)


def encode_image(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
                 rng: jax.Array | None = None) -> jax.Array:
  """img_BJ = z W_I (+ b_I) with the image head, else the pooled features z_BD (J = D)."""
  z_BD = image_features(cfg, params['image'], images_BXYC, train=train, rng=rng)
  return _head(params['image_head'], z_BD) if cfg.image_head else z_BD


def pool_positions(cfg, tokens_BT: jax.Array) -> jax.Array:
  """idx_B, the position text.pooling reads: first eos_id ('eos'), first highest id
  ('max_id') or T - 1 ('last')."""
  t = cfg.text
  if t.pooling == 'eos':
    return jnp.argmax(tokens_BT == t.eos_id, axis=1)
  if t.pooling == 'max_id':
    return jnp.argmax(tokens_BT, axis=1)
  return jnp.full(tokens_BT.shape[:1], tokens_BT.shape[1] - 1)


def text_tokens(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array | None = None, *,
                train: bool = False, rng: jax.Array | None = None) -> jax.Array:
  """h_BTD = LN(Enc(W_tok[t] + W_pos[:T])) of the text tower (params: param_specs' 'text'),
  causal in the 'clip' flavour; with mask_BT, keys where mask = 0 are hidden from every query
  (segment ids q = 1, kv = mask). Dropout after the embeddings and in the blocks when train."""
  t = cfg.text
  B, T = tokens_BT.shape
  if T > t.max_len:
    raise ValueError(f'text of {T} tokens; expected at most model.text.max_len={t.max_len}')
  if mask_BT is not None and mask_BT.shape != tokens_BT.shape:
    raise ValueError(f'mask_BT of shape {mask_BT.shape}; expected the tokens\' {(B, T)}')
  if train and rng is None and t.dropout:
    raise ValueError(f'train=True with model.text.dropout={t.dropout} needs an rng')
  embed_rng, block_rng = (None, None) if not train or rng is None else jax.random.split(rng)
  table_VD = constrain(params['embed'], (None, 'act_embed'))  # gather from a whole vocab dim
  x_BTD = table_VD[tokens_BT] + params['pos_embed'][:T]
  x_BTD = dropout(x_BTD, t.dropout, embed_rng)
  segment_ids = None if mask_BT is None else (jnp.ones_like(mask_BT), mask_BT)
  x_BTD = te.encoder(params['encoder'], x_BTD, text_options(cfg), segment_ids=segment_ids,
                     rng=block_rng)
  f = params['final_norm']
  return norms.layer_norm(x_BTD, f['scale'], f['bias'], t.norm_eps)


def encode_text(cfg, params, tokens_BT: jax.Array, mask_BT: jax.Array | None = None, *,
                train: bool = False, rng: jax.Array | None = None) -> jax.Array:
  """txt_BJ = h[b, idx_b] W_T (+ b_T): text_tokens pooled at pool_positions, then the head."""
  h_BTD = text_tokens(cfg, params['text'], tokens_BT, mask_BT, train=train, rng=rng)
  idx_B = pool_positions(cfg, tokens_BT)
  return _head(params['text_head'], jnp.take_along_axis(h_BTD, idx_B[:, None, None], 1)[:, 0])


def forward(cfg, params, images_BXYC: jax.Array, tokens_BT: jax.Array,
            mask_BT: jax.Array | None = None, *, train: bool = False,
            rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(img_BJ, txt_BJ) = (encode_image, encode_text), unnormalised; rng (split between the
  towers) drives dropout and stochastic depth when train."""
  image_rng, text_rng = (None, None) if rng is None else jax.random.split(rng)
  return (encode_image(cfg, params, images_BXYC, train=train, rng=image_rng),
          encode_text(cfg, params, tokens_BT, mask_BT, train=train, rng=text_rng))
