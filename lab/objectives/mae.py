"""MAE: masked autoencoders (He, Chen, Xie, Li, Dollar & Girshick 2021, "Masked Autoencoders Are
Scalable Vision Learners", arXiv:2111.06377).

Sec. 3, with the authors' code where the paper leaves a detail open:
  masking   per example, uniform noise over the P patches, argsort: the first U = P - M patches
            of the shuffle are visible, M = round(mask_ratio P) are masked (ratio 0.75);
  encoder   the ViT (lab.models.vit: patch_tokens with its positions, with_cls, encode) on the
            visible patches ONLY, plus the class token: T = 1 + U tokens;
  decoder   a linear map to the decoder width W, a shared learned mask token at every masked
            position, the tokens put back in patch order, fixed 2-D sin-cos positions of its own
            (zero for the class token), a few pre-norm transformer blocks
            (lab.nn.transformer_encoder), LayerNorm and a linear map to the p p C pixels of every
            patch;
  loss      the mean squared error per patch, averaged over the MASKED patches only:
              L = sum_b,P m_bP mean_Q (pred_bPQ - t_bPQ)^2 / sum_b,P m_bP,
            with per-patch normalised targets t = (x - mean) / sqrt(var + 1e-6) over the patch's
            pixels (the paper's best option, norm_pix_loss; var unbiased as the code's
            torch.var) or raw pixels.
Augmentation: random resized crop (scale 0.2-1) and horizontal flip (appendix A.1,
augment.mae_view), one per example. Optimiser: AdamW with betas (0.9, 0.95), weight decay 0.05
(appendix A.1). The k-NN monitor and `features` encode ALL patches without masking and pool as
model.pooling says (experiment default 'cls', the token MAE's linear probe reads; 'gap' is the
mean of the patch tokens).

Letters beyond DESIGN.md's: U visible patches, M masked patches, W decoder width, Q pixel values
per patch (p p C), R the decoder's rows (prefix + P tokens).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import require
from lab.data import augment
from lab.eval import ssl_monitor
from lab.models import vit
from lab.nn import norms
from lab.nn import param_spec as ps
from lab.nn import transformer_encoder as te
from lab.nn.patches import patchify, pos_embed
from lab.train.task import Task

FIELDS = ('mask_ratio', 'norm_pix_loss', 'decoder_width', 'decoder_layers', 'decoder_heads',
          'decoder_mlp_dim', 'crop_scale')
NORM_PIX_EPS = 1e-6


def experiment_defaults(method: str) -> dict:
  """MAE at MNIST scale: mask ratio 0.75, normalised-pixel targets, a decoder of 2 blocks at half
  the encoder's width (paper: 8 blocks of 512 for a 1024-wide ViT-L), fixed sin-cos encoder
  positions, AdamW betas (0.9, 0.95) and weight decay 0.05 (appendix A.1)."""
  del method
  return {'objective_args': dict(mask_ratio=0.75, norm_pix_loss=True, decoder_width=32,
                                 decoder_layers=2, decoder_heads=2, decoder_mlp_dim=128,
                                 crop_scale=(0.2, 1.0)),
          'model': {'vit': dict(pos_embed='sincos', pooling='cls')},
          'train': dict(optimizer='adamw', b1=0.9, b2=0.95, weight_decay=0.05)}


def num_masked(mask_ratio: float, P: int) -> int:
  """M = round(mask_ratio P) masked patches of P."""
  return int(round(mask_ratio * P))


def validate(config) -> None:
  """One-line ConfigErrors for the MAE fields and the ViT encoder, before any device work."""
  args, cfg = config.objective_args, config.model
  missing = [k for k in FIELDS if k not in args]
  require(not missing, f'objective_args lacks {missing}; MAE needs {list(FIELDS)}')
  require(cfg.name == 'vit', f'model.name={cfg.name!r}; MAE masks patches of a ViT, expected '
          "'vit' (encoder=vit)")
  vit.validate(cfg)
  require(cfg.num_classes == 0, f'model.num_classes={cfg.num_classes}; expected 0 (features)')
  P = vit.grid(cfg) ** 2
  M = num_masked(args.mask_ratio, P)
  require(0.0 < args.mask_ratio < 1.0 and 0 < M < P, f'objective_args.mask_ratio='
          f'{args.mask_ratio} masks {M} of {P} patches; expected at least one masked and one '
          'visible patch')
  require(isinstance(args.norm_pix_loss, bool),
          f'objective_args.norm_pix_loss={args.norm_pix_loss!r}; expected a bool')
  for key in ('decoder_width', 'decoder_layers', 'decoder_heads', 'decoder_mlp_dim'):
    require(args[key] >= 1, f'objective_args.{key}={args[key]}; expected a positive integer')
  require(args.decoder_width % args.decoder_heads == 0, f'objective_args.decoder_heads='
          f'{args.decoder_heads} does not divide objective_args.decoder_width={args.decoder_width}')
  require(args.decoder_width % 4 == 0, f'objective_args.decoder_width={args.decoder_width}; '
          'expected a multiple of 4 (2-D sin-cos positions)')
  scale = tuple(args.crop_scale)
  require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, f'objective_args.crop_scale='
          f'{scale}; expected (lo, hi) with 0 < lo <= hi <= 1')


def _glorot(fan_in: int, fan_out: int) -> ps.Initializer:
  """Normal with Glorot's variance 2 / (fan_in + fan_out) (the code's xavier_uniform)."""
  return ps.normal(math.sqrt(2.0 / (fan_in + fan_out)))


def decoder_specs(cfg, args) -> dict:
  """ParamSpecs of the decoder: embed (w_DW, b_W), mask_token_W (normal 0.02, as the code),
  blocks (stacked), norm, pred (w_WQ, b_Q)."""
  D, W, Q = cfg.d_model, args.decoder_width, cfg.patch_size ** 2 * cfg.channels
  return {'embed': {'w': ps.ParamSpec((D, W), _glorot(D, W), (None, 'embed')),
                    'b': ps.ParamSpec((W,), ps.zeros, ('embed',))},
          'mask_token': ps.ParamSpec((W,), ps.normal(0.02), ('embed',)),
          'blocks': te.stack_specs(args.decoder_layers, W, args.decoder_heads,
                                   args.decoder_mlp_dim),
          'norm': te.norm_specs(W),
          'pred': {'w': ps.ParamSpec((W, Q), _glorot(W, Q), ('embed', None)),
                   'b': ps.ParamSpec((Q,), ps.zeros, (None,))}}


def random_masking(key: jax.Array, B: int, P: int, mask_ratio: float):
  """(keep_BU, restore_BP, mask_BP): per example, noise ~ U[0, 1)^P, shuffle = argsort(noise);
  keep_BU = the first U = P - M patch indices of the shuffle (visible), restore_BP =
  argsort(shuffle) (the patch's rank in the shuffle), mask_BP = 1.0 where masked (rank >= U)."""
  U = P - num_masked(mask_ratio, P)
  shuffle_BP = jnp.argsort(jax.random.uniform(key, (B, P)), axis=1)
  restore_BP = jnp.argsort(shuffle_BP, axis=1)
  return shuffle_BP[:, :U], restore_BP, (restore_BP >= U).astype(jnp.float32)


def encode_visible(cfg, params, images_BXYC: jax.Array, keep_BU: jax.Array, *,
                   train: bool = False, rng: jax.Array | None = None) -> jax.Array:
  """h_BTD = ViT encoder on the visible patches only: x_BPD = patch_tokens (with positions),
  x_BUD = x_BPD[keep_BU], the class token in front (T = prefix + U), encode."""
  x_BPD = vit.patch_tokens(cfg, params, images_BXYC)
  x_BTD = jnp.take_along_axis(x_BPD, keep_BU[:, :, None], axis=1)
  if cfg.class_token:
    x_BTD = vit.with_cls(cfg, params, x_BTD)
  return vit.encode(cfg, params, x_BTD, train=train, rng=rng)


def unshuffle(y_BUW: jax.Array, mask_token_W: jax.Array, restore_BP: jax.Array) -> jax.Array:
  """x_BPW in patch order: the U visible tokens followed by P - U mask tokens (the shuffled
  order), gathered by restore_BP, so x[b, keep[b, u]] = y[b, u] and masked patches hold the mask
  token."""
  B, P = restore_BP.shape
  mask_BMW = jnp.broadcast_to(mask_token_W.astype(y_BUW.dtype),
                              (B, P - y_BUW.shape[1], y_BUW.shape[2]))
  shuffled_BPW = jnp.concatenate([y_BUW, mask_BMW], axis=1)
  return jnp.take_along_axis(shuffled_BPW, restore_BP[:, :, None], axis=1)


def decode(cfg, args, p: dict, h_BTD: jax.Array, restore_BP: jax.Array) -> jax.Array:
  """pred_BPQ of every patch: y = h W_embed + b; the patch tokens unshuffled with mask tokens;
  the prefix tokens in front; plus the decoder's sin-cos positions (zero rows for the prefix);
  blocks; LayerNorm; y W_pred + b, prefix rows dropped."""
  n = vit.num_prefix(cfg)
  y_BTW = jnp.einsum('BTD,DW->BTW', h_BTD, p['embed']['w']) + p['embed']['b']
  x_BPW = unshuffle(y_BTW[:, n:], p['mask_token'], restore_BP)
  g = vit.grid(cfg)
  pos_RW = jnp.concatenate([jnp.zeros((n, args.decoder_width)),
                            jnp.asarray(pos_embed(g, g, args.decoder_width))])
  x_BRW = jnp.concatenate([y_BTW[:, :n], x_BPW], axis=1) + pos_RW.astype(y_BTW.dtype)
  opts = te.Options(causal=False, activation=cfg.mlp_activation, norm_eps=cfg.norm_eps,
                    attention_backend=cfg.attention_backend)
  x_BRW = te.encoder(p['blocks'], x_BRW, opts)
  x_BRW = norms.layer_norm(x_BRW, p['norm']['scale'], p['norm']['bias'], cfg.norm_eps)
  pred_BRQ = jnp.einsum('BRW,WQ->BRQ', x_BRW, p['pred']['w']) + p['pred']['b']
  return pred_BRQ[:, n:]


def pixel_targets(images_BXYC: jax.Array, patch_size: int, norm_pix: bool) -> jax.Array:
  """t_BPQ = patchify(x), normalised per patch when norm_pix: (t - mean_Q) / sqrt(var_Q + 1e-6),
  var unbiased (the code's torch.var)."""
  t_BPQ = patchify(images_BXYC.astype(jnp.promote_types(images_BXYC.dtype, jnp.float32)),
                   patch_size)
  if not norm_pix:
    return t_BPQ
  mean_BP1 = t_BPQ.mean(-1, keepdims=True)
  var_BP1 = t_BPQ.var(-1, keepdims=True, ddof=1)
  return (t_BPQ - mean_BP1) / jnp.sqrt(var_BP1 + NORM_PIX_EPS)


def masked_mse(pred_BPQ: jax.Array, target_BPQ: jax.Array, mask_BP: jax.Array) -> jax.Array:
  """L = sum_{b,P} m_bP mean_Q (pred - t)^2 / sum_{b,P} m_bP: visible patches do not count;
  computed in the targets' dtype (pixel_targets: float32 at least)."""
  err_BP = ((pred_BPQ.astype(target_BPQ.dtype) - target_BPQ) ** 2).mean(-1)
  return (err_BP * mask_BP).sum() / mask_BP.sum()


def features(config, params, images_BXYC: jax.Array) -> jax.Array:
  """z_BD: the encoder on ALL patches (no masking) in eval mode, pooled by model.pooling."""
  return vit.forward(config.model, params['encoder'], images_BXYC, train=False)


def make_task(config, data) -> Task:
  del data
  cfg, args = config.model, config.objective_args
  specs = {'encoder': vit.param_specs(cfg), 'decoder': decoder_specs(cfg, args)}

  def loss_fn(params, state, batch, rng, train):
    if train and rng is None:
      raise ValueError('mae loss_fn with train=True needs an rng for the crops and masks')
    key = rng if train else jax.random.key(0)  # fixed crops and masks in eval
    crop_key, mask_key, drop_key = jax.random.split(key, 3)
    images_BXYC = batch['image']
    B, size = images_BXYC.shape[0], images_BXYC.shape[1]
    view = lambda k, x: augment.mae_view(k, x, size, tuple(args.crop_scale))
    x_BXYC = jax.vmap(view)(augment.example_keys(crop_key, B), images_BXYC)
    keep_BU, restore_BP, mask_BP = random_masking(mask_key, B, vit.grid(cfg) ** 2,
                                                  args.mask_ratio)
    h_BTD = encode_visible(cfg, params['encoder'], x_BXYC, keep_BU, train=train,
                           rng=drop_key if train else None)
    pred_BPQ = decode(cfg, args, params['decoder'], h_BTD, restore_BP)
    target_BPQ = pixel_targets(x_BXYC, cfg.patch_size, args.norm_pix_loss)
    loss = masked_mse(pred_BPQ, target_BPQ, mask_BP)
    return loss, ({'loss': loss}, state)

  encode = lambda params, state, x_BXYC: features(config, params, x_BXYC)
  monitor = ssl_monitor.make_monitor(config, encode, n_bank=config.sample.n_bank,
                                     n_query=config.sample.n_query)
  return Task(param_specs=specs, init_state=lambda key: {}, loss_fn=loss_fn, sample=monitor,
              features=encode)
