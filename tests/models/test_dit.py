"""DiT: a float64 NumPy oracle of the whole forward pass, patchify layout, the 2-D sin-cos
positions against diffusers, adaLN-Zero identity at init, conditioning, errors, gradients to every
parameter, and a few Adam steps that learn."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import denoisers
from denoisers import jit, key, np_condition, np_self_attention, silu
from lab.config import ConfigError
from lab.models import dit

B = 3


def make_cfg(**overrides):
  return ml_collections.ConfigDict(dict(
      image_size=8, channels=3, patch_size=2, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0,
      num_classes=5, dropout=0.2, attention_backend='reference', noise_max_period=1000.0)
      | overrides)


# One config and two jitted functions shared by the tests (tests/denoisers.py says why).
CFG = make_cfg()
forward = denoisers.eval_forward(dit, CFG)
train_step = denoisers.adam_train_step(dit, CFG)


def draw_params(cfg, seed, perturb):
  return denoisers.draw_params(dit.param_specs(cfg), seed, perturb)


def inputs(seed, cfg):
  S = cfg.image_size
  return denoisers.inputs(seed, (B, S, S, cfg.channels), cfg.num_classes)


# ---------------------------------------------------------------- float64 NumPy oracle


def np_patchify(x_BXYC, p):
  """Patch (i, j) -> row i * (Y/p) + j holding x[i p:(i+1) p, j p:(j+1) p, :] in row-major order."""
  B, X, Y, _ = x_BXYC.shape
  return np.stack([x_BXYC[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(B, -1)
                   for i in range(X // p) for j in range(Y // p)], axis=1)


def np_unpatchify(x_BPC, p, X, Y):
  B = x_BPC.shape[0]
  out = np.zeros((B, X, Y, x_BPC.shape[-1] // (p * p)))
  for i in range(X // p):
    for j in range(Y // p):
      out[:, i * p:(i + 1) * p, j * p:(j + 1) * p] = x_BPC[:, i * (Y // p) + j].reshape(B, p, p,
                                                                                      -1)
  return out


def np_pos_embed(gx, gy, d):
  """MAE / DiT: patch (i, j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 1e4^(-4k/d)."""
  w = 10_000.0 ** (-np.arange(d // 4) / (d / 4))
  return np.stack([np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)])
                   for i in range(gx) for j in range(gy)])


def np_modulate(x, shift, scale):
  c = x - x.mean(-1, keepdims=True)
  return c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + scale[:, None]) + \
      shift[:, None]


def np_block(q, x, c):
  """Peebles & Xie 2023, fig. 3: adaLN-Zero block, softmax attention, GELU (tanh) MLP."""
  b1, s1, a1, b2, s2, a2 = np.split(silu(c) @ q['ada_w'] + q['ada_b'], 6, axis=-1)
  x = x + a1[:, None] * np_self_attention(q['attn'], np_modulate(x, b1, s1))
  m = q['mlp']
  u = np_modulate(x, b2, s2) @ m['w_in'] + m['b_in']
  u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
  return x + a2[:, None] * (u @ m['w_out'] + m['b_out'])


def np_forward(cfg, params, x_BXYC, noise_B, labels_B):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  P, S = cfg.patch_size, cfg.image_size
  c = np_condition(p['cond'], np.asarray(noise_B, np.float64), labels_B, cfg.noise_max_period)
  x = np_patchify(np.asarray(x_BXYC, np.float64), P) @ p['patch_w'] + p['patch_b']
  x = x + np_pos_embed(S // P, S // P, cfg.d_model)
  for i in range(cfg.n_layers):
    x = np_block(jax.tree.map(lambda a: a[i], p['blocks']), x, c)
  f = p['final']
  shift, scale = np.split(silu(c) @ f['ada_w'] + f['ada_b'], 2, axis=-1)
  return np_unpatchify(np_modulate(x, shift, scale) @ f['w'] + f['b'], P, S, S)


def test_forward_matches_numpy_oracle():
  params = draw_params(CFG, 0, perturb=True)
  x, noise_B, labels_B = inputs(1, CFG)
  denoisers.assert_matches_oracle(forward(params, x, noise_B, labels_B, key(0)),
                                  np_forward(CFG, params, x, noise_B, np.asarray(labels_B)), x)


def test_patchify_layout_and_inverse():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 6, 4, 3)).astype(np.float32)
  patches = dit.patchify(jnp.asarray(x), 2)
  np.testing.assert_array_equal(patches, np_patchify(x, 2))
  np.testing.assert_array_equal(dit.unpatchify(patches, 2, 6, 4), x)
  y = rng.standard_normal((2, 6, 12)).astype(np.float32)
  np.testing.assert_array_equal(dit.patchify(dit.unpatchify(jnp.asarray(y), 2, 6, 4), 2), y)
  np.testing.assert_array_equal(dit.unpatchify(jnp.asarray(y), 2, 6, 4), np_unpatchify(y, 2, 6, 4))


def test_pos_embed_matches_diffusers_and_formula():
  torch = pytest.importorskip('torch')
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  want = get_2d_sincos_pos_embed(32, 5, base_size=5, output_type='pt')
  np.testing.assert_allclose(dit.pos_embed(5, 5, 32), torch.as_tensor(want).numpy(), atol=1e-6)
  np.testing.assert_allclose(dit.pos_embed(3, 4, 8), np_pos_embed(3, 4, 8), atol=1e-6)


def test_blocks_are_identity_and_output_zero_at_init():
  params = draw_params(CFG, 3, perturb=False)
  x, noise_B, labels_B = inputs(4, CFG)
  x_BTD = jnp.asarray(np.random.default_rng(5).standard_normal((B, 16, 16)), jnp.float32)
  c_BD = jnp.asarray(np.random.default_rng(6).standard_normal((B, 16)), jnp.float32)
  block0 = jax.tree.map(lambda a: a[0], params['blocks'])
  np.testing.assert_array_equal(jit(functools.partial(dit.block, CFG))(block0, x_BTD, c_BD),
                                x_BTD)
  np.testing.assert_array_equal(forward(params, x, noise_B, labels_B, key(0)), 0.0)


def test_init_shapes():
  denoisers.assert_init_shapes(dit.param_specs(CFG))


def test_bfloat16_params_and_inputs_give_bfloat16():
  denoisers.assert_bfloat16_in_bfloat16_out(dit, CFG, *inputs(0, CFG))


def test_output_depends_on_noise_and_labels():
  denoisers.assert_each_output_depends_on_noise_and_label(
      forward, draw_params(CFG, 7, perturb=True), *inputs(8, CFG), CFG.num_classes)


def test_bad_inputs_raise():
  cfg = make_cfg(num_classes=0)
  params = draw_params(cfg, 9, perturb=False)
  x, noise_B, labels_B = inputs(10, make_cfg())
  with pytest.raises(ValueError, match='num_classes=0'):
    dit.forward(cfg, params, x, noise_B, labels_B)
  with pytest.raises(ValueError, match=r'expected \[batch, 8, 8, 3\]'):
    dit.forward(cfg, params, jnp.zeros((B, 10, 10, 3)), noise_B)
  with pytest.raises(ValueError, match='noise has shape'):
    dit.forward(cfg, params, x, noise_B[:, None])


@pytest.mark.parametrize('overrides,match', [
    (dict(patch_size=3), 'patch_size=3 does not divide model.image_size=8'),
    (dict(n_heads=3), 'n_heads=3 does not divide model.d_model=16'),
    (dict(d_model=18, n_heads=1), 'd_model=18; expected a multiple of 4'),
    (dict(n_layers=0), 'n_layers=0'),
    (dict(attention_backend='flash'), "attention_backend='flash'"),
    (dict(dropout=-0.1), 'dropout=-0.1'),
])
def test_bad_config_raises(overrides, match):
  with pytest.raises(ConfigError, match=match):
    dit.validate(make_cfg(**overrides))


def denoising_batch(seed, n=16):
  """Noised smooth three-channel 8x8 images (denoisers.smooth_images, noised_batch, t < 1.5)."""
  rng = np.random.default_rng(seed)
  return denoisers.noised_batch(rng, denoisers.smooth_images(rng, n, 8, 3), 1.5)


def test_dropout_only_when_training():
  denoisers.assert_dropout_only_when_training(forward, train_step, draw_params(CFG, 11, True),
                                              inputs(12, CFG), denoising_batch(13))


def test_gradients_reach_every_parameter():
  denoisers.assert_gradients_reach_every_parameter(train_step, draw_params(CFG, 14, True),
                                                   denoising_batch(15))


def test_adam_steps_reduce_denoising_loss():
  """30 Adam steps at least halve the loss of the zero-output initial network."""
  denoisers.assert_adam_steps_halve_loss(train_step, draw_params(CFG, 16, False),
                                         denoising_batch(17))
