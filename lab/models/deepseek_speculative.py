"""DeepSeek-V3 as the base model of speculative decoding: blocks of tokens over the MLA cache.

`extend` runs T new tokens (a causal chain or a tree of candidates under its ancestor mask)
through the main model against its compressed cache (c^KV and k^R per layer, lab.nn.mla's
absorbed form), writing their entries without advancing the length; `compact_cache` keeps the
accepted ones. `decoder(cfg)` packages both as a lab.sampling.medusa.Decoder over
(params, routing bias) pairs, so the same tree-verification loop serves DeepSeek with any draft,
its own MTP modules included (lab.sampling.mtp_draft). Routing is exact (dense dispatch).

`mtp_extend` runs one MTP module (V3 §2.2, eqs. 21-23) over new rows against that module's own
MLA cache, for the MTP draft.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.models import deepseek
from lab.nn import cached_attention, mla


def _empty_layer_cache(cfg, layers: int, batch: int, size: int, dtype) -> dict:
  zeros = lambda width: jnp.zeros((layers, batch, size, width), dtype)
  return {'c_kv': zeros(cfg.kv_lora_rank), 'k_rope': zeros(cfg.qk_rope_dim)}


def init_cache(cfg, batch: int, size: int, dtype=jnp.float32) -> dict:
  """An empty main-model cache with room for `size` tokens: {'layers': {'dense': ..., 'moe':
  ...} each {'c_kv': [L, B, size, C], 'k_rope': [L, B, size, R]}, 'length': 0}, the layout of
  lab.models.deepseek.prefill."""
  layers = {'moe': _empty_layer_cache(cfg, deepseek.n_moe_layers(cfg), batch, size, dtype)}
  if cfg.first_dense_layers:
    layers['dense'] = _empty_layer_cache(cfg, cfg.first_dense_layers, batch, size, dtype)
  return {'layers': layers, 'length': jnp.asarray(0, jnp.int32)}


def _extend_attend(cfg, positions_BT, mask_BTT, length):
  def attend(p, h_BTD, layer_cache):
    y_BTD, new = mla.mla_extend(p, h_BTD, positions_BT, mask_BTT, {**layer_cache,
                                                                   'length': length},
                                rope_theta=cfg.rope_theta, backend=cfg.attention_backend,
                                eps=cfg.norm_eps, fp8=cfg.fp8)
    return y_BTD, {'c_kv': new['c_kv'], 'k_rope': new['k_rope']}
  return attend


def extend(cfg, params, state, tokens_BT: jax.Array, positions_BT: jax.Array, mask_BTT,
           cache: dict):
  """T new tokens after the cache's `length` entries -> (logits_BTV, h_BTD, cache).

  mask_BTT: which new tokens each new token sees (None: causal); positions_BT their positions.
  h_BTD is h^0, the last block's output before the final norm: the MTP modules' input (eq. 21).
  The new entries are written at length..length+T-1 and the length stays (compact_cache).
  """
  B, T = tokens_BT.shape
  if positions_BT.shape != (B, T):
    raise ValueError(f'positions_BT shape {positions_BT.shape}; expected {(B, T)}')
  attend = _extend_attend(cfg, positions_BT, mask_BTT, cache['length'])
  logits_BTV, h_BTD, caches, _ = deepseek.main_model(cfg, params, state, tokens_BT, attend,
                                                     cache['layers'], 'dense')
  return logits_BTV, h_BTD, {'layers': caches, 'length': cache['length']}


def compact_cache(cache: dict, index_BA: jax.Array, count) -> dict:
  """Entry length + index_BA[b, a] moves to length + a in every layer; length += count."""
  length = cache['length']
  move = lambda x_LBSX: cached_attention.compact(x_LBSX, length, index_BA)
  return {'layers': jax.tree.map(move, cache['layers']), 'length': length + count}


def decoder(cfg):
  """lab.sampling.medusa.Decoder over params = (model params, routing bias)."""
  from lab.sampling import medusa
  return medusa.Decoder(
      init_cache=lambda params_state, batch, size: init_cache(
          cfg, batch, size, params_state[0]['embed'].dtype),
      extend=lambda params_state, *args: extend(cfg, *params_state, *args),
      compact=compact_cache, max_len=cfg.max_len)


def init_mtp_cache(cfg, batch: int, size: int, dtype=jnp.float32) -> list[dict]:
  """One empty MLA cache per MTP module: {'c_kv': [B, size, C], 'k_rope': [B, size, R],
  'length': 0}."""
  return [{'c_kv': jnp.zeros((batch, size, cfg.kv_lora_rank), dtype),
           'k_rope': jnp.zeros((batch, size, cfg.qk_rope_dim), dtype),
           'length': jnp.asarray(0, jnp.int32)} for _ in range(cfg.mtp_depth)]


def mtp_extend(cfg, params, state, k: int, h_BRD: jax.Array, tokens_BR: jax.Array,
               cache: dict):
  """MTP module k+1 (0-based k) on R new rows at positions length..length+R-1 of its cache,
  causal among them -> (logits_BRV, h^{k+1}_BRD, cache with the rows written, length kept).
  h_BRD is h^k of those positions and tokens_BR the tokens k+1 ahead of each (eq. 21)."""
  B, R = tokens_BR.shape
  length = cache['length']
  positions_BR = jnp.broadcast_to(length + jnp.arange(R), (B, R))

  def attend(p, h_BRD, _):
    y_BRD, new = mla.mla_extend(p, h_BRD, positions_BR, None, cache, rope_theta=cfg.rope_theta,
                                backend=cfg.attention_backend, eps=cfg.norm_eps, fp8=cfg.fp8)
    return y_BRD, new

  logits_BRV, h_BRD, (new_cache, _) = deepseek.mtp_module(cfg, params, state, k, h_BRD,
                                                          tokens_BR, attend, 'dense')
  return logits_BRV, h_BRD, new_cache

