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


def group_norm(x_BXYC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, groups: int,
               eps: float = 1e-5) -> jax.Array:
  """GroupNorm (Wu & He 2018, eqs. 1-3 with S_i of eq. 7): the channels split into `groups`
  groups of C / groups; each example's mean and variance are taken over the spatial axes and the
  channels of one group, y = (x - mean) / sqrt(var + eps) * scale + bias. Every axis between the
  first (batch) and the last (channels) counts as spatial, so x_BC and x_BTC work too."""
  C = x_BXYC.shape[-1]
  if groups < 1 or C % groups:
    raise ValueError(f'group_norm groups={groups}; expected a positive divisor of the {C} channels')
  x = x_BXYC.astype(jnp.promote_types(x_BXYC.dtype, jnp.float32))
  x_BXYGc = x.reshape(*x.shape[:-1], groups, C // groups)
  axes = (*range(1, x.ndim - 1), x.ndim)
  mean = x_BXYGc.mean(axes, keepdims=True)
  var = jnp.square(x_BXYGc - mean).mean(axes, keepdims=True)
  y = ((x_BXYGc - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return (y * scale_C.astype(x.dtype) + bias_C.astype(x.dtype)).astype(x_BXYC.dtype)
