"""MAE: round(0.75 P) patches masked per example, different per example; the encoder receives
only the visible tokens and ignores masked pixels; the decoder puts the mask token at the masked
positions; the loss equals a float64 NumPy MSE over masked patches with per-patch normalised
targets (with gradients) and ignores visible ones; a tiny ViT run whose loss falls."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.nn import param_spec as ps
from lab.nn.patches import patchify, unpatchify
from lab.objectives import mae
from lab.train import loop, metrics_log


def tiny(overrides=()):
  config = config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=mae,tiny')
  config = config_lib.override(config, ['model.attention_backend=xla', *overrides])
  return run.prepare(config)


def images(seed, n=4):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)


def np_patchify(x, p):
  """[B, P, p p C] in (patch row, patch column) order, pixels (row, column, channel) inside."""
  B, X, Y, C = x.shape
  out = np.zeros((B, (X // p) * (Y // p), p * p * C))
  for i in range(X // p):
    for j in range(Y // p):
      out[:, i * (Y // p) + j] = x[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(B, -1)
  return out


@pytest.mark.parametrize('P', [16, 49])
def test_masking_counts_and_differs_per_example(P):
  B, M = 8, round(0.75 * P)
  keep, restore, mask = jax.device_get(mae.random_masking(jax.random.key(P), B, P, 0.75))
  assert keep.shape == (B, P - M)
  np.testing.assert_array_equal(mask.sum(1), M)
  assert len({tuple(np.flatnonzero(m)) for m in mask}) == B  # every example its own mask
  for b in range(B):
    assert set(keep[b]) == set(np.flatnonzero(mask[b] == 0))  # kept = not masked
    shuffle = np.argsort(restore[b])
    np.testing.assert_array_equal(shuffle[:P - M], keep[b])  # restore inverts the shuffle


def test_encoder_sees_only_visible_tokens(monkeypatch):
  config, task, _ = tiny()
  cfg = config.model
  P, U = (cfg.image_size // cfg.patch_size) ** 2, 4
  params = ps.init(task.param_specs, jax.random.key(0))
  x = images(1)
  keep, _, mask = mae.random_masking(jax.random.key(2), 4, P, 0.75)
  encode = jax.jit(lambda x: mae.encode_visible(cfg, params['encoder'], x, keep),
                   compiler_options={'xla_backend_optimization_level': 0})
  h = encode(x)
  assert h.shape == (4, 1 + U, cfg.d_model)
  # change the pixels of every masked patch: the encoder output does not move
  pix = patchify(jnp.asarray(x), cfg.patch_size)
  masked = np.asarray(mask)[..., None]
  noise = np.random.default_rng(3).standard_normal(pix.shape).astype(np.float32)
  x_masked = unpatchify(pix + noise * masked, cfg.patch_size, 8, 8)
  np.testing.assert_array_equal(encode(x_masked), h)
  x_visible = unpatchify(pix + noise * (1 - masked), cfg.patch_size, 8, 8)
  assert not np.allclose(encode(x_visible), h)
  # inside loss_fn the ViT encoder receives 1 + U tokens
  seen = []
  real_encode = mae.vit.encode
  monkeypatch.setattr(mae.vit, 'encode', lambda cfg, p, x_BTD, **kw: (
      seen.append(x_BTD.shape), real_encode(cfg, p, x_BTD, **kw))[1])
  jax.eval_shape(lambda p, x: task.loss_fn(p, {}, {'image': x}, jax.random.key(4), True),
                 params, x)
  assert seen == [(4, 1 + U, cfg.d_model)]


def test_unshuffle_puts_mask_tokens_at_masked_positions():
  rng = np.random.default_rng(5)
  B, P, W = 3, 9, 4
  keep, restore, mask = jax.device_get(mae.random_masking(jax.random.key(6), B, P, 0.75))
  y = rng.standard_normal((B, keep.shape[1], W)).astype(np.float32)
  token = rng.standard_normal(W).astype(np.float32)
  got = np.asarray(mae.unshuffle(jnp.asarray(y), jnp.asarray(token), jnp.asarray(restore)))
  want = np.broadcast_to(token, (B, P, W)).copy()
  for b in range(B):
    want[b, keep[b]] = y[b]
  np.testing.assert_array_equal(got, want)
  assert np.all(want[mask == 1] == token)


@pytest.mark.parametrize('norm_pix', [True, False])
def test_loss_matches_numpy_and_ignores_visible_patches(norm_pix, x64):
  rng = np.random.default_rng(7)
  x = rng.uniform(-1, 1, (3, 8, 8, 2))
  t = np_patchify(x, 2)
  if norm_pix:
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  pred = rng.standard_normal(t.shape)
  mask = (rng.uniform(size=t.shape[:2]) < 0.75).astype(np.float64)
  want = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
  loss = lambda pred: mae.masked_mse(pred, mae.pixel_targets(jnp.asarray(x), 2, norm_pix),
                                     jnp.asarray(mask))
  np.testing.assert_allclose(loss(pred), want, rtol=1e-10)
  pred_visible = pred + 5.0 * (1 - mask)[..., None] * rng.standard_normal(pred.shape)
  np.testing.assert_allclose(loss(pred_visible), want, rtol=1e-10)
  check_grads(loss, (pred,), order=1, modes=['rev'])
  grad = np.asarray(jax.grad(loss)(pred))
  assert np.all(grad[mask == 0] == 0) and np.abs(grad[mask == 1]).max() > 0


def test_config_errors_name_the_value():
  with pytest.raises(ConfigError, match="model.name='resnet'"):
    config = config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=mae,tiny,'
                             'encoder=resnet')
    run.prepare(config)
  with pytest.raises(ConfigError, match='mask_ratio=0.99 masks 16 of 16'):
    tiny(['objective_args.mask_ratio=0.99'])


@pytest.mark.slow
def test_tiny_vit_run_lowers_the_loss(tmp_path):
  config, task, data = tiny(['train.steps=15', 'train.lr=3e-3', 'train.log_every=1',
                             'train.eval_every=0'])
  loop.train(config, task, data, str(tmp_path))
  losses = [r['loss'] for r in metrics_log.read(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert np.all(np.isfinite(losses)) and len(losses) == 15
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
