"""Answers of a vision-language model (lab.models.vlm) decoded with the LLM's KV cache.

The prompt <bos> <image> x M question <sep> enters as input embeddings (the ViT -> connector
outputs merged at the placeholders): one prefill over them fills the cache, then
lab.sampling.decode.decode_after_prefill appends one text token a step, as LLaVA's generate
does with inputs_embeds. Images are encoded once, in the prefill.
"""
from __future__ import annotations

import jax

from lab.models import transformer, vlm
from lab.sampling import decode


def generate(cfg, params, images_BXYC: jax.Array, prompt_BT: jax.Array, num_new: int,
             rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0) -> jax.Array:
  """new_BN, N = num_new tokens after the prompts (all of one length T, with M placeholders per
  row; temperature 0 is greedy). Token n is drawn from p(. | e_BT, new_<n) of the decoder over
  the merged embeddings e_BT (lab.models.vlm.input_embeddings). Jit it with cfg, num_new and the
  sampling settings static."""
  if num_new < 1:
    raise ValueError(f'num_new={num_new}; expected at least one token to generate')
  lcfg = vlm.llm_config(cfg)
  e_BTD = vlm.input_embeddings(cfg, params, images_BXYC, prompt_BT)
  logits_BTV, cache = transformer.prefill(lcfg, params['llm'], None,
                                          prompt_BT.shape[1] + num_new, embeds_BTD=e_BTD)
  return decode.decode_after_prefill(transformer, lcfg, params['llm'], logits_BTV[:, -1], cache,
                                     num_new, rng, temperature=temperature, top_k=top_k,
                                     top_p=top_p)
