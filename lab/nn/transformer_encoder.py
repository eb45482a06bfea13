"""A stack of pre-norm transformer encoder blocks (Vaswani et al. 2017, arXiv:1706.03762) with the
pre-LN placement of ViT (Dosovitskiy et al. 2021, arXiv:2010.11929, eqs. 2-3):

  x = x + DropPath(Dropout(MSA(LN(x))));   x = x + DropPath(MLP(LN(x)))
  MLP(u) = Dropout(Dropout(act(u W_in + b_in)) W_out + b_out)

Dropout follows ViT (appendix B.1: after every dense layer except the qkv projections); the ViT
model adds the one after the position embeddings. Stochastic depth (Huang et al. 2016,
arXiv:1603.09382) drops a residual branch per example and scales kept branches by 1 / (1 - p);
the rate rises linearly over depth, 0 at the first block to `drop_path` at the last, as DeiT
(Touvron et al. 2021) sets it. Attention is `lab.kernels.flash_attention` (causal for CLIP's text
tower; segment ids mask padded or packed keys). Blocks are stacked on a leading 'layers' axis and
run with `lax.scan`, so any token count T works with the same parameters.

MLP activations: 'gelu' (exact, x Phi(x), Hendrycks & Gimpel 2016), 'gelu_tanh' (its tanh
approximation), 'quick_gelu' (x sigmoid(1.702 x), OpenAI CLIP, Radford et al. 2021).
Weights are normal with Glorot's variance 2 / (fan_in + fan_out) (the variance of big_vision's
xavier_uniform); biases zero; LayerNorm scale one, bias zero.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lab.kernels import available_backends, flash_attention
from lab.nn import attention, norms
from lab.nn import param_spec as ps
from lab.nn.dropout import dropout
from lab.parallel.rules import constrain

ACTIVATIONS = {
    'gelu': lambda u: jax.nn.gelu(u, approximate=False),
    'gelu_tanh': lambda u: jax.nn.gelu(u, approximate=True),
    'quick_gelu': lambda u: u * jax.nn.sigmoid(1.702 * u),
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How the blocks run (static, hashable). dropout: rate after dense layers; drop_path: the
  stochastic-depth rate of the last block; both only act when an rng is given."""
  causal: bool = False
  activation: str = 'gelu'
  norm_eps: float = 1e-6
  dropout: float = 0.0
  drop_path: float = 0.0
  attention_backend: str = 'auto'

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r}; expected one of {tuple(ACTIVATIONS)}')
    if self.attention_backend not in available_backends():
      raise ValueError(f'attention_backend={self.attention_backend!r}; expected one of '
                       f'{available_backends()}')
    if not self.norm_eps > 0:
      raise ValueError(f'norm_eps={self.norm_eps}; expected > 0')
    for name in ('dropout', 'drop_path'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f'{name}={getattr(self, name)}; expected a value in [0, 1)')


def _glorot(fan_in: int, fan_out: int) -> ps.Initializer:
  return ps.normal(math.sqrt(2.0 / (fan_in + fan_out)))


def norm_specs(d_model: int) -> dict:
  """LayerNorm parameters: scale_D (ones) and bias_D (zeros)."""
  return {'scale': ps.ParamSpec((d_model,), ps.ones, ('embed',)),
          'bias': ps.ParamSpec((d_model,), ps.zeros, ('embed',))}


def mlp_specs(d_model: int, mlp_dim: int) -> dict:
  """MLP parameters: w_in_DF, b_in_F, w_out_FD, b_out_D."""
  D, F = d_model, mlp_dim
  return {'w_in': ps.ParamSpec((D, F), _glorot(D, F), ('embed', 'mlp')),
          'b_in': ps.ParamSpec((F,), ps.zeros, ('mlp',)),
          'w_out': ps.ParamSpec((F, D), _glorot(F, D), ('mlp', 'embed')),
          'b_out': ps.ParamSpec((D,), ps.zeros, ('embed',))}


def block_specs(d_model: int, n_heads: int, mlp_dim: int) -> dict:
  """One block: attn_norm, attn (lab.nn.attention with biases, N = K heads of D / N), mlp_norm,
  mlp."""
  if d_model % n_heads:
    raise ValueError(f'n_heads={n_heads} does not divide d_model={d_model}')
  std = d_model ** -0.5  # Glorot's variance for the square D x (N H) maps
  return {'attn_norm': norm_specs(d_model),
          'attn': attention.attention_specs(d_model, n_heads, n_heads, d_model // n_heads,
                                            bias=True, std=std, out_std=std),
          'mlp_norm': norm_specs(d_model),
          'mlp': mlp_specs(d_model, mlp_dim)}


def stack_specs(n_layers: int, d_model: int, n_heads: int, mlp_dim: int) -> dict:
  """n_layers independent blocks stacked on a leading 'layers' axis (for `encoder`)."""
  return jax.tree.map(lambda s: ps.stack(s, n_layers), block_specs(d_model, n_heads, mlp_dim),
                      is_leaf=ps.is_spec)


def mlp(p: dict, x_BTD: jax.Array, activation: str, *, dropout_rate: float = 0.0,
        rng: jax.Array | None = None) -> jax.Array:
  """y_BTD = Dropout(Dropout(act(x W_in + b_in)) W_out + b_out); dropout only with an rng."""
  rngs = (None, None) if rng is None else jax.random.split(rng)
  h_BTF = ACTIVATIONS[activation](jnp.einsum('BTD,DF->BTF', x_BTD, p['w_in']) + p['b_in'])
  h_BTF = constrain(dropout(h_BTF, dropout_rate, rngs[0]), ('batch', 'length', 'act_mlp'))
  y_BTD = jnp.einsum('BTF,FD->BTD', h_BTF, p['w_out']) + p['b_out']
  return dropout(y_BTD, dropout_rate, rngs[1])


def drop_path(x_BTD: jax.Array, rate, rng: jax.Array | None) -> jax.Array:
  """Stochastic depth per example: y_b = r_b x_b / (1 - rate), r_b ~ Bernoulli(1 - rate), one
  draw per example b for all its other axes; x itself when rng is None or rate is 0.0.

  rate: a float in [0, 1) or a traced scalar (the per-layer rate inside `encoder`'s scan).
  """
  if rng is None or (isinstance(rate, (int, float)) and rate == 0.0):
    return x_BTD
  keep_B = jax.random.bernoulli(rng, 1.0 - rate, (x_BTD.shape[0],))
  scale_B = jnp.where(keep_B, 1.0 / (1.0 - rate), 0.0).astype(x_BTD.dtype)
  return x_BTD * scale_B.reshape(-1, *(1,) * (x_BTD.ndim - 1))


def drop_path_rates(rate: float, n_layers: int) -> np.ndarray:
  """rate_L: linear from 0 at the first block to `rate` at the last (DeiT / timm's rule)."""
  return np.linspace(0.0, rate, n_layers, dtype=np.float32)


def block(p: dict, x_BTD: jax.Array, opts: Options, *, drop_path_rate=0.0, segment_ids=None,
          rng: jax.Array | None = None) -> jax.Array:
  """One pre-norm block (module docstring, ViT eqs. 2-3) -> x_BTD.

  p: one block's parameters (block_specs). segment_ids: None, int_BT or a (q_BT, kv_BS) pair, as
  lab.kernels.flash_attention takes them (a token sees only keys of its own segment: give padding
  its own id to mask it). rng: dropout and drop-path key, None for evaluation.
  """
  rngs = (None,) * 4 if rng is None else tuple(jax.random.split(rng, 4))
  x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
  a = p['attn']
  h_BTD = norms.layer_norm(x_BTD, p['attn_norm']['scale'], p['attn_norm']['bias'], opts.norm_eps)
  q_BTNH, k_BTNH, v_BTNH = attention.project_qkv(a, h_BTD)
  q_BTNH, k_BTNH, v_BTNH = (constrain(t, ('batch', 'length', 'act_heads', None))
                            for t in (q_BTNH, k_BTNH, v_BTNH))
  o_BTNH = flash_attention(q_BTNH, k_BTNH, v_BTNH, causal=opts.causal, segment_ids=segment_ids,
                           backend=opts.attention_backend)
  y_BTD = dropout(attention.project_out(a, o_BTNH), opts.dropout, rngs[0])
  x_BTD = x_BTD + drop_path(y_BTD, drop_path_rate, rngs[1])
  h_BTD = norms.layer_norm(x_BTD, p['mlp_norm']['scale'], p['mlp_norm']['bias'], opts.norm_eps)
  y_BTD = mlp(p['mlp'], h_BTD, opts.activation, dropout_rate=opts.dropout, rng=rngs[2])
  return x_BTD + drop_path(y_BTD, drop_path_rate, rngs[3])


def encoder(p: dict, x_BTD: jax.Array, opts: Options, *, segment_ids=None,
            rng: jax.Array | None = None) -> jax.Array:
  """The blocks of p (stack_specs, leading axis L) applied in order with `lax.scan` -> x_BTD (no
  final norm). Block l drops its branches at rate drop_path_rates(opts.drop_path, L)[l];
  segment_ids and rng as in `block` (rng None: evaluation)."""
  L = jax.tree.leaves(p)[0].shape[0]
  rates_L = jnp.asarray(drop_path_rates(opts.drop_path, L)) if opts.drop_path else None
  rngs_L = None if rng is None else jax.random.split(rng, L)

  def body(x_BTD, xs):
    p_l, rate, rng_l = xs
    return block(p_l, x_BTD, opts, drop_path_rate=0.0 if rate is None else rate,
                 segment_ids=segment_ids, rng=rng_l), None

  x_BTD, _ = jax.lax.scan(body, x_BTD, (p, rates_L, rngs_L))
  return x_BTD
