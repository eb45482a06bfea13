"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token a step."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.sampling import logits_filters


def generate(model, cfg, params, prompt_BT: jax.Array, num_new: int, rng: jax.Array, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """tokens_B(T+num_new): the prompt followed by num_new decoded tokens.

  `model` is a module with prefill(cfg, params, tokens_BT, max_len) -> (logits, cache) and
  decode_step(cfg, params, tokens_B1, cache) -> (logits_B1V, cache). Jit it with cfg, model,
  num_new and the sampling settings static.
  """
  if num_new < 1:
    raise ValueError(f'num_new={num_new}; expected at least one token to generate')
  B, T = prompt_BT.shape
  logits_BTV, cache = model.prefill(cfg, params, prompt_BT, T + num_new)
  new_BN = decode_after_prefill(model, cfg, params, logits_BTV[:, -1], cache, num_new, rng,
                                temperature=temperature, top_k=top_k, top_p=top_p)
  return jnp.concatenate([prompt_BT, new_BN], axis=1)


def decode_after_prefill(model, cfg, params, last_logits_BV: jax.Array, cache, num_new: int,
                         rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                         top_p: float = 1.0) -> jax.Array:
  """new_BN, N = num_new: the first token picked from the prefill's last logits, then N - 1
  model.decode_step calls over the cache, which needs room for N - 1 more entries. Token n uses
  key n of jax.random.split(rng, N), whatever filled the cache (token ids, or a VLM's merged
  embeddings)."""
  if num_new < 1:
    raise ValueError(f'num_new={num_new}; expected at least one token to generate')
  pick = lambda logits_BV, key: logits_filters.choose(logits_BV, key, temperature=temperature,
                                                      top_k=top_k, top_p=top_p)
  keys = jax.random.split(rng, num_new)
  first_B = pick(last_logits_BV, keys[0])

  def body(carry, key):
    token_B, cache = carry
    logits_B1V, cache = model.decode_step(cfg, params, token_B[:, None], cache)
    next_B = pick(logits_B1V[:, 0], key)
    return (next_B, cache), next_B

  _, rest_NB = jax.lax.scan(body, (first_B, cache), keys[1:])
  return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)
