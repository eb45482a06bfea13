"""InstDisc: the NCE loss (eqs. 4-6), the Monte-Carlo normaliser (eq. 7) and the memory-bank
update against float64 NumPy re-derivations; the bank and Z as state in loss_fn; a tiny run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.nn import param_spec
from lab.objectives import instdisc
from lab.train import loop, metrics_log
from oracles import assert_vjp_matches_oracle

TAU = 0.07


def _unit(rng, *shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_nce(f, pos, noise, z, n):
  """-1/B sum_b [log h(i_b, f_b) + sum_k log(1 - h(j_k, f_b))], h = P / (P + m / n),
  P = exp(v . f / tau) / Z (Wu et al. 2018, eqs. 4-6), computed directly in float64."""
  m = len(noise)
  p_pos = np.exp((f * pos).sum(-1) / TAU) / z
  p_noise = np.exp(f @ noise.T / TAU) / z
  h_pos, h_noise = p_pos / (p_pos + m / n), p_noise / (p_noise + m / n)
  return -np.mean(np.log(h_pos) + np.log(1 - h_noise).sum(-1)), h_pos.mean(), h_noise.mean()


@pytest.mark.usefixtures('x64')
def test_nce_loss_and_z_match_numpy():
  rng = np.random.default_rng(0)
  B, M, D, n = 5, 7, 6, 50
  f, noise = _unit(rng, B, D), _unit(rng, M, D)
  pos = _unit(rng, B, D) + 2.0 * f  # positives near their features, unnormalised on purpose
  z = float(instdisc.estimate_z(jnp.asarray(f), jnp.asarray(noise), TAU, n))
  np.testing.assert_allclose(z, n * np.mean(np.exp(f @ noise.T / TAU)), rtol=1e-12)  # eq. 7
  loss, metrics = instdisc.nce_loss(jnp.asarray(f), jnp.asarray(pos), jnp.asarray(noise), TAU,
                                    z, n)
  want, h_pos, h_noise = np_nce(f, pos, noise, z, n)
  np.testing.assert_allclose(float(loss), want, rtol=1e-12)
  np.testing.assert_allclose(float(metrics['positive_h']), h_pos, rtol=1e-12)
  np.testing.assert_allclose(float(metrics['noise_h']), h_noise, rtol=1e-12)


def test_nce_loss_gradients_match_numpy():
  rng = np.random.default_rng(1)
  B, M, D, n, z = 3, 4, 5, 40, 60.0
  args = [_unit(rng, B, D), _unit(rng, B, D), _unit(rng, M, D)]
  assert_vjp_matches_oracle(
      lambda f, pos, noise: instdisc.nce_loss(f, pos, noise, TAU, z, n)[0],
      lambda f, pos, noise: np.asarray(np_nce(f, pos, noise, z, n)[0]), args, rng)


def test_bank_update_and_init():
  rng = np.random.default_rng(2)
  bank = jnp.asarray(instdisc.init_bank(jax.random.key(0), 4000, 128))
  bound = np.sqrt(3 / 128)
  assert float(jnp.abs(bank).max()) <= bound
  np.testing.assert_allclose(float(jnp.mean(jnp.sum(bank ** 2, -1))), 1.0, atol=0.01)
  index, f = np.array([7, 3, 3999]), _unit(rng, 3, 128)
  new = np.asarray(instdisc.update_bank(bank, jnp.asarray(index), jnp.asarray(f), 0.5))
  mixed = 0.5 * np.asarray(bank)[index] + 0.5 * f
  np.testing.assert_allclose(new[index], mixed / np.linalg.norm(mixed, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  rest = np.setdiff1d(np.arange(4000), index)
  np.testing.assert_array_equal(new[rest], np.asarray(bank)[rest])


def _config(*overrides):
  config = config_lib.load(str(REPO_ROOT / 'experiments/ssl.py') + ':method=instdisc,tiny')
  return config_lib.override(config, list(overrides))


def test_loss_fn_keeps_z_and_writes_the_bank_rows_of_the_batch():
  config, task, data = run.prepare(_config('objective_args.noise_samples=64'))
  params = param_spec.init(task.param_specs, jax.random.key(0))
  state = task.init_state(jax.random.key(1))
  it = data.make_train_iter()
  loss_fn = jax.jit(task.loss_fn, static_argnums=4)
  batch1, batch2 = next(it), next(it)
  loss, (metrics, s1) = loss_fn(params, state, batch1, jax.random.key(2), True)
  assert np.isfinite(float(loss)) and float(state['z']) == 0 < float(s1['z'])
  np.testing.assert_allclose(float(metrics['log_z']), np.log(float(s1['z'])), rtol=1e-6)
  _, (_, s2) = loss_fn(params, s1, batch2, jax.random.key(3), True)
  assert float(s2['z']) == float(s1['z'])  # first_batch: Z is estimated once, then kept
  old, new = np.asarray(state['bank']), np.asarray(s1['bank'])
  changed = np.flatnonzero(np.any(old != new, axis=1))
  np.testing.assert_array_equal(changed, np.sort(batch1['index']))
  np.testing.assert_allclose(np.linalg.norm(new[changed], axis=1), 1.0, rtol=1e-5)
  # Eval (test images, no index): the state is returned as it came in.
  _, (eval_metrics, s_eval) = loss_fn(params, s1, data.eval_batches[0], None, False)
  assert np.isfinite(float(eval_metrics['loss']))
  np.testing.assert_array_equal(np.asarray(s_eval['bank']), new)


def test_tiny_run_learns_without_nan(tmp_path):
  # Batches of 128 of the 1500 digits: an example comes back every 12 steps, so the bank rows
  # that are its positives hold its own earlier features (in the first epoch they are random).
  steps = 24
  config = _config(f'train.steps={steps}', f'train.checkpoint_every={steps}',
                   'train.batch_size=128', 'train.lr=3e-3', 'train.warmup_steps=3',
                   'objective_args.z_estimate=every_step', 'train.eval_every=0')
  config, task, data = run.prepare(config)
  loop.train(config, task, data, str(tmp_path))
  losses = [r['loss'] for r in metrics_log.read(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert np.all(np.isfinite(losses)) and len(losses) == steps
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  log_z = [r['log_z'] for r in metrics_log.read(tmp_path / 'metrics.jsonl') if 'log_z' in r]
  assert len(set(log_z)) > steps // 2  # every_step: Z is re-estimated on each batch


@pytest.mark.parametrize('override,match', [
    ('objective_args.temperature=0.0', 'temperature=0.0'),
    ('objective_args.z_estimate=never', "z_estimate='never'"),
    ('objective_args.bank_momentum=1.0', 'bank_momentum=1.0')])
def test_bad_objective_args_are_config_errors(override, match):
  with pytest.raises(ConfigError, match=match):
    run.prepare(_config(override))
