"""Choosing the next token from logits: greedy, temperature, top-k (Fan et al. 2018) and
nucleus / top-p (Holtzman et al. 2020)."""
import jax
import jax.numpy as jnp


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets to -inf every logit outside the top_k largest (0: all) and outside the smallest set
  whose probabilities sum to at least top_p (1.0: all)."""
  logits_BV = logits_BV.astype(jnp.float32)
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # a token stays if the mass of the tokens strictly above it is still below top_p
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    n_keep_B = jnp.sum(mass_above_BV < top_p, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B[:, None] - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return logits_BV


def choose(logits_BV: jax.Array, rng: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """Next tokens_B: argmax when temperature == 0, else a draw from softmax(filtered / temperature)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, filtered_BV / temperature, axis=-1).astype(jnp.int32)
