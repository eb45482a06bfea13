"""Noise schedules against the papers' formulas in float64 and against diffusers' schedulers."""
import math

import numpy as np
import pytest
from diffusers import DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler
from scipy import integrate

from lab.objectives import noise_schedules as ns
from lab.objectives.diffusion_method import Method


def np_linear_betas(T, beta_start=1e-4, beta_end=0.02):
  """Ho et al. 2020, §4: beta_t rises linearly from beta_1 = 1e-4 to beta_T = 0.02."""
  return np.array([beta_start + (t - 1) / (T - 1) * (beta_end - beta_start)
                   for t in range(1, T + 1)])


def np_cosine_betas(T, s=0.008, max_beta=0.999):
  """Nichol & Dhariwal 2021, eq. 17: abar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2),
  beta_t = 1 - abar_t / abar_{t-1}, clipped to max_beta."""
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  return np.array([min(1 - (f(t) / f(0)) / (f(t - 1) / f(0)), max_beta) for t in range(1, T + 1)])


def np_karras(N, sigma_min, sigma_max, rho):
  """EDM eq. 5: sigma_i = (max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho, sigma_N = 0."""
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return np.array([(hi + i / (N - 1) * (lo - hi)) ** rho for i in range(N)] + [0.0])


def np_vp_alpha_bar(t, beta_min, beta_max):
  """abar(t) = exp(-int_0^t beta(s) ds), beta(s) = beta_min + s (beta_max - beta_min) (Song et al.
  2021, eq. 32-33), integrated by quadrature rather than in closed form."""
  beta = lambda s: beta_min + s * (beta_max - beta_min)
  return np.array([math.exp(-integrate.quad(beta, 0.0, ti)[0]) for ti in np.ravel(t)])


@pytest.mark.parametrize('T', [1000, 37])
def test_linear_betas(T):
  got = ns.ddpm_betas('linear', T)
  assert got.dtype == np.float64 and got.shape == (T,)
  np.testing.assert_allclose(got, np_linear_betas(T), rtol=1e-13)
  ref = DDPMScheduler(num_train_timesteps=T, beta_schedule='linear').betas.numpy()
  np.testing.assert_allclose(got, ref, rtol=2e-7)  # theirs is float32


@pytest.mark.parametrize('T', [1000, 37])
def test_cosine_betas(T):
  got = ns.ddpm_betas('cosine', T)
  assert got.dtype == np.float64 and got.shape == (T,)
  np.testing.assert_allclose(got, np_cosine_betas(T), rtol=1e-12)
  assert got[-1] == 0.999 and got[:-1].max() < 0.999  # only the last step is clipped
  ref = DDPMScheduler(num_train_timesteps=T, beta_schedule='squaredcos_cap_v2').betas.numpy()
  np.testing.assert_allclose(got, ref, rtol=1e-7)


def test_linear_betas_custom_range():
  np.testing.assert_allclose(ns.ddpm_betas('linear', 50, 1e-3, 0.05),
                             np_linear_betas(50, 1e-3, 0.05), rtol=1e-13)
  np.testing.assert_allclose(ns.ddpm_betas('cosine', 50, cosine_s=0.02, max_beta=0.5),
                             np_cosine_betas(50, 0.02, 0.5), rtol=1e-12)


@pytest.mark.parametrize('kind,theirs', [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')])
def test_alpha_bars_is_cumprod(kind, theirs):
  betas = ns.ddpm_betas(kind, 1000)
  got = ns.alpha_bars(betas)
  want, prod = [], 1.0
  for b in betas:
    prod *= 1.0 - b
    want.append(prod)
  np.testing.assert_allclose(got, want, rtol=1e-13)
  if kind == 'cosine':  # abar_t = f(t) / f(0) wherever beta was not clipped
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(got[:-1], f(np.arange(1, 1000)) / f(0), rtol=1e-10)
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.numpy()
  np.testing.assert_allclose(got, ref, rtol=2e-5)  # their float32 cumprod drifts


def test_sigma_from_alpha_bar():
  abar = np.array([0.9999, 0.5, 1e-3, 4e-5])
  np.testing.assert_allclose(ns.sigma_from_alpha_bar(abar), np.sqrt(1 / abar - 1), rtol=1e-12)


@pytest.mark.parametrize('beta_min,beta_max', [(0.1, 20.0), (0.5, 7.0)])
def test_vp_sigma_against_integrated_alpha_bar(beta_min, beta_max):
  t = np.array([1e-5, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0])
  sigma = ns.vp_sigma(t, beta_min, beta_max)
  np.testing.assert_allclose(sigma, np.sqrt(1 / np_vp_alpha_bar(t, beta_min, beta_max) - 1),
                             rtol=1e-9)
  np.testing.assert_allclose(ns.vp_beta(t, beta_min, beta_max),
                             beta_min + t * (beta_max - beta_min), rtol=1e-14)


@pytest.mark.parametrize('beta_min,beta_max', [(0.1, 20.0), (0.5, 7.0)])
def test_vp_t_from_sigma_is_the_inverse(beta_min, beta_max):
  t = np.random.default_rng(0).uniform(1e-4, 1.0, 64)
  np.testing.assert_allclose(ns.vp_t_from_sigma(ns.vp_sigma(t, beta_min, beta_max), beta_min,
                                                beta_max), t, rtol=1e-10)
  sigma = np.exp(np.random.default_rng(1).uniform(np.log(1e-3), np.log(150.0), 64))
  np.testing.assert_allclose(ns.vp_sigma(ns.vp_t_from_sigma(sigma, beta_min, beta_max), beta_min,
                                         beta_max), sigma, rtol=1e-10)


def test_ve_sigma():
  t = np.linspace(0.0, 1.0, 11)
  got = ns.ve_sigma(t, 0.02, 80.0)
  np.testing.assert_allclose(got, [0.02 * (80.0 / 0.02) ** ti for ti in t], rtol=1e-13)
  np.testing.assert_allclose(got[[0, -1]], [0.02, 80.0], rtol=1e-13)
  np.testing.assert_allclose(np.diff(np.log(got)), np.log(4000.0) / 10, rtol=1e-10)  # geometric


@pytest.mark.parametrize('N,sigma_min,sigma_max,rho', [(18, 0.002, 80.0, 7.0), (5, 0.01, 50.0, 3.0),
                                                       (2, 0.1, 1.0, 7.0)])
def test_karras_sigmas_formula(N, sigma_min, sigma_max, rho):
  got = ns.karras_sigmas(N, sigma_min, sigma_max, rho)
  assert got.dtype == np.float64 and got.shape == (N + 1,)
  np.testing.assert_allclose(got, np_karras(N, sigma_min, sigma_max, rho), rtol=1e-12)
  np.testing.assert_allclose(got[[0, N - 1, N]], [sigma_max, sigma_min, 0.0], rtol=1e-12)


@pytest.mark.parametrize('N,rho', [(18, 7.0), (40, 3.0)])
def test_karras_sigmas_match_diffusers_edm_euler(N, rho):
  sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_schedule='karras', rho=rho,
                            final_sigmas_type='zero')
  sched.set_timesteps(N)
  np.testing.assert_allclose(ns.karras_sigmas(N, 0.002, 80.0, rho), sched.sigmas.numpy(),
                             rtol=2e-7, atol=0)


@pytest.mark.parametrize('beta_schedule,theirs', [('linear', 'linear'),
                                                  ('cosine', 'squaredcos_cap_v2')])
def test_karras_sigmas_over_ddpm_range_match_diffusers_euler(beta_schedule, theirs):
  """EulerDiscreteScheduler(use_karras_sigmas=True) runs eq. 5 between the trained model's
  smallest and largest sigma, which is what Method.sampling_range gives for ddpm."""
  sched = EulerDiscreteScheduler(beta_schedule=theirs, use_karras_sigmas=True,
                                 timestep_spacing='linspace')
  sched.set_timesteps(25)
  sigmas = sched.sigmas.numpy()
  lo, hi = float(sigmas[-2]), float(sigmas[0])
  np.testing.assert_allclose(ns.karras_sigmas(25, lo, hi), sigmas, rtol=1e-6)
  # Their float32 1 - abar_0 (abar_0 = 1 - 1e-4) loses ~4 digits: hence the loose rtol here.
  np.testing.assert_allclose(Method('ddpm', beta_schedule=beta_schedule).sampling_range(),
                             (lo, hi), rtol=5e-4)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="'quadratic'"):
    ns.ddpm_betas('quadratic', 10)
  with pytest.raises(ValueError, match='num_steps=0'):
    ns.ddpm_betas('linear', 0)
  with pytest.raises(ValueError, match='num_steps=1'):
    ns.karras_sigmas(1)
  with pytest.raises(ValueError, match='sigma_min=0.0'):
    ns.karras_sigmas(10, 0.0, 80.0)
  with pytest.raises(ValueError, match='sigma_min=90'):
    ns.karras_sigmas(10, 90.0, 80.0)
