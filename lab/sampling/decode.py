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
  pick = lambda logits_BV, key: logits_filters.choose(logits_BV, key, temperature=temperature,
                                                      top_k=top_k, top_p=top_p)
  keys = jax.random.split(rng, num_new)
  first_B = pick(logits_BTV[:, -1], keys[0])

  def body(carry, key):
    token_B, cache = carry
    logits_B1V, cache = model.decode_step(cfg, params, token_B[:, None], cache)
    next_B = pick(logits_B1V[:, 0], key)
    return (next_B, cache), next_B

  _, rest_NB = jax.lax.scan(body, (first_B, cache), keys[1:])
  return jnp.concatenate([prompt_BT, first_B[:, None], rest_NB.T], axis=1)
