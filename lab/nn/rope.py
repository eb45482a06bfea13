"""Rotary position embeddings (Su et al. 2021, RoFormer eq. 34), in the half-split layout.

Dimension i of the first half is rotated together with dimension i + H/2 (Llama's and
Hugging Face's `rotate_half` layout), by the angle position * theta^(-2i/H).
"""
import jax
import jax.numpy as jnp


def rope_angles(positions_BT: jax.Array, head_dim: int, theta: float,
                dtype=jnp.float32) -> jax.Array:
  """Angles_BTh = position * theta^(-2i/H) for i < H/2, in dtype (at least float32)."""
  if head_dim % 2:
    raise ValueError(f'RoPE head_dim={head_dim}; expected an even number')
  inv_freq_h = theta ** (-jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim)
  return positions_BT.astype(dtype)[..., None] * inv_freq_h


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (x_i, x_{i+H/2}) of every head by the angle of the token's position."""
  x = x_BTNH.astype(jnp.promote_types(x_BTNH.dtype, jnp.float32))
  angles_BTh = rope_angles(positions_BT, x_BTNH.shape[-1], theta, x.dtype)
  cos, sin = jnp.cos(angles_BTh)[:, :, None, :], jnp.sin(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return y.astype(x_BTNH.dtype)
