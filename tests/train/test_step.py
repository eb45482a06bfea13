"""The train step: float16 loss scaling, non-finite handling, gradient accumulation, EMA."""
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab.nn import param_spec as ps
from lab.train import loop, optimizers, precision, step
from lab.train.task import Task

W0 = np.array([0.5, -1.0, 2.0, 0.25], np.float32)


def _config(**train):
  c = config_lib.load(str(REPO_ROOT / 'experiments/gpt_chars.py') + ':tiny')
  c.train.update(warmup_steps=0, schedule='constant', lr=0.1, weight_decay=0.0, clip_norm=0.0,
                 **train)
  return ml_collections.FrozenConfigDict(c)


def _linear_task(scale_x=1.0, nan_at=None):
  """loss = mean_b (w . x_b * scale_x)^2 / 2 in the compute dtype; NaN when batch['nan'] is set."""
  specs = {'w': ps.ParamSpec((4,), lambda k, s, d: jnp.asarray(W0, d), (None,))}

  def loss_fn(params, state, batch, rng, train):
    y_B = jnp.einsum('BD,D->B', batch['x'].astype(params['w'].dtype), params['w']) * scale_x
    loss = 0.5 * jnp.mean(jnp.square(y_B.astype(jnp.float32)))
    loss = jnp.where(batch['nan'].any(), jnp.nan, loss) if nan_at is not None else loss
    return loss, ({'loss': loss}, state)

  return Task(param_specs=specs, init_state=lambda key: {}, loss_fn=loss_fn)


def _run(config, task, batches):
  optimizer = optimizers.make(config.train)
  state = loop.init_state(config, task, optimizer)
  train_step = jax.jit(step.make_train_step(config.train, task, optimizer))
  history = []
  for batch in batches:
    state, metrics = train_step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def _batches(n, B=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{'x': rng.normal(size=(B, 4)).astype(np.float32), 'nan': np.zeros(B, bool)}
          for _ in range(n)]


def test_float16_overflow_skips_steps_and_halves_scale():
  # float16 gradients of about 1e4 * S overflow (max 65504) until the scale falls to 4.
  config = _config(compute_dtype='float16', loss_scale_init=2.0**15, loss_scale_period=1000,
                   nonfinite='skip')
  batches = [{'x': np.full((8, 4), 0.5, np.float32), 'nan': np.zeros(8, bool)}] * 20
  state, hist = _run(config, _linear_task(scale_x=150.0), batches)
  scales = [h['loss_scale'] for h in hist]
  skipped = [int(h['skipped']) for h in hist]
  n_skip = skipped.index(0)
  assert scales[:n_skip + 1] == [2.0**15 / 2**i for i in range(n_skip + 1)]
  assert skipped[:n_skip] == [1] * n_skip and n_skip >= 5
  assert all(s == 0 for s in skipped[n_skip:])
  # The first applied update used unscaled gradients: the same as a float32 run's first step.
  ref_state, ref_hist = _run(_config(), _linear_task(scale_x=150.0), batches[:1])
  fp16_state, _ = _run(config, _linear_task(scale_x=150.0), batches[:n_skip + 1])
  np.testing.assert_allclose(fp16_state.params['w'], ref_state.params['w'], rtol=2e-3)
  np.testing.assert_allclose(hist[n_skip]['grad_norm'], ref_hist[0]['grad_norm'], rtol=2e-3)
  assert int(fp16_state.opt_state[0].count) == 1  # skipped steps never reached the optimizer


def test_loss_scale_grows_after_period_of_finite_steps():
  ls = precision.LossScale.create(8.0, period=3)
  seen = []
  for finite in [True, True, True, True, False, True]:
    ls = ls.update(jnp.asarray(finite))
    seen.append(float(ls.scale))
  assert seen == [8.0, 8.0, 16.0, 16.0, 8.0, 8.0]
  assert float(precision.LossScale.create(1.0, 3).update(jnp.asarray(False)).scale) == 1.0


def test_nonfinite_loss_skip_keeps_params():
  config = _config(nonfinite='skip')
  batches = _batches(3)
  batches[1] = dict(batches[1], nan=np.ones(8, bool))
  state, hist = _run(config, _linear_task(nan_at=1), batches)
  assert [int(h['skipped']) for h in hist] == [0, 1, 0]
  two_clean, _ = _run(config, _linear_task(nan_at=1), [batches[0], batches[2]])
  np.testing.assert_array_equal(state.params['w'], two_clean.params['w'])


def test_nonfinite_loss_stop_names_the_step(tmp_path):
  config = _config(steps=5, eval_every=0, sample_every=0)
  batches = _batches(5)
  batches[2] = dict(batches[2], nan=np.ones(8, bool))

  class Data:
    eval_batches = []
    make_train_iter = staticmethod(lambda: iter(grain.MapDataset.source(batches)
                                                .to_iter_dataset()))

  with pytest.raises(loop.NonFiniteLossError, match='at step 3'):
    loop.train(config, _linear_task(nan_at=2), Data(), str(tmp_path))


def test_grad_accumulation_equals_one_big_batch():
  batches = _batches(3, B=8)
  one, hist1 = _run(_config(grad_accum=1), _linear_task(), batches)
  four, hist4 = _run(_config(grad_accum=4), _linear_task(), batches)
  np.testing.assert_allclose(four.params['w'], one.params['w'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([h['loss'] for h in hist4], [h['loss'] for h in hist1], rtol=1e-5)


def test_ema_tracks_params():
  d = 0.9
  batches = _batches(2)
  state, _ = _run(_config(ema_decay=d), _linear_task(), batches)
  p1, _ = _run(_config(), _linear_task(), batches[:1])
  p2, _ = _run(_config(), _linear_task(), batches)
  expected = d * (d * W0 + (1 - d) * p1.params['w']) + (1 - d) * p2.params['w']
  np.testing.assert_allclose(state.ema_params['w'], expected, rtol=1e-6)


def test_after_step_sees_the_updated_params_once_per_step_and_only_when_finite():
  """A momentum target xi <- 0.5 xi + 0.5 theta_new (BYOL's order: after the update), with the
  step number it is given; a non-finite step leaves it (and the params) as they were."""
  base = _linear_task(nan_at=1)

  def after_step(params, state, step):
    return {'target': 0.5 * state['target'] + 0.5 * params['w'], 'step': step}

  task = Task(param_specs=base.param_specs, loss_fn=base.loss_fn, after_step=after_step,
              init_state=lambda key: {'target': jnp.zeros(4), 'step': jnp.asarray(0, jnp.int32)})
  batches = _batches(3)
  batches[1] = dict(batches[1], nan=np.ones(8, bool))
  config = _config(nonfinite='skip', grad_accum=2)
  optimizer = optimizers.make(config.train)
  state = loop.init_state(config, task, optimizer)
  train_step = jax.jit(step.make_train_step(config.train, task, optimizer))
  want = np.zeros(4)
  for i, batch in enumerate(batches):
    before = state
    state, metrics = train_step(state, batch)
    if i == 1:
      assert int(metrics['skipped']) == 1
      np.testing.assert_array_equal(state.model_state['target'], before.model_state['target'])
      continue
    want = 0.5 * want + 0.5 * np.asarray(state.params['w'])
    np.testing.assert_allclose(state.model_state['target'], want, rtol=1e-6)
    assert int(state.model_state['step']) == i + 1   # once per step, though grad_accum = 2


def test_sgd_step_matches_adamw_formula():
  """One AdamW step from zero moments moves each weight by -lr * g / (|g| + eps)."""
  batches = _batches(1)
  state, _ = _run(_config(), _linear_task(), batches)
  x = batches[0]['x'].astype(np.float64)
  g = x.T @ (x @ W0.astype(np.float64)) / len(x)
  expected = W0 - 0.1 * g / (np.abs(g) + 1e-8)
  np.testing.assert_allclose(state.params['w'], expected, rtol=1e-5)


def test_bfloat16_compute_tracks_float32_on_the_gpt():
  """Params stay float32; bf16 compute gives losses within bf16 rounding of the f32 run."""
  from lab import run
  from lab.parallel import rules as rules_lib

  def losses(dtype):
    config = config_lib.override(
        config_lib.load(str(REPO_ROOT / 'experiments/gpt_chars.py') + ':tiny'),
        [f'train.compute_dtype={dtype}'])
    config, task, data = run.prepare(config)
    setup = loop.setup(config, task)
    it = data.make_train_iter()
    out = []
    with rules_lib.activate(setup.mesh, setup.rules):
      state = setup.init()
      for _ in range(4):
        state, metrics = setup.train_step(state, setup.global_batch(next(it)))
        out.append(float(metrics['loss']))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    return np.array(out)

  f32, bf16 = losses('float32'), losses('bfloat16')
  assert np.all(np.isfinite(bf16))
  np.testing.assert_allclose(bf16, f32, rtol=2e-2)
  assert not np.array_equal(bf16, f32)  # the compute really ran in bf16
