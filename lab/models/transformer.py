"""Decoder-only transformer: GPT-2 and Llama from one set of config switches.

GPT-2 (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
Llama (Touvron et al. 2023): RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head.

Pre-norm residual blocks (eq. of Xiong et al. 2020):
  h = x + Attn(Norm(x));  y = h + MLP(Norm(h)).
Blocks are stacked on a leading `layers` axis and run with `lax.scan`, so compile time does not
grow with depth. Config fields (`cfg` is `config.model`): vocab_size, d_model, n_layers, n_heads,
n_kv_heads, head_dim (0: d_model // n_heads), d_ff, max_len, norm ('layernorm' | 'rmsnorm'),
norm_eps, mlp ('gelu' | 'swiglu'), positions ('learned' | 'rope'), rope_theta, bias,
tie_embeddings, dropout, init_std, remat, attention_backend; optional mixture of experts:
moe_experts (0: dense MLPs), moe_top_k, moe_capacity_factor, moe_renormalize: every block's MLP
becomes a top-k MoE of `mlp`-type experts (lab.nn.moe), run expert-parallel over the mesh's
'expert' axis in training and exactly (no capacity) when decoding.

Decoding: prefill fills an empty KV cache with the prompt and decode_step appends one token;
extend runs T tokens against a filled cache under any mask among them (a causal chain, or the
ancestor mask of a tree of speculative candidates) and compact_cache keeps the accepted ones.
forward_hidden and prefill also take input embeddings embeds_BTD in place of token ids (a
vision-language model's text rows of embed_tokens with image embeddings merged in).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import ConfigError
from lab.kernels import available_backends, flash_attention
from lab.nn import attention, cached_attention, mlp, moe, norms, rope
from lab.nn import param_spec as ps
from lab.nn.dropout import dropout
from lab.parallel import expert_dispatch
from lab.parallel.rules import constrain

_CHOICES = {'norm': ('layernorm', 'rmsnorm'), 'mlp': ('gelu', 'swiglu'),
            'positions': ('learned', 'rope')}


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.d_model // cfg.n_heads


def n_experts(cfg) -> int:
  return cfg.get('moe_experts', 0)


def validate(cfg) -> None:
  """One-line errors for shapes that cannot form a model, before any device work."""
  for key, allowed in _CHOICES.items():
    if cfg[key] not in allowed:
      raise ConfigError(f'model.{key}={cfg[key]!r}; expected one of {allowed}')
  for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff', 'max_len'):
    if cfg[key] <= 0:
      raise ConfigError(f'model.{key}={cfg[key]}; expected a positive integer')
  if not cfg.head_dim and cfg.d_model % cfg.n_heads:
    raise ConfigError(f'model.n_heads={cfg.n_heads} does not divide model.d_model={cfg.d_model}')
  if cfg.n_heads % cfg.n_kv_heads:
    raise ConfigError(f'model.n_kv_heads={cfg.n_kv_heads} does not divide '
                      f'model.n_heads={cfg.n_heads}')
  if cfg.positions == 'rope' and head_dim(cfg) % 2:
    raise ConfigError(f'model.head_dim={head_dim(cfg)} is odd; RoPE needs an even head dim')
  if cfg.attention_backend not in available_backends():
    raise ConfigError(f'model.attention_backend={cfg.attention_backend!r}; expected one of '
                      f'{available_backends()}')
  if n_experts(cfg):
    if not 1 <= cfg.moe_top_k <= cfg.moe_experts:
      raise ConfigError(f'model.moe_top_k={cfg.moe_top_k}; expected 1..model.moe_experts='
                        f'{cfg.moe_experts}')
    if cfg.moe_capacity_factor <= 0:
      raise ConfigError(f'model.moe_capacity_factor={cfg.moe_capacity_factor}; expected > 0')
  if not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f'model.dropout={cfg.dropout}; expected a value in [0, 1)')


def _norm_specs(cfg) -> dict:
  specs = {'scale': ps.ParamSpec((cfg.d_model,), ps.ones, ('embed',))}
  if cfg.norm == 'layernorm' and cfg.bias:  # nanoGPT's bias=False drops LayerNorm biases too
    specs['bias'] = ps.ParamSpec((cfg.d_model,), ps.zeros, ('embed',))
  return specs


def _mlp_specs(cfg, std: float, out_std: float) -> dict:
  D, F = cfg.d_model, cfg.d_ff
  if cfg.mlp == 'swiglu':
    return {'w_gate': ps.ParamSpec((D, F), ps.normal(std), ('embed', 'mlp')),
            'w_up': ps.ParamSpec((D, F), ps.normal(std), ('embed', 'mlp')),
            'w_down': ps.ParamSpec((F, D), ps.normal(out_std), ('mlp', 'embed'))}
  specs = {'w_in': ps.ParamSpec((D, F), ps.normal(std), ('embed', 'mlp')),
           'w_out': ps.ParamSpec((F, D), ps.normal(out_std), ('mlp', 'embed'))}
  if cfg.bias:
    specs |= {'b_in': ps.ParamSpec((F,), ps.zeros, ('mlp',)),
              'b_out': ps.ParamSpec((D,), ps.zeros, ('embed',))}
  return specs


def param_specs(cfg) -> dict:
  """ParamSpecs; residual output projections use std / sqrt(2 n_layers) as in GPT-2."""
  validate(cfg)
  std = cfg.init_std
  out_std = std / math.sqrt(2 * cfg.n_layers)
  block = {
      'attn_norm': _norm_specs(cfg),
      'attn': attention.attention_specs(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim(cfg),
                                        bias=cfg.bias, std=std, out_std=out_std),
      'mlp_norm': _norm_specs(cfg),
      'mlp': (moe.moe_specs(cfg.d_model, cfg.d_ff, cfg.moe_experts, mlp=cfg.mlp, std=std,
                            out_std=out_std) if n_experts(cfg) else _mlp_specs(cfg, std, out_std)),
  }
  specs = {
      'embed': {'tokens': ps.ParamSpec((cfg.vocab_size, cfg.d_model), ps.normal(std),
                                       ('vocab', 'embed'))},
      'blocks': jax.tree.map(lambda s: ps.stack(s, cfg.n_layers), block, is_leaf=ps.is_spec),
      'final_norm': _norm_specs(cfg),
  }
  if cfg.positions == 'learned':
    specs['embed']['positions'] = ps.ParamSpec((cfg.max_len, cfg.d_model), ps.normal(std / 2),
                                               (None, 'embed'))
  if not cfg.tie_embeddings:
    specs['head'] = ps.ParamSpec((cfg.d_model, cfg.vocab_size), ps.normal(std), ('embed', 'vocab'))
  return specs


def _norm(cfg, p: dict, x_BTD):
  if cfg.norm == 'rmsnorm':
    return norms.rms_norm(x_BTD, p['scale'], cfg.norm_eps)
  return norms.layer_norm(x_BTD, p['scale'], p.get('bias'), cfg.norm_eps)


def _mlp(cfg, p: dict, x_BTD, exact_moe: bool):
  """(y_BTD, aux): aux is the MoE routing statistics ({} for a dense MLP)."""
  if n_experts(cfg):
    kw = dict(top_k=cfg.moe_top_k, renormalize=cfg.moe_renormalize)
    if exact_moe:
      return moe.moe_dense(p, x_BTD, **kw)
    if jax.sharding.get_abstract_mesh().empty:
      return moe.moe_capacity(p, x_BTD, capacity_factor=cfg.moe_capacity_factor, **kw)
    return expert_dispatch.moe_expert_parallel(p, x_BTD, capacity_factor=cfg.moe_capacity_factor,
                                               **kw)
  if cfg.mlp == 'swiglu':
    return mlp.swiglu_mlp(x_BTD, p['w_gate'], p['w_up'], p['w_down']), {}
  return mlp.gelu_mlp(x_BTD, p['w_in'], p.get('b_in'), p['w_out'], p.get('b_out')), {}


def embed_tokens(params, tokens_BT) -> jax.Array:
  """x_BTD = E[tokens_BT], the token-embedding rows without positions: the text part of the
  embeds_BTD that forward_hidden and prefill accept instead of token ids (a VLM merges image
  embeddings into it)."""
  # Gather rows from a table whose vocab dim is whole: XLA's partitioner cannot gather from a
  # vocab-parallel table efficiently (it replicates the whole table and warns).
  table_VD = constrain(params['embed']['tokens'], (None, 'act_embed'))
  return table_VD[tokens_BT]


def _input_shape(tokens_BT, embeds_BTD) -> tuple[int, int]:
  """(B, T) of the one input given: token ids or input embeddings."""
  if (tokens_BT is None) == (embeds_BTD is None):
    raise ValueError('expected exactly one of tokens_BT and embeds_BTD, got '
                     f'{"both" if tokens_BT is not None else "neither"}')
  return (tokens_BT if embeds_BTD is None else embeds_BTD).shape[:2]


def _embed(cfg, params, tokens_BT, positions_BT, embeds_BTD=None):
  """E[tokens_BT] (or the given embeds_BTD) plus learned positions when the model has them."""
  x_BTD = embed_tokens(params, tokens_BT) if embeds_BTD is None else embeds_BTD
  if cfg.positions == 'learned':
    x_BTD = x_BTD + constrain(params['embed']['positions'], (None, 'act_embed'))[positions_BT]
  return x_BTD


def unembed(cfg, params, h_BTD):
  """The LM head: logits_BTV of final-normed hidden states h_BTD (tied or untied)."""
  if cfg.tie_embeddings:
    logits_BTV = jnp.einsum('BTD,VD->BTV', h_BTD, params['embed']['tokens'])
  else:
    logits_BTV = jnp.einsum('BTD,DV->BTV', h_BTD, params['head'])
  return constrain(logits_BTV, ('batch', 'length', 'act_vocab'))


def _logits(cfg, params, x_BTD):
  return unembed(cfg, params, _norm(cfg, params['final_norm'], x_BTD))


def _block(cfg, p, x_BTD, positions_BT, rng, attend, exact_moe):
  """One pre-norm block -> (x_BTD, (kv, moe aux)); `attend(q, k, v) -> (o, kv)` decides where
  keys and values come from."""
  rngs = (None, None) if rng is None else jax.random.split(rng, 2)
  x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
  q_BTNH, k_BTKH, v_BTKH = attention.project_qkv(p['attn'], _norm(cfg, p['attn_norm'], x_BTD))
  q_BTNH = constrain(q_BTNH, ('batch', 'length', 'act_heads', None))
  k_BTKH = constrain(k_BTKH, ('batch', 'length', 'act_kv_heads', None))
  v_BTKH = constrain(v_BTKH, ('batch', 'length', 'act_kv_heads', None))
  if cfg.positions == 'rope':
    q_BTNH = rope.apply_rope(q_BTNH, positions_BT, cfg.rope_theta)
    k_BTKH = rope.apply_rope(k_BTKH, positions_BT, cfg.rope_theta)
  o_BTNH, kv = attend(q_BTNH, k_BTKH, v_BTKH)
  x_BTD = x_BTD + dropout(attention.project_out(p['attn'], o_BTNH), cfg.dropout, rngs[0])
  y_BTD, aux = _mlp(cfg, p['mlp'], _norm(cfg, p['mlp_norm'], x_BTD), exact_moe)
  x_BTD = x_BTD + dropout(y_BTD, cfg.dropout, rngs[1])
  return x_BTD, (kv, aux)


def _run_blocks(cfg, params, x_BTD, positions_BT, rng, attend, per_layer=None, exact_moe=True):
  """Scans the stacked blocks -> (x_BTD, (kv per layer, MoE aux per layer)); `per_layer` is
  scanned alongside (e.g. one layer's KV cache)."""
  layer_rngs = None if rng is None else jax.random.split(rng, cfg.n_layers)

  def body(x_BTD, xs):
    p, layer_rng, layer_state = xs
    return _block(cfg, p, x_BTD, positions_BT, layer_rng,
                  lambda q, k, v: attend(q, k, v, layer_state), exact_moe)

  if cfg.remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, x_BTD, (params['blocks'], layer_rngs, per_layer))


def forward(cfg, params, tokens_BT: jax.Array, **kwargs) -> jax.Array:
  """Causal LM logits_BTV (in the params' dtype); see forward_with_aux for the arguments."""
  return forward_with_aux(cfg, params, tokens_BT, **kwargs)[0]


def forward_with_aux(cfg, params, tokens_BT: jax.Array, *, segment_ids_BT=None,
                     positions_BT=None, rng=None, train: bool = False):
  """(logits_BTV, aux) for tokens_BT; dropout only when train. aux holds the MoE routing
  statistics stacked over layers ({} for dense MLPs): dropped, load_E, load_balance_loss.

  With packed sequences (segment_ids_BT), pass positions_BT that restart at each segment.
  """
  h_BTD, aux = forward_hidden(cfg, params, tokens_BT, segment_ids_BT=segment_ids_BT,
                              positions_BT=positions_BT, rng=rng, train=train)
  return unembed(cfg, params, h_BTD), aux


def forward_hidden(cfg, params, tokens_BT: jax.Array | None, *, embeds_BTD=None,
                   segment_ids_BT=None, positions_BT=None, rng=None, train: bool = False):
  """(h_BTD, aux): the final-normed hidden states, the LM head's input (Medusa's heads read
  them too); arguments and aux as in forward_with_aux. With tokens_BT=None, embeds_BTD (e.g.
  embed_tokens' rows with image embeddings merged in) replaces the token-embedding lookup;
  learned positions are still added, as HF's inputs_embeds."""
  B, T = _input_shape(tokens_BT, embeds_BTD)
  if T > cfg.max_len:
    raise ValueError(f'sequence length {T} exceeds model.max_len={cfg.max_len}')
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  rng = rng if train else None
  embed_rng, block_rng = (None, None) if rng is None else jax.random.split(rng)
  x_BTD = dropout(_embed(cfg, params, tokens_BT, positions_BT, embeds_BTD), cfg.dropout,
                  embed_rng)

  def attend(q, k, v, _):
    o = flash_attention(q, k, v, causal=True, segment_ids=segment_ids_BT,
                        backend=cfg.attention_backend)
    return o, None

  x_BTD, (_, aux) = _run_blocks(cfg, params, x_BTD, positions_BT, block_rng, attend,
                                exact_moe=False)
  return _norm(cfg, params['final_norm'], x_BTD), aux


def prefill(cfg, params, tokens_BT: jax.Array | None, max_len: int, *, embeds_BTD=None):
  """Runs the prompt and returns (logits_BTV, cache) with room for max_len tokens in total.
  With tokens_BT=None the prompt is given as input embeddings embeds_BTD (as forward_hidden).

  cache = {'k': [L, B, max_len, K, H], 'v': [L, B, max_len, K, H], 'length': int32 scalar}.
  """
  B, T = _input_shape(tokens_BT, embeds_BTD)
  if not T <= max_len <= cfg.max_len:
    raise ValueError(f'prefill max_len={max_len}; expected prompt length {T} <= max_len <= '
                     f'model.max_len={cfg.max_len}')
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))

  def attend(q, k, v, _):
    pad = ((0, 0), (0, max_len - T), (0, 0), (0, 0))
    return flash_attention(q, k, v, causal=True, backend=cfg.attention_backend), (
        jnp.pad(k, pad), jnp.pad(v, pad))

  x_BTD = _embed(cfg, params, tokens_BT, positions_BT, embeds_BTD)
  x_BTD, ((k_LBSKH, v_LBSKH), _) = _run_blocks(cfg, params, x_BTD, positions_BT, None, attend)
  cache = {'k': k_LBSKH, 'v': v_LBSKH, 'length': jnp.asarray(T, jnp.int32)}
  return _logits(cfg, params, x_BTD), cache


def decode_step(cfg, params, tokens_B1: jax.Array, cache: dict):
  """Appends one token per row at position cache['length']; returns (logits_B1V, new cache).

  The query attends to the cached keys 0..length through kv segment ids (1 = filled, 0 = empty).
  The caller keeps length < max_len (as `lab.sampling.decode.generate` does by construction):
  the length is traced, so a full cache cannot be detected here.
  """
  B = tokens_B1.shape[0]
  S = cache['k'].shape[2]
  length = cache['length']
  positions_B1 = jnp.full((B, 1), length, jnp.int32)
  q_seg_B1 = jnp.ones((B, 1), jnp.int32)
  kv_seg_BS = jnp.broadcast_to((jnp.arange(S) <= length).astype(jnp.int32), (B, S))

  def attend(q, k, v, layer_cache):
    k_cache, v_cache = layer_cache
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), length, 1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), length, 1)
    o = flash_attention(q, k_cache, v_cache, segment_ids=(q_seg_B1, kv_seg_BS),
                        backend=cfg.attention_backend)
    return o, (k_cache, v_cache)

  x_B1D = _embed(cfg, params, tokens_B1, positions_B1)
  x_B1D, ((k_LBSKH, v_LBSKH), _) = _run_blocks(cfg, params, x_B1D, positions_B1, None, attend,
                                          (cache['k'], cache['v']))
  return _logits(cfg, params, x_B1D), {'k': k_LBSKH, 'v': v_LBSKH, 'length': length + 1}


def init_cache(cfg, batch: int, size: int, dtype=jnp.float32) -> dict:
  """An empty cache with room for `size` tokens, in the layout prefill and decode_step use; `size`
  may exceed model.max_len (extend's scratch room), positions may not."""
  shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, head_dim(cfg))
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype),
          'length': jnp.asarray(0, jnp.int32)}


def extend(cfg, params, tokens_BT: jax.Array, positions_BT: jax.Array, mask_BTT, cache: dict):
  """Runs T new tokens after the cache's `length` filled entries -> (logits_BTV, h_BTD, cache).

  Every new token attends to all cached entries 0..length-1 and, among the new tokens, to those
  its row of mask_BTT marks (True = visible; each token must see itself). mask_BTT=None is the
  causal chain (chunked prefill); a tree of candidates passes its ancestor mask and positions
  length + depth (Medusa, Cai et al. 2024, sec. 2.1.2 "tree attention"). h_BTD is the
  final-normed hidden state. The new keys and values are written at length..length+T-1 and
  `length` is left as it was: compact_cache keeps the accepted ones. Each layer attends through
  lab.nn.cached_attention.extend_attention (the cached prefix and the new block, merged by their
  log-sum-exps). The caller keeps length + T <= the cache size (the write would be clamped
  otherwise) and positions < model.max_len; both are traced, so not checked here.
  """
  B, T = tokens_BT.shape
  if positions_BT.shape != (B, T):
    raise ValueError(f'positions_BT shape {positions_BT.shape}; expected {(B, T)}')
  length = cache['length']

  def attend(q, k, v, layer_cache):
    o, k_cache, v_cache = cached_attention.extend_attention(
        q, k, v, *layer_cache, length, mask_BTT, backend=cfg.attention_backend)
    return o, (k_cache, v_cache)

  x_BTD = _embed(cfg, params, tokens_BT, positions_BT)
  x_BTD, ((k_LBSKH, v_LBSKH), _) = _run_blocks(cfg, params, x_BTD, positions_BT, None, attend,
                                               (cache['k'], cache['v']))
  h_BTD = _norm(cfg, params['final_norm'], x_BTD)
  return unembed(cfg, params, h_BTD), h_BTD, {'k': k_LBSKH, 'v': v_LBSKH, 'length': length}


def compact_cache(cache: dict, index_BA: jax.Array, count) -> dict:
  """Keeps entries written by extend: entry length + index_BA[b, a] moves to length + a, then
  length advances by count (<= A), as Medusa keeps the accepted path's keys and values. The
  caller keeps length + A <= the cache size."""
  length = cache['length']
  return {'k': cached_attention.compact(cache['k'], length, index_BA),
          'v': cached_attention.compact(cache['v'], length, index_BA), 'length': length + count}
