"""Float64 finite-difference gradients of NumPy oracles, shared by the layer tests."""
import jax
import jax.numpy as jnp
import numpy as np


def oracle_vjp(oracle, args, ct, eps=1e-6):
  """J^T ct of the float64 `oracle`, by central differences one input coordinate at a time."""
  grads = []
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
      e = np.zeros_like(a)
      e[idx] = eps
      shifted = lambda sign: oracle(*(x + sign * e if j == i else x for j, x in enumerate(args)))
      g[idx] = np.vdot(ct, (shifted(1) - shifted(-1)) / (2 * eps))
    grads.append(g)
  return grads


def assert_vjp_matches_oracle(f, oracle, args, rng):
  """The float32 jax.vjp of `f` equals the float64 finite-difference vjp of `oracle`."""
  args_f32 = [jnp.asarray(a, jnp.float32) for a in args]
  ct = rng.standard_normal(jax.eval_shape(f, *args_f32).shape)
  f_vjp = jax.jit(lambda ct, *args: jax.vjp(f, *args)[1](ct))
  for got, want in zip(f_vjp(jnp.asarray(ct, jnp.float32), *args_f32),
                       oracle_vjp(oracle, args, ct)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def draw_segments(rng, B: int, T: int, S: int, kind):
  """Segment ids for attention tests: None; 'one', sorted ids in 0..2 as packed sequences give
  (T == S); or 'pair', q ids in 0..3 and kv ids in 0..2, so queries of segment 3 see no key."""
  if kind is None:
    return None
  if kind == 'one':
    return np.sort(rng.integers(0, 3, (B, T)), axis=1)
  return rng.integers(0, 4, (B, T)), rng.integers(0, 3, (B, S))


def as_jax_segments(seg):
  """draw_segments' ids as int32 jax arrays (a pair stays a pair)."""
  if isinstance(seg, tuple):
    return tuple(jnp.asarray(s, jnp.int32) for s in seg)
  return None if seg is None else jnp.asarray(seg, jnp.int32)
