"""Diffusion methods: noise paths, preconditioning and training targets against the papers (float64)
and against diffusers' EDM and Euler schedulers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

from lab.objectives import noise_schedules as ns
from lab.objectives.diffusion_method import Method, denoiser, from_config

CASES = [('ddpm', 'eps'), ('ddpm', 'v'), ('ddpm', 'x0'), ('vp', 'eps'), ('vp', 'v'), ('vp', 'x0'),
         ('ve', 'eps'), ('edm', 'eps'), ('flow', 'eps')]


def np_abar(method, t):
  """abar_t = prod_{s<=t} (1 - beta_s) with the Ho et al. linear betas (t = 0 is DDPM's t = 1)."""
  betas = np.linspace(1e-4, 0.02, method.num_steps)
  return np.cumprod(1 - betas)[t]


def np_alpha_sigma(method, t):
  """(alpha, sigma) of x_t = alpha x_0 + sigma eps from each paper, in float64."""
  if method.kind == 'ddpm':
    abar = np_abar(method, t)
    return np.sqrt(abar), np.sqrt(1 - abar)
  if method.kind == 'vp':  # Song et al. 2021, eq. 33: mean coefficient and variance
    log_mean = -0.25 * t ** 2 * (method.beta_max - method.beta_min) - 0.5 * t * method.beta_min
    return np.exp(log_mean), np.sqrt(1 - np.exp(2 * log_mean))
  if method.kind == 've':
    return np.ones_like(t), method.sigma_min * (method.sigma_max / method.sigma_min) ** t
  if method.kind == 'edm':
    return np.ones_like(t), t
  return 1 - t, t


def np_paper_target(method, x0, eps, alpha, sigma):
  """What each paper's network regresses: eps (Ho eq. 14), v = alpha eps - sigma x0 (Salimans &
  Ho 2022, §4), x0; NCSN's sigma-scaled score -eps (Song eq. 7, lambda = sigma^2 with D = x +
  sigma^2 s); EDM eq. 8: (x0 - c_skip x) / c_out; flow velocity eps - x0 (Lipman eq. 23)."""
  if method.kind == 'edm':
    sd = method.sigma_data
    x_t = x0 + sigma * eps
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / np.sqrt(sigma ** 2 + sd ** 2)
    return (x0 - c_skip * x_t) / c_out
  if method.kind == 've':
    return -eps
  if method.kind == 'flow':
    return eps - x0
  return {'eps': eps, 'v': alpha * eps - sigma * x0, 'x0': x0}[method.prediction]


def draw_times(method, rng, n):
  """Native times of `method` spread over its range, endpoints included."""
  if method.kind == 'ddpm':
    return np.concatenate([[0, method.num_steps - 1], rng.integers(0, method.num_steps, n - 2)])
  if method.kind == 'edm':
    return np.exp(rng.uniform(np.log(0.002), np.log(80.0), n))
  lo = method.t_eps if method.kind == 'vp' else 0.0
  hi = 0.99 if method.kind == 'flow' else 1.0  # flow's t = 1 has alpha = 0
  return np.concatenate([[max(lo, 1e-3), hi], rng.uniform(lo, hi, n - 2)])


@pytest.mark.parametrize('kind', ['ddpm', 'vp', 've', 'edm', 'flow'])
def test_alpha_sigma_matches_paper(kind):
  method = Method(kind)
  t = draw_times(method, np.random.default_rng(0), 16)
  alpha, sigma = method.alpha_sigma(jnp.asarray(t))
  want_alpha, want_sigma = np_alpha_sigma(method, t)
  np.testing.assert_allclose(alpha, want_alpha, rtol=3e-6, atol=1e-7)
  np.testing.assert_allclose(sigma, want_sigma, rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize('kind,prediction', CASES)
def test_target_is_the_papers_and_ideal_output_recovers_x0(kind, prediction, x64):
  """With F* the paper's regression target, x0_hat = a x_t + b F* is x_0 exactly, and the loss's
  target (x_0 - a x_t) / b is F*."""
  method = Method(kind, prediction=prediction)
  rng = np.random.default_rng(1)
  t = draw_times(method, rng, 16)
  alpha, sigma = np_alpha_sigma(method, t)
  alpha, sigma = alpha[:, None], sigma[:, None]
  x0, eps = rng.standard_normal((2, 16, 3))
  x_t = alpha * x0 + sigma * eps
  c_in, a, b = (np.asarray(c) for c in method.coefficients(jnp.asarray(alpha), jnp.asarray(sigma)))
  assert a.dtype == np.float64 and b.dtype == np.float64
  F_star = np_paper_target(method, x0, eps, alpha, sigma)
  np.testing.assert_allclose(a * x_t + b * F_star, x0, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose((x0 - a * x_t) / b, F_star, rtol=1e-9, atol=1e-9)
  want_c_in = 1 / np.sqrt(sigma ** 2 + 0.25) if kind == 'edm' else 1.0
  np.testing.assert_allclose(c_in, np.broadcast_to(want_c_in, c_in.shape), rtol=1e-12)


def test_edm_coefficients_match_table_1(x64):
  """EDM Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2),
  c_noise = ln(s)/4."""
  method = Method('edm', sigma_data=0.7)
  sigma = np.exp(np.random.default_rng(2).uniform(np.log(1e-3), np.log(100.0), 32))
  c_in, a, b = method.coefficients(jnp.ones_like(jnp.asarray(sigma)), jnp.asarray(sigma))
  sd = 0.7
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-13)
  np.testing.assert_allclose(a, sd ** 2 / (sigma ** 2 + sd ** 2), rtol=1e-13)
  np.testing.assert_allclose(b, sigma * sd / np.sqrt(sigma ** 2 + sd ** 2), rtol=1e-13)
  np.testing.assert_allclose(method.c_noise(jnp.ones_like(jnp.asarray(sigma)), jnp.asarray(sigma)),
                             np.log(sigma) / 4, rtol=1e-13)


def test_edm_preconditioning_matches_diffusers():
  """EDMEulerScheduler's precondition_inputs / _noise / _outputs are EDM's c_in, c_noise and
  c_skip x + c_out F."""
  sched = EDMEulerScheduler(sigma_data=0.5)
  method = Method('edm')
  rng = np.random.default_rng(3)
  x, F = rng.standard_normal((2, 5, 4)).astype(np.float32)
  for sigma in (0.002, 0.3, 2.5, 80.0):
    c_in, a, b = method.coefficients(jnp.float32(1.0), jnp.float32(sigma))
    s_t = torch.tensor(sigma)
    np.testing.assert_allclose(c_in * x, sched.precondition_inputs(torch.tensor(x), s_t).numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(method.c_noise(jnp.float32(1.0), jnp.float32(sigma)),
                               sched.precondition_noise(s_t).numpy(), rtol=1e-6)
    np.testing.assert_allclose(a * x + b * F, sched.precondition_outputs(
        torch.tensor(x), torch.tensor(F), s_t).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('beta_schedule', ['linear', 'cosine'])
def test_ddpm_c_noise_is_the_step_index(beta_schedule):
  """At the table's own (alpha_t, sigma_t) c_noise is the integer t (up to float32 rounding of
  log sigma; the nearest integer is exactly t)."""
  method = Method('ddpm', beta_schedule=beta_schedule)
  t = np.arange(method.num_steps)
  c = np.asarray(method.c_noise(*method.alpha_sigma(jnp.asarray(t))))
  np.testing.assert_array_equal(np.round(c), t)
  np.testing.assert_allclose(c, t, atol=1e-3)


@pytest.mark.parametrize('beta_schedule', ['linear', 'cosine'])
def test_ddpm_alpha_sigma_keeps_float32_precision(beta_schedule):
  """Tabulating sqrt(abar) and sqrt(1 - abar) in float64 before the cast gives 6e-8 relative
  error and c_noise within one float32 ulp of 999 (6e-5) of the integer t."""
  method = Method('ddpm', beta_schedule=beta_schedule)
  t = np.arange(method.num_steps)
  abar = ns.alpha_bars(ns.ddpm_betas(beta_schedule, method.num_steps))
  alpha, sigma = method.alpha_sigma(jnp.asarray(t))
  np.testing.assert_allclose(alpha, np.sqrt(abar), rtol=1e-6)
  np.testing.assert_allclose(sigma, np.sqrt(1 - abar), rtol=1e-6)
  np.testing.assert_allclose(method.c_noise(alpha, sigma), t, atol=1e-4)


def test_ddpm_c_noise_between_steps_matches_diffusers():
  """Between table entries c_noise interpolates t linearly in log sigma, as diffusers' Euler
  scheduler's _sigma_to_t does for its Karras sigmas."""
  sched = EulerDiscreteScheduler(beta_schedule='linear', use_karras_sigmas=True,
                                 timestep_spacing='linspace')
  sched.set_timesteps(30)
  sigma_edm = sched.sigmas.numpy()[:-1].astype(np.float64)
  method = Method('ddpm')
  alpha = 1 / np.sqrt(1 + sigma_edm ** 2)
  got = method.c_noise(jnp.asarray(alpha, jnp.float32), jnp.asarray(alpha * sigma_edm, jnp.float32))
  np.testing.assert_allclose(got, sched.timesteps.numpy(), atol=2e-3)
  assert np.mean(np.abs(got - np.round(got)) > 0.05) > 0.5  # mostly fractional: not vacuous


@pytest.mark.parametrize('kind', ['vp', 'flow', 've'])
def test_c_noise_continuous(kind):
  """vp: (M - 1) t with M = 1000 (EDM Table 1); flow: 999 t; ve: ln(sigma / 2) (EDM Table 1)."""
  method = Method(kind)
  t = np.random.default_rng(4).uniform(1e-3, 0.99, 32)
  alpha, sigma = method.alpha_sigma(jnp.asarray(t, jnp.float32))
  want = np.log(np_alpha_sigma(method, t)[1] / 2) if kind == 've' else 999 * t
  np.testing.assert_allclose(method.c_noise(alpha, sigma), want, rtol=1e-4, atol=2e-4)


def recover_t(method, alpha, sigma):
  """The native time of a training draw, from its (alpha, sigma)."""
  alpha, sigma = np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)
  if method.kind == 'ddpm':
    table = -np.sqrt(np_abar(method, np.arange(method.num_steps)))  # increasing in t
    hi = np.clip(np.searchsorted(table, -alpha), 1, method.num_steps - 1)
    return np.where(np.abs(table[hi] + alpha) < np.abs(table[hi - 1] + alpha), hi, hi - 1)
  if method.kind == 'vp':
    return ns.vp_t_from_sigma(sigma / alpha, method.beta_min, method.beta_max)
  if method.kind == 've':
    return np.log(sigma / method.sigma_min) / np.log(method.sigma_max / method.sigma_min)
  return sigma


def test_edm_training_sigmas_are_lognormal():
  method = Method('edm', p_mean=-1.2, p_std=1.2)
  n = 100_000
  alpha, sigma = method.draw_training_noise(jax.random.key(0), n)
  np.testing.assert_array_equal(alpha, 1.0)
  log_sigma = np.log(np.asarray(sigma, np.float64))
  assert abs(log_sigma.mean() - (-1.2)) < 4 * 1.2 / np.sqrt(n)
  assert abs(log_sigma.std() - 1.2) < 4 * 1.2 / np.sqrt(2 * n)
  assert abs(np.mean(log_sigma < -1.2) - 0.5) < 4 * 0.5 / np.sqrt(n)  # symmetric about P_mean


@pytest.mark.parametrize('kind', ['ddpm', 'vp', 've', 'flow'])
def test_training_times_are_uniform(kind):
  """ddpm: t ~ U{0..T-1} (Ho eq. 14); vp: t ~ U(t_eps, 1); ve and flow: t ~ U(0, 1). Checked by
  the mean, the range and the Kolmogorov-Smirnov distance of the recovered times."""
  method = Method(kind)
  n = 20_000
  alpha, sigma = method.draw_training_noise(jax.random.key(1), n)
  assert alpha.shape == sigma.shape == (n,)
  t = np.sort(recover_t(method, alpha, sigma))
  lo, hi = {'ddpm': (0, method.num_steps - 1), 'vp': (method.t_eps, 1.0)}.get(kind, (0.0, 1.0))
  assert t[0] >= lo - 1e-4 and t[-1] <= hi + 1e-4
  if kind == 'ddpm':
    assert np.all(t == np.round(t)) and len(np.unique(t)) > 990
    cdf = (t + 1) / method.num_steps
  else:
    cdf = (t - lo) / (hi - lo)
  ks = np.abs(cdf - np.arange(1, n + 1) / n).max()
  assert ks < 1.6 / np.sqrt(n), ks  # the KS 1% critical value is 1.63 / sqrt(n)


def test_sampling_range():
  ddpm = Method('ddpm')
  abar = np_abar(ddpm, np.array([0, 999]))
  np.testing.assert_allclose(ddpm.sampling_range(), np.sqrt((1 - abar) / abar), rtol=1e-12)
  vp = Method('vp', t_eps=1e-3)
  np.testing.assert_allclose(vp.sampling_range(),
                             [ns.vp_sigma(1e-3), ns.vp_sigma(1.0)], rtol=1e-12)
  assert Method('ve', sigma_min=0.02, sigma_max=40.0).sampling_range() == (0.02, 40.0)
  assert Method('edm', sigma_min=0.002, sigma_max=80.0).sampling_range() == (0.002, 80.0)
  with pytest.raises(ValueError, match='flow'):
    Method('flow').sampling_range()


@pytest.mark.parametrize('kind', ['ddpm', 'vp', 've', 'edm', 'flow'])
def test_alpha_from_sigma_edm_inverts_the_path(kind, x64):
  """alpha_from_sigma_edm(sigma_t / alpha_t) = alpha_t on the method's own path."""
  method = Method(kind)
  t = draw_times(method, np.random.default_rng(5), 16)
  alpha, sigma = np_alpha_sigma(method, t)
  np.testing.assert_allclose(method.alpha_from_sigma_edm(jnp.asarray(sigma / alpha)), alpha,
                             rtol=1e-10)


def test_denoiser_wires_the_network(x64):
  """denoiser: the net sees c_in x_t, c_noise and the labels, and D = a x_t + b F (EDM eq. 7)."""
  method = Method('edm', sigma_data=0.5)
  rng = np.random.default_rng(6)
  w = rng.standard_normal((3, 3))
  labels = jnp.asarray([1, 0, 2, 1])

  def net(params, x, c_noise_B, labels_B):
    return jnp.tanh(x @ params + c_noise_B[:, None] + labels_B[:, None])

  x_t = rng.standard_normal((4, 3))
  sigma = np.array([0.01, 0.5, 3.0, 70.0])
  got = denoiser(method, net, jnp.asarray(w), labels)(jnp.asarray(x_t), jnp.ones(4),
                                                       jnp.asarray(sigma))
  s, sd = sigma[:, None], 0.5
  F = np.tanh((x_t / np.sqrt(s ** 2 + sd ** 2)) @ w + np.log(s) / 4 + np.asarray(labels)[:, None])
  want = sd ** 2 / (s ** 2 + sd ** 2) * x_t + s * sd / np.sqrt(s ** 2 + sd ** 2) * F
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bad_method_raises():
  with pytest.raises(ValueError, match="'ddim'"):
    Method('ddim')
  with pytest.raises(ValueError, match="'score'"):
    Method('ddpm', prediction='score')
  method = from_config({'kind': 'vp', 'prediction': 'v', 'label_dropout': 0.1})
  assert method.kind == 'vp' and method.prediction == 'v'
