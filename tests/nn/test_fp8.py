"""DeepSeek-V3 fine-grained FP8 (arXiv 2412.19437 §3.3) against float64 NumPy oracles that
quantise with ml_dtypes' e4m3, the analytic e4m3 error bound, and per-tensor scaling."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from lab.nn import fp8

U = 2.0 ** -4    # e4m3 unit roundoff: 3 mantissa bits, round to nearest
SUB = 2.0 ** -10  # half the e4m3 subnormal spacing 2^-9, in units of the scale: worst abs. error


def np_fake_quant(x, rows, cols):
  """e4m3(x / s) * s for a 2-D x, s = amax / 448 per rows x cols group (zero-padded ragged edges,
  s = 1 for an all-zero group); returns (dequantised, s broadcast to x), float64."""
  R, C = x.shape
  pad = np.pad(np.float32(x), ((0, -R % rows), (0, -C % cols)))
  g = pad.reshape(pad.shape[0] // rows, rows, pad.shape[1] // cols, cols)
  amax = np.abs(g).max((1, 3), keepdims=True)
  s = np.where(amax > 0, amax * np.float32(1 / 448), np.float32(1))  # f32, as the code does
  q = (g / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  s = np.broadcast_to(s, g.shape).astype(np.float64)
  return [a.reshape(pad.shape)[:R, :C] for a in (q * s, s)]


def heavy_tailed(rng, shape):
  """Gaussian values with magnitudes 10^U(-2, 2) per row and a few outlier columns (x100), as LLM
  activations have; rounded to float32."""
  x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, shape[:-1] + (1,))
  x[..., rng.choice(shape[-1], 3, replace=False)] *= 100
  return x.astype(np.float32).astype(np.float64)


def assert_within_e4m3_bound(deq, x, s):
  err = np.abs(deq - x)
  assert np.all(err <= U * np.abs(x) + SUB * s + 1e-6 * np.abs(x))
  normal = np.abs(x) >= 2.0 ** -6 * s
  assert (err[normal] / np.abs(x[normal])).max() > U / 4  # it really rounds to 3 bits


@pytest.mark.parametrize('seed', range(2))
def test_tiles_scales_and_roundtrip(seed):
  x_BTD = heavy_tailed(np.random.default_rng(seed), (3, 4, 300))  # 300: ragged last tile of 44
  q_BTD, s_BTJ = fp8.quantize_tiles(jnp.asarray(x_BTD, jnp.float32))
  assert q_BTD.dtype == jnp.float8_e4m3fn and q_BTD.shape == x_BTD.shape
  amax_BTJ = np.stack([np.abs(x_BTD[..., j:j + 128]).max(-1) for j in (0, 128, 256)], -1)
  np.testing.assert_allclose(s_BTJ, amax_BTJ / 448, rtol=1e-6)
  q_BTD = np.asarray(q_BTD, np.float64)
  assert np.all(np.stack([np.abs(q_BTD[..., j:j + 128]).max(-1) for j in (0, 128, 256)]) == 448)
  deq_BTD = np.asarray(fp8.dequantize_tiles(jnp.asarray(q_BTD, jnp.float8_e4m3fn), s_BTJ),
                       np.float64)
  assert_within_e4m3_bound(deq_BTD, x_BTD,
                           np.repeat(np.asarray(s_BTJ, np.float64), 128, -1)[..., :300])
  tiles = lambda a_BTD: a_BTD[..., :256].reshape(12, 2, 128)  # the full tiles
  at = np.abs(tiles(x_BTD)).argmax(-1)[..., None]
  np.testing.assert_allclose(np.take_along_axis(tiles(deq_BTD), at, -1),
                             np.take_along_axis(tiles(x_BTD), at, -1), rtol=1e-6)  # amax exact
  np.testing.assert_allclose(deq_BTD.reshape(12, 300),
                             np_fake_quant(x_BTD.reshape(12, 300), 1, 128)[0], rtol=1e-6)


def test_blocks_scales_and_roundtrip():
  w_DF = heavy_tailed(np.random.default_rng(5), (300, 200))
  q_DF, s_JI = fp8.quantize_blocks(jnp.asarray(w_DF, jnp.float32))
  assert q_DF.dtype == jnp.float8_e4m3fn and q_DF.shape == w_DF.shape
  np.testing.assert_allclose(s_JI, [[np.abs(w_DF[i:i + 128, j:j + 128]).max() / 448
                                     for j in (0, 128)] for i in (0, 128, 256)], rtol=1e-6)
  assert np.abs(np.asarray(q_DF, np.float64)).max() == 448
  deq_DF, s_DF = np_fake_quant(w_DF, 128, 128)
  np.testing.assert_allclose(fp8.dequantize_blocks(q_DF, s_JI), deq_DF, rtol=1e-6)
  assert_within_e4m3_bound(deq_DF, w_DF, s_DF)


def test_per_tile_scale_keeps_the_small_tile():
  rng = np.random.default_rng(0)
  big, small = 1e3 * rng.uniform(0.5, 1, 128), 1e-3 * rng.uniform(0.5, 1, 128)
  x = jnp.asarray(np.concatenate([big, small])[None], jnp.float32)
  per_tile = np.asarray(fp8.dequantize_tiles(*fp8.quantize_tiles(x)))[0, 128:]
  per_tensor = np.asarray(fp8.dequantize_tiles(*fp8.quantize_tiles(x, tile=256), tile=256))
  assert np.all(per_tensor[0, 128:] == 0)  # 1e-3 / (1e3 / 448) < 2^-10: flushed
  assert np.all(np.abs(per_tile - small) <= U * small)


def draw_linear(seed, B=2, T=100, D=320, F=192):  # 200 tokens, D and F ragged in 128
  rng = np.random.default_rng(seed)
  w_DF = heavy_tailed(rng, (D, F)) / np.sqrt(D)
  return rng, heavy_tailed(rng, (B, T, D)), w_DF


@pytest.mark.parametrize('seed', range(2))
def test_fp8_dot_forward(seed):
  _, x_BTD, w_DF = draw_linear(seed)
  y_BTF = fp8.fp8_dot(jnp.asarray(x_BTD, jnp.float32), jnp.asarray(w_DF, jnp.float32))
  x_TD, y_TF = x_BTD.reshape(-1, x_BTD.shape[-1]), np.asarray(y_BTF, np.float64).reshape(200, -1)
  (xq_TD, sx_TD), (wq_DF, sw_DF) = np_fake_quant(x_TD, 1, 128), np_fake_quant(w_DF, 128, 128)
  scale_TF = np.abs(x_TD) @ np.abs(w_DF)
  assert np.all(np.abs(y_TF - xq_TD @ wq_DF) <= 1e-5 * scale_TF)  # same tiles; f32 sums
  # Analytic bound: |x^ - x| <= E_x = U|x| + SUB s_x, same for w; |x^w^ - xw| <= E_x|w| + |x|E_w
  # + E_x E_w, summed over D.
  ex_TD, ew_DF = U * np.abs(x_TD) + SUB * sx_TD, U * np.abs(w_DF) + SUB * sw_DF
  bound_TF = ex_TD @ np.abs(w_DF) + np.abs(x_TD) @ ew_DF + ex_TD @ ew_DF + 1e-5 * scale_TF
  err_TF = y_TF - x_TD @ w_DF
  assert np.all(np.abs(err_TF) <= bound_TF)
  # One scale for x and one for w (per-tensor) loses the small tokens: much worse per token.
  xt_TD, wt_DF = np_fake_quant(x_TD, *x_TD.shape)[0], np_fake_quant(w_DF, *w_DF.shape)[0]
  row_err = lambda e_TF: np.mean(np.linalg.norm(e_TF, axis=1) /
                                 np.linalg.norm(x_TD @ w_DF, axis=1))
  assert row_err(err_TF) < 0.5 * row_err(xt_TD @ wt_DF - x_TD @ w_DF)


@pytest.mark.parametrize('seed', range(2))
def test_fp8_dot_gradients(seed):
  rng, x_BTD, w_DF = draw_linear(seed)
  ct_BTF = heavy_tailed(rng, x_BTD.shape[:-1] + (w_DF.shape[1],))
  loss = lambda x, w: jnp.sum(fp8.fp8_dot(x, w) * jnp.asarray(ct_BTF, jnp.float32))
  dx_BTD, dw_DF = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(x_BTD, jnp.float32),
                                                  jnp.asarray(w_DF, jnp.float32))
  x_TD, ct_TF = x_BTD.reshape(200, -1), ct_BTF.reshape(200, -1)
  # Dgrad: ct in 1x128 tiles along F, w in its 128x128 blocks. Wgrad: the cached fp8 x and ct,
  # (re-)quantised in 128x1 tiles along the 200 tokens.
  want_dx_TD = np_fake_quant(ct_TF, 1, 128)[0] @ np_fake_quant(w_DF, 128, 128)[0].T
  xq_TD = np_fake_quant(x_TD, 1, 128)[0]
  want_dw_DF = np_fake_quant(xq_TD, 128, 1)[0].T @ np_fake_quant(ct_TF, 128, 1)[0]
  for got, want, exact, scale in (
      (dx_BTD, want_dx_TD, ct_TF @ w_DF.T, np.abs(ct_TF) @ np.abs(w_DF.T)),
      (dw_DF, want_dw_DF, x_TD.T @ ct_TF, np.abs(x_TD.T) @ np.abs(ct_TF))):
    got = np.asarray(got, np.float64).reshape(want.shape)
    assert np.all(np.abs(got - want) <= 1e-5 * scale)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 3e-3 < rel < 0.06  # really quantised, yet close to the exact gradient


def train_mlp(use_fp8, steps=50):
  """A 64-256-16 GELU MLP regressing y = sin(3 x A) B on 2048 points with Adam(1e-2), every
  linear through fp8.linear; returns (first, final) loss."""
  rng = np.random.default_rng(0)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x_TD = f32(rng.standard_normal((2048, 64)))
  a_DD, b_DF = f32(rng.standard_normal((64, 64)) / 8), f32(rng.standard_normal((64, 16)) / 8)
  y_TF = jnp.sin(3 * x_TD @ a_DD) @ b_DF
  params = {'w1': f32(rng.standard_normal((64, 256)) / 8),
            'w2': f32(rng.standard_normal((256, 16)) / 16)}
  def loss_fn(p, x_TD, y_TF):
    h_TF = jax.nn.gelu(fp8.linear(x_TD, p['w1'], fp8=use_fp8))
    return jnp.mean((fp8.linear(h_TF, p['w2'], fp8=use_fp8) - y_TF) ** 2)
  opt = optax.adam(1e-2)
  @jax.jit
  def step(p, s, x_TD, y_TF):
    loss, g = jax.value_and_grad(loss_fn)(p, x_TD, y_TF)
    updates, s = opt.update(g, s)
    return optax.apply_updates(p, updates), s, loss
  state, losses = opt.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state, x_TD, y_TF)
    losses.append(float(loss))
  return losses[0], float(loss_fn(params, x_TD, y_TF))


@pytest.mark.slow  # ~7 s: two 50-step runs
def test_fp8_training_matches_f32():
  first, last32 = train_mlp(False)
  _, last8 = train_mlp(True)
  assert last32 < 0.35 * first
  assert abs(last8 - last32) < 0.04 * last32  # measured: 2.1% (1.1-2.1% over 4 data seeds)


def test_linear_switch_and_errors():
  _, x_BTD, w_DF = draw_linear(0, B=2, T=3, D=40, F=12)
  x_BTD, w_DF = jnp.asarray(x_BTD, jnp.float32), jnp.asarray(w_DF, jnp.float32)
  w_DNH = w_DF.reshape(40, 3, 4)
  np.testing.assert_allclose(fp8.linear(x_BTD, w_DNH, fp8=False),
                             jnp.einsum('BTD,DNH->BTNH', x_BTD, w_DNH), rtol=1e-6)
  np.testing.assert_array_equal(fp8.linear(x_BTD, w_DNH, fp8=True),
                                fp8.fp8_dot(x_BTD, w_DF).reshape(2, 3, 3, 4))
  y_BTNH = fp8.linear(x_BTD.astype(jnp.bfloat16), w_DNH.astype(jnp.bfloat16), fp8=True)
  assert y_BTNH.shape == (2, 3, 3, 4) and y_BTNH.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='w shape'):
    fp8.linear(x_BTD, w_DNH[:30], fp8=True)
  with pytest.raises(ValueError, match='tile=0'):
    fp8.quantize_tiles(x_BTD, tile=0)
