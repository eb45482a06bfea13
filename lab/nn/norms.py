"""Normalisation layers. Statistics are computed in at least float32 (float64 stays float64)."""
import jax
import jax.numpy as jnp


def layer_norm(x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array | None,
               eps: float = 1e-5) -> jax.Array:
  """LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""
  x = x_BTD.astype(jnp.promote_types(x_BTD.dtype, jnp.float32))
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  y = (x - mean) * jax.lax.rsqrt(var + eps) * scale_D.astype(x.dtype)
  if bias_D is not None:
    y = y + bias_D.astype(x.dtype)
  return y.astype(x_BTD.dtype)


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float = 1e-6) -> jax.Array:
  """RMSNorm (Zhang & Sennrich 2019, eq. 4): y = x / sqrt(mean(x^2) + eps) * scale."""
  x = x_BTD.astype(jnp.promote_types(x_BTD.dtype, jnp.float32))
  y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
  return (y * scale_D.astype(x.dtype)).astype(x_BTD.dtype)
