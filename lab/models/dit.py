"""DiT denoiser (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") over x_BXYC.

  patchify (p x p patches, linear embedding) + fixed 2-D sin-cos positions
  -> n_layers DiT blocks with adaLN-Zero -> final adaLN + linear to p p C -> unpatchify.
Conditioning c_BD = t_emb + y_emb (sec. 3.2): t_emb = MLP(sinusoidal(noise, 256 features)),
y_emb a label table with a null row for classifier-free guidance (lab.nn.timestep_embedding).

DiT block with adaLN-Zero (sec. 3.2, fig. 3), LN without affine parameters, eps 1e-6:
  [b1, s1, a1, b2, s2, a2] = Linear_zero(SiLU(c))
  x = x + a1 * Attn(LN(x) (1 + s1) + b1);   x = x + a2 * MLP(LN(x) (1 + s2) + b2)
The modulation linear starts at zero, so every block starts as the identity; the final layer's
modulation and its linear to patches start at zero too, so an untrained DiT outputs zeros.
Blocks are stacked on a leading `layers` axis and run with `lax.scan`. The learned-sigma output
of the paper is not built: the output has the input's shape.

Config fields (`cfg` is `config.model`): image_size (square, divisible by patch_size), channels,
patch_size, d_model (divisible by 4 and by n_heads), n_layers, n_heads, mlp_ratio; optional:
num_classes (0: unconditional; the label value num_classes is the null label), dropout (0.0, on
the attention and MLP outputs), attention_backend ('auto'), noise_max_period (10000.0); their
defaults and checks live in lab.models.denoiser_options.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.config import require
from lab.kernels import flash_attention
from lab.models.denoiser_options import option, validate_common
from lab.nn import attention, mlp, norms
from lab.nn import param_spec as ps
from lab.nn import timestep_embedding as temb
from lab.nn.dropout import dropout
from lab.nn.patches import patchify, pos_embed, unpatchify

NOISE_FEATURES = 256  # DiT's frequency_embedding_size


def validate(cfg) -> None:
  """One-line ConfigErrors for values that cannot form the network."""
  for key in ('image_size', 'channels', 'patch_size', 'd_model', 'n_layers', 'n_heads'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  require(cfg.image_size % cfg.patch_size == 0, f'model.patch_size={cfg.patch_size} does not '
          f'divide model.image_size={cfg.image_size}')
  require(cfg.d_model % cfg.n_heads == 0,
          f'model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}')
  require(cfg.d_model % 4 == 0, f'model.d_model={cfg.d_model}; expected a multiple of 4 (2-D '
          'sin-cos positions)')
  require(cfg.mlp_ratio > 0 and int(cfg.mlp_ratio * cfg.d_model) > 0,
          f'model.mlp_ratio={cfg.mlp_ratio}; expected > 0')
  validate_common(cfg, attention=True)


def _zeros(shape, axes) -> ps.ParamSpec:
  return ps.ParamSpec(shape, ps.zeros, axes)


def param_specs(cfg) -> dict:
  """ParamSpecs; LeCun normal weights, zero biases, zero adaLN modulations and output."""
  validate(cfg)
  D, F, N = cfg.d_model, int(cfg.mlp_ratio * cfg.d_model), cfg.n_heads
  C = cfg.patch_size ** 2 * cfg.channels
  block = {
      'ada_w': _zeros((D, 6 * D), ('embed', None)), 'ada_b': _zeros((6 * D,), (None,)),
      'attn': attention.attention_specs(D, N, N, D // N, bias=True, std=D ** -0.5,
                                        out_std=D ** -0.5),
      'mlp': {'w_in': ps.ParamSpec((D, F), ps.normal(D ** -0.5), ('embed', 'mlp')),
              'b_in': _zeros((F,), ('mlp',)),
              'w_out': ps.ParamSpec((F, D), ps.normal(F ** -0.5), ('mlp', 'embed')),
              'b_out': _zeros((D,), ('embed',))},
  }
  return {
      'patch_w': ps.ParamSpec((C, D), ps.normal(C ** -0.5), (None, 'embed')),
      'patch_b': _zeros((D,), ('embed',)),
      'cond': temb.condition_specs(option(cfg, 'num_classes'), NOISE_FEATURES, D),
      'blocks': jax.tree.map(lambda s: ps.stack(s, cfg.n_layers), block, is_leaf=ps.is_spec),
      'final': {'ada_w': _zeros((D, 2 * D), ('embed', None)), 'ada_b': _zeros((2 * D,), (None,)),
                'w': _zeros((D, C), ('embed', None)), 'b': _zeros((C,), (None,))},
  }


def _modulate(x_BTD, shift_BD, scale_BD):
  """LN(x) (1 + scale) + shift, LN without affine parameters (eps 1e-6)."""
  x_BTD = norms.layer_norm(x_BTD, jnp.ones(x_BTD.shape[-1], x_BTD.dtype), None, eps=1e-6)
  return x_BTD * (1 + scale_BD[:, None]) + shift_BD[:, None]


def block(cfg, p: dict, x_BTD: jax.Array, c_BD: jax.Array, rng=None) -> jax.Array:
  """One DiT block with adaLN-Zero (module docstring); rng: dropout key or None."""
  rngs = (None, None) if rng is None else jax.random.split(rng)
  mod_BD = jax.nn.silu(c_BD) @ p['ada_w'] + p['ada_b']
  shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod_BD, 6, axis=-1)
  q_BTNH, k_BTNH, v_BTNH = attention.project_qkv(p['attn'], _modulate(x_BTD, shift1, scale1))
  o_BTNH = flash_attention(q_BTNH, k_BTNH, v_BTNH, backend=option(cfg, 'attention_backend'))
  y_BTD = dropout(attention.project_out(p['attn'], o_BTNH), option(cfg, 'dropout'), rngs[0])
  x_BTD = x_BTD + gate1[:, None] * y_BTD
  m = p['mlp']
  y_BTD = mlp.gelu_mlp(_modulate(x_BTD, shift2, scale2), m['w_in'], m['b_in'], m['w_out'],
                       m['b_out'])
  return x_BTD + gate2[:, None] * dropout(y_BTD, option(cfg, 'dropout'), rngs[1])


def forward(cfg, params, x_BXYC: jax.Array, noise_B: jax.Array, labels_B=None, *, rng=None,
            train: bool = False) -> jax.Array:
  """The denoiser output, same shape as x_BXYC.

  noise_B: real noise conditioning c_noise, one per example. labels_B: int class labels in
  [0, num_classes] (num_classes = null) or None (all null; required None when unconditional).
  rng drives dropout when train.
  """
  B, S, C, p = x_BXYC.shape[0], cfg.image_size, cfg.channels, cfg.patch_size
  if x_BXYC.shape[1:] != (S, S, C):
    raise ValueError(f'images have shape {x_BXYC.shape}; expected [batch, {S}, {S}, {C}] '
                     '(model.image_size, model.channels)')
  if noise_B.shape != (B,):
    raise ValueError(f'noise has shape {noise_B.shape}; expected [{B}], one level per image')
  c_BD = temb.condition(params['cond'], noise_B, labels_B, option(cfg, 'num_classes'),
                        option(cfg, 'noise_max_period'))
  x_BTD = patchify(x_BXYC, p) @ params['patch_w'] + params['patch_b']
  x_BTD = x_BTD + jnp.asarray(pos_embed(S // p, S // p, cfg.d_model), x_BTD.dtype)
  rngs = jax.random.split(rng, cfg.n_layers) if train and rng is not None else None
  x_BTD, _ = jax.lax.scan(lambda x, xs: (block(cfg, xs[0], x, c_BD, xs[1]), None), x_BTD,
                          (params['blocks'], rngs))
  f = params['final']
  shift_BD, scale_BD = jnp.split(jax.nn.silu(c_BD) @ f['ada_w'] + f['ada_b'], 2, axis=-1)
  out_BPC = _modulate(x_BTD, shift_BD, scale_BD) @ f['w'] + f['b']
  return unpatchify(out_BPC, p, S, S)
