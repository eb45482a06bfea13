"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", arXiv:2010.11929)
over channels-last images x_BXYC.

  z_0 = [x_class; x_p^1 E; ...; x_p^P E] + E_pos                       (eq. 1)
  z_l = z_{l-1} + MSA(LN(z_{l-1}));  z_l = z_l + MLP(LN(z_l))            (eqs. 2-3)
  y = LN(z_L), then pooled and (optionally) classified                  (eq. 4)
The patch embedding E is a linear map of flattened p x p x C patches (lab.nn.patches.patchify),
the same as a stride-p convolution with a p x p kernel, whose layout its weight w_XYCO keeps.
Positions: learned (the paper), or fixed 2-D sin-cos (MAE, He et al. 2021; MoCo v3, Chen et al.
2021), under which a class token gets the zero position. Images of another size than image_size
get their learned patch positions resized bicubically (lab.nn.patches.interpolate_pos_embed; the
class-token row is kept) or sin-cos positions of the new grid. Dropout follows the embeddings
and every dense layer but the qkv projections (appendix B.1); stochastic depth as in
lab.nn.transformer_encoder.

Pooling of the final-normed tokens h_BTD: 'cls' (the class token, eq. 4), 'gap' (the mean of the
patch tokens), 'map' (multihead attention pooling: one learned probe attends to all tokens, then
a residual MLP, as big_vision's MAPHead in SigLIP, Zhai et al. 2023, and Lee et al. 2019's PMA).
The head is one linear layer to num_classes logits, zero-initialised as in big_vision (the
fine-tuning head of sec. 3.2; the pre-training MLP head with a tanh layer is not built);
num_classes=0 returns the pooled features. Initialisation as big_vision: LeCun-normal patch
embedding, zero class token, normal(1/sqrt(D)) learned positions.

The pieces compose for other methods (MAE runs `encode` on a subset of patch tokens):
  patch_tokens -> x_BPD;  with_cls -> x_BTD;  encode -> h_BTD;  pool -> z_BD;  forward.
Config fields (`cfg` is `config.model`, all required): image_size, patch_size, channels, d_model,
n_layers, n_heads, mlp_dim, pooling ('cls' | 'gap' | 'map'), class_token (bool), pos_embed
('learned' | 'sincos'), num_classes (0: none), attention_backend, mlp_activation ('gelu' |
'gelu_tanh' | 'quick_gelu'), norm_eps, dropout, drop_path.
Letters beyond DESIGN.md's: V classes (logits_BV).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.kernels import available_backends, flash_attention
from lab.nn import attention, conv, norms
from lab.nn import param_spec as ps
from lab.nn import transformer_encoder as te
from lab.nn.dropout import dropout
from lab.nn.patches import interpolate_pos_embed, patchify, pos_embed

FIELDS = ('image_size', 'patch_size', 'channels', 'd_model', 'n_layers', 'n_heads', 'mlp_dim',
          'pooling', 'class_token', 'pos_embed', 'num_classes', 'attention_backend',
          'mlp_activation', 'norm_eps', 'dropout', 'drop_path')
POOLINGS = ('cls', 'gap', 'map')
POS_EMBEDS = ('learned', 'sincos')


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network, before any device work."""
  missing = [key for key in FIELDS if key not in cfg]
  require(not missing, f'model lacks fields {missing}; a ViT needs {list(FIELDS)}')
  for key in ('image_size', 'patch_size', 'channels', 'd_model', 'n_layers', 'n_heads',
              'mlp_dim'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  require(cfg.image_size % cfg.patch_size == 0, f'model.patch_size={cfg.patch_size} does not '
          f'divide model.image_size={cfg.image_size}')
  require(cfg.d_model % cfg.n_heads == 0,
          f'model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}')
  require(cfg.pooling in POOLINGS, f'model.pooling={cfg.pooling!r}; expected one of {POOLINGS}')
  require(isinstance(cfg.class_token, bool),
          f'model.class_token={cfg.class_token!r}; expected a bool')
  require(cfg.pooling != 'cls' or cfg.class_token,
          "model.pooling='cls' needs model.class_token=True")
  require(cfg.pos_embed in POS_EMBEDS,
          f'model.pos_embed={cfg.pos_embed!r}; expected one of {POS_EMBEDS}')
  require(cfg.pos_embed != 'sincos' or cfg.d_model % 4 == 0, f'model.d_model={cfg.d_model}; '
          "expected a multiple of 4 for model.pos_embed='sincos'")
  require(cfg.num_classes >= 0, f'model.num_classes={cfg.num_classes}; expected >= 0')
  require(cfg.attention_backend in available_backends(), f'model.attention_backend='
          f'{cfg.attention_backend!r}; expected one of {available_backends()}')
  require(cfg.mlp_activation in te.ACTIVATIONS, f'model.mlp_activation={cfg.mlp_activation!r}; '
          f'expected one of {tuple(te.ACTIVATIONS)}')
  require(cfg.norm_eps > 0, f'model.norm_eps={cfg.norm_eps}; expected > 0')
  for key in ('dropout', 'drop_path'):
    require(0.0 <= cfg[key] < 1.0, f'model.{key}={cfg[key]}; expected a value in [0, 1)')


def grid(cfg) -> int:
  """Patches per side at the configured resolution."""
  return cfg.image_size // cfg.patch_size


def num_prefix(cfg) -> int:
  """Tokens in front of the patch tokens: 1 with a class token, else 0."""
  return int(cfg.class_token)


def feature_dim(cfg) -> int:
  """Width of the pooled features (forward's output when num_classes = 0)."""
  return cfg.d_model


def encoder_options(cfg) -> te.Options:
  """The encoder blocks' options from the config (bidirectional attention)."""
  return te.Options(causal=False, activation=cfg.mlp_activation, norm_eps=cfg.norm_eps,
                    dropout=cfg.dropout, drop_path=cfg.drop_path,
                    attention_backend=cfg.attention_backend)


def param_specs(cfg) -> dict:
  """ParamSpecs: patch (w_XYCO, b), cls_D, pos_embed_TD (learned only; T = prefix + P),
  encoder (stacked blocks), final_norm, map (probe, attention, norm, mlp; 'map' only) and
  head (w_DV, b_V; num_classes > 0 only)."""
  validate(cfg)
  D, p = cfg.d_model, cfg.patch_size
  specs = {'patch': conv.conv_specs(p, cfg.channels, D),
           'encoder': te.stack_specs(cfg.n_layers, D, cfg.n_heads, cfg.mlp_dim),
           'final_norm': te.norm_specs(D)}
  if cfg.class_token:
    specs['cls'] = ps.ParamSpec((D,), ps.zeros, ('embed',))
  if cfg.pos_embed == 'learned':
    specs['pos_embed'] = ps.ParamSpec((num_prefix(cfg) + grid(cfg) ** 2, D), ps.normal(D ** -0.5),
                                      (None, 'embed'))
  if cfg.pooling == 'map':
    block = te.block_specs(D, cfg.n_heads, cfg.mlp_dim)
    specs['map'] = {'probe': ps.ParamSpec((D,), ps.normal(D ** -0.5), ('embed',)),
                    'attn': block['attn'], 'norm': block['mlp_norm'], 'mlp': block['mlp']}
  if cfg.num_classes:
    specs['head'] = {'w': ps.ParamSpec((D, cfg.num_classes), ps.zeros, ('embed', 'vocab')),
                     'b': ps.ParamSpec((cfg.num_classes,), ps.zeros, ('vocab',))}
  return specs


def patch_positions(cfg, params, gx: int, gy: int) -> jax.Array:
  """pos_PD of a gx x gy patch grid (row-major): the learned patch rows, resized bicubically
  from the configured grid when it differs, or 2-D sin-cos positions of this grid."""
  if cfg.pos_embed == 'sincos':
    return jnp.asarray(pos_embed(gx, gy, cfg.d_model))
  g = grid(cfg)
  return interpolate_pos_embed(params['pos_embed'][num_prefix(cfg):], (g, g), (gx, gy), 0)


def patch_tokens(cfg, params, images_BXYC: jax.Array) -> jax.Array:
  """x_BPD = patchify(x) E + b + pos (eq. 1 without the class token); P = (X/p)(Y/p) for any
  X, Y divisible by the patch size p."""
  p, C = cfg.patch_size, cfg.channels
  if images_BXYC.ndim != 4 or images_BXYC.shape[3] != C:
    raise ValueError(f'images have shape {images_BXYC.shape}; expected [batch, X, Y, {C}] '
                     '(model.channels)')
  _, X, Y, _ = images_BXYC.shape
  if X % p or Y % p:
    raise ValueError(f'images of {X} x {Y} pixels; expected sizes divisible by '
                     f'model.patch_size={p}')
  w_CD = params['patch']['w'].reshape(p * p * C, cfg.d_model)  # (row, column, channel) order
  x_BPD = jnp.einsum('BPC,CD->BPD', patchify(images_BXYC, p), w_CD) + params['patch']['b']
  return x_BPD + patch_positions(cfg, params, X // p, Y // p).astype(x_BPD.dtype)


def with_cls(cfg, params, x_BPD: jax.Array) -> jax.Array:
  """x_BTD = [x_class + pos_0; x_BPD], T = P + 1; pos_0 is the learned class-token position (zero
  under sin-cos positions)."""
  if not cfg.class_token:
    raise ValueError('with_cls needs model.class_token=True')
  cls_D = params['cls']
  if cfg.pos_embed == 'learned':
    cls_D = cls_D + params['pos_embed'][0]
  cls_B1D = jnp.broadcast_to(cls_D.astype(x_BPD.dtype), (x_BPD.shape[0], 1, x_BPD.shape[2]))
  return jnp.concatenate([cls_B1D, x_BPD], axis=1)


def _check_rng(cfg, train: bool, rng) -> jax.Array | None:
  """The rng to use: None in evaluation; an error when training with dropout but without rng."""
  if not train:
    return None
  if rng is None and (cfg.dropout or cfg.drop_path):
    raise ValueError(f'train=True with model.dropout={cfg.dropout}, model.drop_path='
                     f'{cfg.drop_path} needs an rng')
  return rng


def encode(cfg, params, x_BTD: jax.Array, *, train: bool = False,
           rng: jax.Array | None = None) -> jax.Array:
  """h_BTD = LN(z_L) of eqs. 2-4 for any number of tokens T, after dropout on the embeddings.
  rng drives dropout and stochastic depth when train."""
  rng = _check_rng(cfg, train, rng)
  embed_rng, block_rng = (None, None) if rng is None else jax.random.split(rng)
  x_BTD = dropout(x_BTD, cfg.dropout, embed_rng)
  x_BTD = te.encoder(params['encoder'], x_BTD, encoder_options(cfg), rng=block_rng)
  f = params['final_norm']
  return norms.layer_norm(x_BTD, f['scale'], f['bias'], cfg.norm_eps)


def map_pool(cfg, p: dict, h_BSD: jax.Array) -> jax.Array:
  """z_BD of multihead attention pooling (big_vision MAPHead): a learned probe q attends to all
  S tokens, u = Attn(q, h, h) (projections with biases), z = u + MLP(LN(u))."""
  a = p['attn']
  probe_B1D = jnp.broadcast_to(p['probe'].astype(h_BSD.dtype), (h_BSD.shape[0], 1,
                                                                 h_BSD.shape[2]))
  q_B1NH = jnp.einsum('BTD,DNH->BTNH', probe_B1D, a['wq']) + a['bq']
  k_BSNH = jnp.einsum('BSD,DNH->BSNH', h_BSD, a['wk']) + a['bk']
  v_BSNH = jnp.einsum('BSD,DNH->BSNH', h_BSD, a['wv']) + a['bv']
  o_B1NH = flash_attention(q_B1NH, k_BSNH, v_BSNH, backend=cfg.attention_backend)
  u_B1D = attention.project_out(a, o_B1NH)
  u_B1D = u_B1D + te.mlp(p['mlp'], norms.layer_norm(u_B1D, p['norm']['scale'], p['norm']['bias'],
                                                    cfg.norm_eps), cfg.mlp_activation)
  return u_B1D[:, 0]


def pool(cfg, params, h_BTD: jax.Array) -> jax.Array:
  """z_BD from the final-normed tokens: 'cls' h_0 (eq. 4), 'gap' the mean of the patch tokens,
  'map' attention pooling over all tokens (map_pool)."""
  if cfg.pooling == 'cls':
    return h_BTD[:, 0]
  if cfg.pooling == 'gap':
    return h_BTD[:, num_prefix(cfg):].mean(axis=1)
  return map_pool(cfg, params['map'], h_BTD)


def forward(cfg, params, images_BXYC: jax.Array, *, train: bool = False,
            rng: jax.Array | None = None) -> jax.Array:
  """logits_BV = z W + b when num_classes > 0, else the pooled features z_BD. images_BXYC may
  have any size divisible by the patch size (positions are resized); rng drives dropout and
  stochastic depth when train."""
  x_BTD = patch_tokens(cfg, params, images_BXYC)
  if cfg.class_token:
    x_BTD = with_cls(cfg, params, x_BTD)
  z_BD = pool(cfg, params, encode(cfg, params, x_BTD, train=train, rng=rng))
  if not cfg.num_classes:
    return z_BD
  return jnp.einsum('BD,DV->BV', z_BD, params['head']['w']) + params['head']['b']


def init_state(cfg) -> dict:
  """A ViT keeps no state besides its parameters."""
  del cfg
  return {}


def forward_with_state(cfg, params, state, images_BXYC: jax.Array, *, train: bool = False,
                       rng: jax.Array | None = None):
  """(forward(...), state): the backbone interface that models with state (ResNet) share."""
  return forward(cfg, params, images_BXYC, train=train, rng=rng), state
