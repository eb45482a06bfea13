"""Inverted dropout (Srivastava et al. 2014, "Dropout: A Simple Way to Prevent Neural Networks from
Overfitting", sec. 4): r ~ Bernoulli(1 - rate) per element, y = r * x / (1 - rate). Scaling the
kept values at training time instead of the weights at test time keeps E[y] = x, so evaluation
is the identity."""
import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """y (x's shape and dtype) of the formula above; x itself when rng is None or rate == 0.

  rate: a Python float in [0, 1); rng: a jax.random key, or None for evaluation.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate={rate}; expected a value in [0, 1)')
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
