"""ADM U-Net denoiser (Dhariwal & Nichol 2021; Ho et al. 2020) over channels-last images x_BXYC.

  in conv 3x3 -> down levels -> middle -> up levels (skips concatenated) -> GN, SiLU, conv 3x3.
Level l works at resolution image_size / 2^l with base_channels * channel_mults[l] channels; it
has blocks_per_level residual blocks on the way down and blocks_per_level + 1 on the way up, each
followed by self-attention when its resolution is in attention_resolutions. Levels are joined by
a stride-2 conv 3x3 (down) and nearest x2 + conv 3x3 (up). The middle is res, attention (again
only if the lowest resolution is listed), res.

Residual block with ADM's scale-shift conditioning (AdaGN, Dhariwal & Nichol 2021, sec. 3):
  h = conv3(SiLU(GN(x)));  [s, b] = Linear(SiLU(c));  h = GN(h) (1 + s) + b
  y = skip(x) + conv3_zero(dropout(SiLU(h))),   skip = conv1x1 when channels change.
Attention block: y = x + Attn(GN(x)) over the X*Y positions (lab.kernels.flash_attention).
c_BE = MLP(sinusoidal(noise_B)) (+ label embedding), E = 4 base_channels, with base_channels
sinusoidal features (lab.nn.timestep_embedding). The last conv / projection of every residual
branch and the output conv are zero-initialised (as in ADM): every branch starts at zero and an
untrained network outputs zeros.

Config fields (`cfg` is `config.model`): image_size (square), channels, base_channels (even,
divisible by norm_groups), channel_mults (tuple, one entry per level), blocks_per_level,
attention_resolutions (tuple of spatial sizes that occur), heads (divides the channels there);
optional: norm_groups (32), dropout (0.0), num_classes (0: unconditional; labels = num_classes is
the null label), attention_backend ('auto'), noise_max_period (10000.0); the
defaults and checks of all but norm_groups live in lab.models.denoiser_options.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from lab.config import require
from lab.kernels import flash_attention
from lab.models.denoiser_options import option, validate_common
from lab.nn import attention, conv, norms
from lab.nn import param_spec as ps
from lab.nn import timestep_embedding as temb
from lab.nn.dropout import dropout

NORM_GROUPS = 32  # when model.norm_groups is left out


def _norm_groups(cfg) -> int:
  return cfg.get('norm_groups', NORM_GROUPS)


def _resolutions(cfg) -> list[int]:
  return [cfg.image_size // 2 ** level for level in range(len(cfg.channel_mults))]


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network."""
  for key in ('image_size', 'channels', 'base_channels', 'blocks_per_level', 'heads'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  mults, groups = tuple(cfg.channel_mults), _norm_groups(cfg)
  require(len(mults) > 0 and all(m > 0 for m in mults),
          f'model.channel_mults={mults}; expected a non-empty tuple of positive integers')
  require(cfg.base_channels % 2 == 0, f'model.base_channels={cfg.base_channels}; expected an '
          'even number (it is the sinusoidal noise-embedding width)')
  require(cfg.base_channels % groups == 0, f'model.norm_groups={groups} does not divide '
          f'model.base_channels={cfg.base_channels}')
  require(cfg.image_size % 2 ** (len(mults) - 1) == 0,
          f'model.image_size={cfg.image_size}; expected a multiple of 2^(levels - 1) = '
          f'{2 ** (len(mults) - 1)} for model.channel_mults={mults}')
  res = _resolutions(cfg)
  for r in cfg.attention_resolutions:
    require(r in res, f'model.attention_resolutions has {r}; expected sizes among {res}')
    width = cfg.base_channels * mults[res.index(r)]
    require(width % cfg.heads == 0, f'model.heads={cfg.heads} does not divide the {width} '
            f'channels at resolution {r}')
  validate_common(cfg, attention=True)


def _zero_init(specs):
  """The same ParamSpec pytree with every initializer replaced by zeros."""
  return jax.tree.map(lambda s: dataclasses.replace(s, init=ps.zeros), specs, is_leaf=ps.is_spec)


def _norm_specs(c: int) -> dict:
  return {'scale': ps.ParamSpec((c,), ps.ones, ('conv_out',)),
          'bias': ps.ParamSpec((c,), ps.zeros, ('conv_out',))}


def _res_specs(c_in: int, c_out: int, e: int) -> dict:
  specs = {'norm1': _norm_specs(c_in), 'conv1': conv.conv_specs(3, c_in, c_out),
           'emb_w': ps.ParamSpec((e, 2 * c_out), ps.normal(e ** -0.5), ('embed', 'conv_out')),
           'emb_b': ps.ParamSpec((2 * c_out,), ps.zeros, ('conv_out',)),
           'norm2': _norm_specs(c_out), 'conv2': _zero_init(conv.conv_specs(3, c_out, c_out))}
  if c_in != c_out:
    specs['skip'] = conv.conv_specs(1, c_in, c_out)
  return specs


def _attn_specs(cfg, c: int) -> dict:
  specs = attention.attention_specs(c, cfg.heads, cfg.heads, c // cfg.heads, bias=True,
                                    std=c ** -0.5, out_std=c ** -0.5)
  return {'norm': _norm_specs(c), **specs, 'wo': _zero_init(specs['wo'])}


def _stage_specs(cfg, c_in: int, c_out: int, res: int) -> dict:
  """A residual block, followed by attention when `res` is listed."""
  specs = {'res': _res_specs(c_in, c_out, 4 * cfg.base_channels)}
  if res in cfg.attention_resolutions:
    specs['attn'] = _attn_specs(cfg, c_out)
  return specs


def param_specs(cfg) -> dict:
  """ParamSpecs. 'down' and 'up' are lists of stages run in order; a down stage is a residual
  block (+ attention) or a downsampling conv, an up stage a residual block (+ attention)
  (+ an upsampling conv). Every down stage's output is a skip that one up stage consumes."""
  validate(cfg)
  widths = [cfg.base_channels * m for m in cfg.channel_mults]
  ch, res, skips, down, up = cfg.base_channels, cfg.image_size, [cfg.base_channels], [], []
  for level, width in enumerate(widths):
    for _ in range(cfg.blocks_per_level):
      down.append(_stage_specs(cfg, ch, width, res))
      ch = width
      skips.append(ch)
    if level < len(widths) - 1:
      down.append({'down': conv.conv_specs(3, ch, ch)})
      res //= 2
      skips.append(ch)
  mid = {'res1': _res_specs(ch, ch, 4 * cfg.base_channels),
         'res2': _res_specs(ch, ch, 4 * cfg.base_channels)}
  if res in cfg.attention_resolutions:
    mid['attn'] = _attn_specs(cfg, ch)
  for level, width in reversed(list(enumerate(widths))):
    for i in range(cfg.blocks_per_level + 1):
      stage = _stage_specs(cfg, ch + skips.pop(), width, res)
      ch = width
      if level > 0 and i == cfg.blocks_per_level:
        stage['up'] = conv.conv_specs(3, ch, ch)
        res *= 2
      up.append(stage)
  return {'cond': temb.condition_specs(option(cfg, 'num_classes'), cfg.base_channels,
                                       4 * cfg.base_channels),
          'in_conv': conv.conv_specs(3, cfg.channels, cfg.base_channels),
          'down': down, 'mid': mid, 'up': up, 'out_norm': _norm_specs(ch),
          'out_conv': _zero_init(conv.conv_specs(3, ch, cfg.channels))}


def _gn(cfg, p, x_BXYC):
  return norms.group_norm(x_BXYC, p['scale'], p['bias'], _norm_groups(cfg))


def res_block(cfg, p: dict, x_BXYC, c_BE, rng=None):
  """ADM residual block with scale-shift conditioning (module docstring); rng: dropout key."""
  h_BXYO = conv.conv2d(p['conv1'], jax.nn.silu(_gn(cfg, p['norm1'], x_BXYC)))
  scale_BO, shift_BO = jnp.split(jax.nn.silu(c_BE) @ p['emb_w'] + p['emb_b'], 2, axis=-1)
  h_BXYO = _gn(cfg, p['norm2'], h_BXYO) * (1 + scale_BO[:, None, None]) + shift_BO[:, None, None]
  h_BXYO = dropout(jax.nn.silu(h_BXYO), option(cfg, 'dropout'), rng)
  skip_BXYO = conv.conv2d(p['skip'], x_BXYC) if 'skip' in p else x_BXYC
  return skip_BXYO + conv.conv2d(p['conv2'], h_BXYO)


def attention_block(cfg, p: dict, x_BXYC):
  """x + MultiHeadAttn(GN(x)) with the X*Y positions as the sequence (no mask)."""
  B, X, Y, C = x_BXYC.shape
  h_BTC = _gn(cfg, p['norm'], x_BXYC).reshape(B, X * Y, C)
  q_BTNH, k_BTNH, v_BTNH = attention.project_qkv(p, h_BTC)
  o_BTNH = flash_attention(q_BTNH, k_BTNH, v_BTNH, backend=option(cfg, 'attention_backend'))
  return x_BXYC + attention.project_out(p, o_BTNH).reshape(B, X, Y, C)


def _stage(cfg, p: dict, x_BXYC, c_BE, rng):
  if 'down' in p:
    return conv.conv2d(p['down'], x_BXYC, stride=2, padding=1)
  x_BXYC = res_block(cfg, p['res'], x_BXYC, c_BE, rng)
  if 'attn' in p:
    x_BXYC = attention_block(cfg, p['attn'], x_BXYC)
  if 'up' in p:
    x_BXYC = conv.conv2d(p['up'], jnp.repeat(jnp.repeat(x_BXYC, 2, axis=1), 2, axis=2))
  return x_BXYC


def forward(cfg, params, x_BXYC: jax.Array, noise_B: jax.Array, labels_B=None, *, rng=None,
            train: bool = False) -> jax.Array:
  """The denoiser output, same shape as x_BXYC.

  noise_B: real noise conditioning c_noise, one per example. labels_B: int class labels in
  [0, num_classes] (num_classes = null) or None (all null; required None when unconditional).
  rng drives dropout when train.
  """
  B, S, C = x_BXYC.shape[0], cfg.image_size, cfg.channels
  if x_BXYC.shape[1:] != (S, S, C):
    raise ValueError(f'images have shape {x_BXYC.shape}; expected [batch, {S}, {S}, {C}] '
                     '(model.image_size, model.channels)')
  if noise_B.shape != (B,):
    raise ValueError(f'noise has shape {noise_B.shape}; expected [{B}], one level per image')
  keys = (jax.random.fold_in(rng, i) if train and rng is not None else None
          for i in itertools.count())
  c_BE = temb.condition(params['cond'], noise_B, labels_B, option(cfg, 'num_classes'),
                        option(cfg, 'noise_max_period'))
  h = conv.conv2d(params['in_conv'], x_BXYC)
  skips = [h]
  for p in params['down']:
    h = _stage(cfg, p, h, c_BE, next(keys))
    skips.append(h)
  mid = params['mid']
  h = res_block(cfg, mid['res1'], h, c_BE, next(keys))
  if 'attn' in mid:
    h = attention_block(cfg, mid['attn'], h)
  h = res_block(cfg, mid['res2'], h, c_BE, next(keys))
  for p in params['up']:
    h = _stage(cfg, p, jnp.concatenate([h, skips.pop()], axis=-1), c_BE, next(keys))
  h = jax.nn.silu(_gn(cfg, params['out_norm'], h))
  return conv.conv2d(params['out_conv'], h)
