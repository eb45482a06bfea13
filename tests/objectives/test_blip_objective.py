"""BLIP's losses: ITM hard negatives never pick a positive (exactly) and follow softmax(sim) over
the rest (over many draws); the LM loss with label smoothing against torch and a NumPy formula
(with gradients); ITC against lab's clip_loss and a NumPy formula (with gradients); the weighted
ITM cross-entropy; config errors; and a tiny run that lowers the total loss."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from jax.test_util import check_grads

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.nn import param_spec as ps
from lab.objectives import blip as blip_objective
from lab.objectives.contrastive_losses import clip_loss

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def np_log_softmax(z, axis=-1):
  z = z - z.max(axis, keepdims=True)
  return z - np.log(np.exp(z).sum(axis, keepdims=True))


# ---------------------------------------------------------------- ITM hard negatives


def test_hard_negatives_never_pick_a_positive_and_follow_softmax():
  B, draws = 5, 4000
  rng = np.random.default_rng(0)
  sim = rng.standard_normal((B, B)).astype(np.float32) * 1.5
  tokens = rng.integers(3, 20, (B, 4)).astype(np.int32)
  tokens[3] = tokens[1]  # two identical captions: image 1 matches text 3 and image 3 text 1
  positive = np.asarray(blip_objective.same_text(jnp.asarray(tokens)))
  np.testing.assert_array_equal(positive, np.eye(B, dtype=bool) | np.isin(
      np.arange(B)[:, None] * 10 + np.arange(B)[None], [13, 31]))
  sample = jit(jax.vmap(lambda k: blip_objective.hard_negatives(jnp.asarray(sim),
                                                                jnp.asarray(positive), k)))
  out = jax.device_get(sample(jax.random.split(jax.random.key(1), draws)))
  text_DB, image_DS = out['text_B'], out['image_S']
  assert out['has_text_B'].all() and out['has_image_S'].all()
  rows = np.arange(B)
  assert not positive[rows, text_DB].any()  # image b never gets a text that matches it
  assert not positive[image_DS, rows].any()  # text s never gets an image it matches
  for freq_of, p_BS in ((lambda b: np.bincount(text_DB[:, b], minlength=B) / draws,
                         np.where(positive, 0.0, np.exp(sim))),
                        (lambda s: np.bincount(image_DS[:, s], minlength=B) / draws,
                         np.where(positive, 0.0, np.exp(sim)).T)):
    want_BS = p_BS / p_BS.sum(1, keepdims=True)
    got_BS = np.stack([freq_of(b) for b in range(B)])
    np.testing.assert_allclose(got_BS, want_BS, atol=0.03)  # 4000 draws: sigma <= 0.008


def test_hard_negatives_flag_rows_without_candidates():
  sim = jnp.asarray(np.random.default_rng(2).standard_normal((3, 3)), jnp.float32)
  positive = jnp.asarray([[True, True, True], [False, True, False], [True, False, True]])
  out = blip_objective.hard_negatives(sim, positive, jax.random.key(3))
  np.testing.assert_array_equal(out['has_text_B'], [False, True, True])
  np.testing.assert_array_equal(out['has_image_S'], [True, True, True])
  assert int(out['text_B'][1]) in (0, 2) and int(out['text_B'][2]) == 1
  with pytest.raises(ValueError, match='square'):
    blip_objective.hard_negatives(sim[:2], positive[:2], jax.random.key(0))


def test_itm_loss_is_the_weighted_cross_entropy():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((9, 2))
  labels = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0])
  weight = np.array([1, 1, 1, 1, 0, 1, 1, 1, 0], bool)
  loss, acc = blip_objective.itm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                                      jnp.asarray(weight))
  nll = -np_log_softmax(logits)[np.arange(9), labels]
  np.testing.assert_allclose(loss, nll[weight].mean(), rtol=1e-6)
  np.testing.assert_allclose(acc, (logits.argmax(1) == labels)[weight].mean(), rtol=1e-6)


# ---------------------------------------------------------------- LM and ITC


def np_lm_loss(logits, targets, weights, eps):
  logp = np_log_softmax(logits)
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  per = (1 - eps) * nll - eps * logp.mean(-1)
  return (per * weights).sum() / weights.sum()


def test_lm_loss_matches_torch_label_smoothing_and_numpy(x64):
  rng = np.random.default_rng(5)
  B, T, V = 3, 5, 11
  logits = rng.standard_normal((B, T, V)) * 2
  targets = rng.integers(0, V, (B, T))
  weights = (np.arange(T)[None] < np.array([[5], [3], [1]])).astype(np.int32)
  got = blip_objective.lm_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                               jnp.asarray(weights), 0.1)
  ignored = torch.from_numpy(np.where(weights == 1, targets, -100)).reshape(-1)
  want = torch.nn.CrossEntropyLoss(label_smoothing=0.1, ignore_index=-100)(
      torch.from_numpy(logits).reshape(-1, V), ignored).item()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(want, np_lm_loss(logits, targets, weights, 0.1), rtol=1e-10)
  f = lambda z: blip_objective.lm_loss(z, jnp.asarray(targets), jnp.asarray(weights), 0.1)
  check_grads(f, (jnp.asarray(logits),), order=1, modes=('rev',))


def np_itc(f, g, temp):
  s = f @ g.T / temp
  return -(np.diag(np_log_softmax(s, 1)).mean() + np.diag(np_log_softmax(s, 0)).mean()) / 2


@pytest.mark.parametrize('temp', [0.05, 0.3])
def test_itc_matches_clip_loss_and_numpy(temp, x64):
  rng = np.random.default_rng(6)
  f = rng.standard_normal((6, 4))
  g = f + 0.8 * rng.standard_normal((6, 4))
  f, g = f / np.linalg.norm(f, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
  loss, sim, metrics = blip_objective.itc_loss(jnp.asarray(f), jnp.asarray(g), jnp.asarray(temp))
  ref, ref_metrics = clip_loss(jnp.asarray(f), jnp.asarray(g), jnp.asarray(-np.log(temp)))
  np.testing.assert_allclose(loss, ref, rtol=1e-10)
  np.testing.assert_allclose(loss, np_itc(f, g, temp), rtol=1e-10)
  np.testing.assert_allclose(sim, f @ g.T / temp, rtol=1e-12)
  assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in ref_metrics.items()}
  check_grads(lambda f, g, t: blip_objective.itc_loss(f, g, t)[0],
              (jnp.asarray(f), jnp.asarray(g), jnp.asarray(temp)), order=1, modes=('rev',),
              eps=1e-6)


def test_lm_loss_rejects_smoothing_of_one():
  with pytest.raises(ValueError, match='label smoothing=1.0'):
    blip_objective.lm_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32),
                           jnp.ones((1, 2)), 1.0)


# ---------------------------------------------------------------- config and training


def _config(variant='tiny,noisy', *overrides):
  return config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/blip_scenes.py') + ':' + variant),
      ['model.attention_backend=reference', *overrides])


@pytest.mark.parametrize('overrides, match', [
    (['data.task=vqa', 'data.noise_fraction=0.0'], 'data.task=\'vqa\''),
    (['objective_args.label_smoothing=1.0'], 'label_smoothing=1.0'),
    (['data.text_len=30'], r'data.text_len=30; expected 1..24'),
    (['train.batch_size=1', 'sample.num=1'], 'ITM needs at least 2'),
    (['sample.num=9'], 'sample.num=9'),
    (['sample.top_p=0.0'], 'sample.top_p=0.0')])
def test_validate_rejects(overrides, match):
  with pytest.raises(ConfigError, match=match):
    run.prepare(_config('tiny', *overrides))


@pytest.mark.slow
def test_tiny_run_lowers_the_total_loss():
  """40 Adam steps of the tiny config on noisy scene captions: the total loss on a held batch
  falls, and so does each of ITC and LM; the loss is the sum of its three parts."""
  config, task, data = run.prepare(_config('tiny,noisy', 'data.n_train=32'))
  params = ps.init(task.param_specs, jax.random.key(0))
  opt = optax.adam(3e-3)
  held = jax.tree.map(jnp.asarray, data.eval_batches[0])

  def evaluate(params):
    return task.loss_fn(params, {}, held, jax.random.key(9), False)[1][0]

  @jit
  def step(params, opt_state, batch, key):
    grads = jax.grad(lambda p: task.loss_fn(p, {}, batch, key, True)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jit(evaluate)
  before = evaluate(params)
  opt_state, batches = opt.init(params), data.make_train_iter()
  for i in range(40):
    params, opt_state = step(params, opt_state, jax.tree.map(jnp.asarray, next(batches)),
                             jax.random.key(i))
  after = evaluate(params)
  for m in (before, after):
    np.testing.assert_allclose(m['loss'], m['itc_loss'] + m['itm_loss'] + m['lm_loss'], rtol=1e-6)
  assert after['loss'] < before['loss'] - 1.0, (before, after)
  assert after['lm_loss'] < before['lm_loss'] - 0.5 and after['itc_loss'] < before['itc_loss']
