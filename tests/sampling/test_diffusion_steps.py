"""Single sampler steps against diffusers' DDPM, DDIM, Euler and Heun schedulers (same inputs, same
noise) and against the papers' formulas in float64."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler)

from lab.objectives.diffusion_method import Method, denoiser
from lab.sampling import diffusion_steps as steps
from lab.sampling.diffusion_samplers import discrete_grid

THEIR_PREDICTION = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
SHAPE = (4, 6)
HO_BETAS = {'beta_start': 1e-4, 'beta_end': 0.02}  # Heun's defaults are Stable Diffusion's


W = jnp.asarray(np.random.default_rng(99).standard_normal((SHAPE[1], SHAPE[1])) / 3, jnp.float32)


def net(params, x, c_noise_B, labels_B):
  """A smooth stand-in for a trained network: F(x, c_noise), float32."""
  del params, labels_B
  return 0.8 * jnp.tanh(x @ W + c_noise_B[:, None] / 500.0) + 0.1 * x


def their_net(x, t):
  """`net` on diffusers' side: a torch sample and their (fractional) timestep."""
  t_B = jnp.full((x.shape[0],), float(t), jnp.float32)
  return torch.tensor(np.asarray(net(None, jnp.asarray(x.numpy()), t_B, None)))


def draw(seed, scale=1.0):
  """(x, F): a sample of std `scale` and a network output, float32 [4, 6]."""
  rng = np.random.default_rng(seed)
  x, F = rng.standard_normal((2, *SHAPE))
  return (scale * x).astype(np.float32), F.astype(np.float32)


def x0_hat(method, x_t, F, alpha, sigma):
  """x0_hat = a x_t + b F with the method's coefficients."""
  _, a, b = method.coefficients(jnp.float32(alpha), jnp.float32(sigma))
  return a * x_t + b * F


def their_ddim(n, prediction='eps'):
  sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule='linear', **HO_BETAS,
                        set_alpha_to_one=True, steps_offset=0, timestep_spacing='leading',
                        clip_sample=False, prediction_type=THEIR_PREDICTION[prediction])
  sched.set_timesteps(n)
  return sched


def np_x0(prediction, F, x_t, abar):
  """x0 from the network output: Ho eq. 15 (eps), Salimans & Ho §4 (v), or F itself."""
  if prediction == 'eps':
    return (x_t - np.sqrt(1 - abar) * F) / np.sqrt(abar)
  return np.sqrt(abar) * x_t - np.sqrt(1 - abar) * F if prediction == 'v' else F


@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0'])
@pytest.mark.parametrize('t', [999, 500, 1, 0])
def test_ancestral_step_matches_diffusers_ddpm(prediction, t):
  """One step of the sampler's chain (alpha, sigma from discrete_grid) against DDPMScheduler.step
  with the noise it drew, and against Ho et al. eq. 7 in float64."""
  sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', **HO_BETAS,
                        clip_sample=False, variance_type='fixed_small',
                        prediction_type=THEIR_PREDICTION[prediction])
  method = Method('ddpm', prediction=prediction)
  x_t, F = draw(t)
  out = sched.step(torch.tensor(F), t, torch.tensor(x_t),
                   generator=torch.Generator().manual_seed(t))
  z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t)).numpy()  # the noise they drew

  alphas, sigmas = (np.float32(v) for v in discrete_grid(method, 'ancestral', 1000))
  k = 999 - t
  x0 = x0_hat(method, x_t, F, alphas[k], sigmas[k])
  got = steps.ancestral_step(x_t, x0, alphas[k], sigmas[k], alphas[k + 1], sigmas[k + 1], z)

  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.append(np.cumprod(1 - betas), 1.0)  # abar[-1]: the step from t = 0 lands on x0
  a_t, a_s, beta = abar[t], abar[t - 1], betas[t]
  want_x0 = np_x0(prediction, F, x_t, a_t)
  want = (np.sqrt(a_s) * beta / (1 - a_t) * want_x0
          + np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t) * x_t
          + np.sqrt((1 - a_s) / (1 - a_t) * beta) * z)
  # x0 = x_t / alpha - ... amplifies float32 rounding by 1 / alpha_t = 158 at t = 999.
  np.testing.assert_allclose(x0, want_x0, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
  # Theirs forms 1 - abar in float32: near t = 0 that keeps ~4 digits.
  np.testing.assert_allclose(x0, out.pred_original_sample.numpy(), rtol=1e-5, atol=2e-4)
  np.testing.assert_allclose(got, out.prev_sample.numpy(), atol=5e-4 if t < 10 else 2e-5)


@pytest.mark.parametrize('n', [10, 50, 7, 1000])
def test_ddim_grid_matches_diffusers_timesteps(n):
  sched = their_ddim(n)
  method = Method('ddpm')
  alphas, sigmas = discrete_grid(method, 'ddim', n)
  assert alphas.shape == sigmas.shape == (n + 1,)
  assert (alphas[-1], sigmas[-1]) == (1.0, 0.0)  # set_alpha_to_one: the last step lands on abar = 1
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  ts = np.abs(np.sqrt(abar)[None] - alphas[:-1, None]).argmin(1)  # the grid's timesteps
  np.testing.assert_array_equal(ts, sched.timesteps.numpy())
  np.testing.assert_allclose(alphas[:-1], np.sqrt(abar[ts]), rtol=1e-14)
  np.testing.assert_allclose(sigmas[:-1], np.sqrt(1 - abar[ts]), rtol=1e-12)


def test_ancestral_and_vp_grids():
  method = Method('ddpm', num_steps=50)
  alphas, sigmas = discrete_grid(method, 'ancestral', 3)  # steps ignored: the whole chain
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))[::-1]
  np.testing.assert_allclose(alphas, np.append(np.sqrt(abar), 1.0), rtol=1e-14)
  np.testing.assert_allclose(sigmas, np.append(np.sqrt(1 - abar), 0.0), rtol=1e-12)
  vp = Method('vp', t_eps=1e-3)
  alphas, sigmas = discrete_grid(vp, 'ddim', 6)
  t = np.linspace(1.0, 1e-3, 6)
  log_mean = -0.25 * t ** 2 * 19.9 - 0.5 * t * 0.1  # Song et al. 2021, eq. 33
  np.testing.assert_allclose(alphas, np.append(np.exp(log_mean), 1.0), rtol=1e-12)
  np.testing.assert_allclose(sigmas, np.append(np.sqrt(1 - np.exp(2 * log_mean)), 0.0),
                             rtol=1e-10)


@pytest.mark.parametrize('prediction', ['eps', 'v', 'x0'])
@pytest.mark.parametrize('eta', [0.0, 0.7])
@pytest.mark.parametrize('k', [0, 4, 9])
def test_ddim_step_matches_diffusers(prediction, eta, k):
  n = 10
  sched = their_ddim(n, prediction)
  method = Method('ddpm', prediction=prediction)
  alphas, sigmas = (np.float32(v) for v in discrete_grid(method, 'ddim', n))
  x_t, F = draw(k)
  z = np.random.default_rng(k + 100).standard_normal(SHAPE).astype(np.float32)
  out = sched.step(torch.tensor(F), int(sched.timesteps[k]), torch.tensor(x_t), eta=eta,
                   variance_noise=torch.tensor(z))
  x0 = x0_hat(method, x_t, F, alphas[k], sigmas[k])
  np.testing.assert_allclose(x0, out.pred_original_sample.numpy(), rtol=1e-5, atol=2e-4)
  got = steps.ddim_step(x_t, x0, alphas[k], sigmas[k], alphas[k + 1], sigmas[k + 1], eta, z)
  np.testing.assert_allclose(got, out.prev_sample.numpy(), rtol=1e-5, atol=3e-5)


def their_euler(cls, n):
  sched = cls(num_train_timesteps=1000, beta_schedule='linear', **HO_BETAS,
              prediction_type='epsilon', use_karras_sigmas=True, timestep_spacing='linspace')
  sched.set_timesteps(n)
  return sched


def lab_x0(x_hat, sigma):
  """D at EDM's unscaled x_hat and sigma for the eps-predicting ddpm `net` (the sampler's x0_of)."""
  method = Method('ddpm')
  alpha = method.alpha_from_sigma_edm(jnp.full((SHAPE[0],), sigma, jnp.float32))
  return denoiser(method, net, None)(alpha[:, None] * x_hat, alpha, alpha * sigma)


@pytest.mark.parametrize('i', [0, 6, 11])  # 11: the last step, into sigma = 0
def test_euler_step_matches_diffusers(i):
  """EulerDiscreteScheduler steps EDM's unscaled x_hat = x_t sqrt(1 + sigma^2) and feeds the
  model x_hat / sqrt(1 + sigma^2) with a fractional timestep: one Euler step of EDM Alg. 1."""
  sched = their_euler(EulerDiscreteScheduler, 12)
  sigma, sigma_next = (float(s) for s in sched.sigmas[i:i + 2])
  x_hat = draw(i, scale=sigma)[0]
  sched.set_begin_index(i)
  t = sched.timesteps[i]
  out = sched.step(their_net(sched.scale_model_input(torch.tensor(x_hat), t), t), t,
                   torch.tensor(x_hat))
  d = steps.ode_derivative(x_hat, lab_x0(x_hat, sigma), sigma)
  got = steps.euler_step(x_hat, d, sigma, sigma_next)
  np.testing.assert_allclose(got, out.prev_sample.numpy(), rtol=2e-5, atol=2e-5 * max(sigma, 1.0))


@pytest.mark.parametrize('i', [0, 5, 10])
def test_heun_step_matches_diffusers(i):
  """HeunDiscreteScheduler's two calls (1st order at sigma_i, correction at sigma_{i+1}) are one
  Heun step of EDM Alg. 1; both sides see the same analytic model."""
  sched = their_euler(HeunDiscreteScheduler, 12)
  sigma, sigma_next = float(sched.sigmas[2 * i]), float(sched.sigmas[2 * i + 1])
  x_hat = draw(i, scale=sigma)[0]
  sched.set_begin_index(2 * i)
  sample = torch.tensor(x_hat)
  for t in sched.timesteps[2 * i:2 * i + 2]:
    sample = sched.step(their_net(sched.scale_model_input(sample, t), t), t, sample).prev_sample

  d = steps.ode_derivative(x_hat, lab_x0(x_hat, sigma), sigma)
  x_euler = steps.euler_step(x_hat, d, sigma, sigma_next)
  d_next = steps.ode_derivative(x_euler, lab_x0(x_euler, sigma_next), sigma_next)
  got = steps.heun_correct(x_hat, d, d_next, sigma, sigma_next)
  np.testing.assert_allclose(got, sample.numpy(), rtol=2e-5, atol=2e-5 * max(sigma, 1.0))


@pytest.mark.parametrize('i', [2, 9])
def test_churn_then_euler_matches_diffusers(i):
  """EulerDiscreteScheduler with s_churn: EDM Alg. 2 lines 4-7 (churn up to sigma_hat, one Euler
  step from there). We hand both sides the model output at the churned point."""
  n, s_churn, s_noise = 12, 5.0, 1.003
  sched = their_euler(EulerDiscreteScheduler, n)
  sigma, sigma_next = (float(s) for s in sched.sigmas[i:i + 2])
  x_hat = draw(i, scale=sigma)[0]
  z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)).numpy()
  gamma = min(s_churn / n, np.sqrt(2) - 1)
  x_churn, sigma_hat = steps.churn(x_hat, sigma, gamma, s_noise, z)
  np.testing.assert_allclose(sigma_hat, sigma * (1 + gamma), rtol=1e-6)
  method = Method('ddpm')
  alpha_hat = float(method.alpha_from_sigma_edm(jnp.float32(sigma_hat)))
  full = lambda v: jnp.full((SHAPE[0],), v, jnp.float32)
  F = np.asarray(net(None, alpha_hat * x_churn,
                     method.c_noise(full(alpha_hat), full(alpha_hat * sigma_hat)), None))

  sched.set_begin_index(i)
  out = sched.step(torch.tensor(F), sched.timesteps[i], torch.tensor(x_hat), s_churn=s_churn,
                   s_noise=s_noise, generator=torch.Generator().manual_seed(i))
  x0 = x0_hat(method, alpha_hat * x_churn, F, alpha_hat, alpha_hat * sigma_hat)
  got = steps.euler_step(x_churn, steps.ode_derivative(x_churn, x0, sigma_hat), sigma_hat,
                         sigma_next)
  np.testing.assert_allclose(got, out.prev_sample.numpy(), rtol=2e-5, atol=2e-5 * sigma)


def test_churn_formula(x64):
  """EDM Alg. 2 lines 5-6: sigma_hat = (1 + gamma) sigma, x + sqrt(sigma_hat^2 - sigma^2) S z."""
  rng = np.random.default_rng(0)
  x, z = rng.standard_normal((2, *SHAPE))
  for gamma in (0.0, 0.05, np.sqrt(2) - 1):
    x_hat, sigma_hat = steps.churn(jnp.asarray(x), 3.0, gamma, 1.007, jnp.asarray(z))
    assert sigma_hat == 3.0 * (1 + gamma)
    np.testing.assert_allclose(x_hat, x + np.sqrt(sigma_hat ** 2 - 9.0) * 1.007 * z, rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize('t', [1, 2, 10, 500, 999])
def test_posterior_matches_ho_eq7(t, x64):
  """Ho et al. 2020, eq. 7: mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0 +
  sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t, beta_tilde = (1 - abar_{t-1}) / (1 - abar_t)
  beta_t (1-based t)."""
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  a_t, a_s, beta = abar[t], abar[t - 1], betas[t]
  got = steps.posterior(np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_s), np.sqrt(1 - a_s))
  want = (np.sqrt(a_s) * beta / (1 - a_t), np.sqrt(1 - beta) * (1 - a_s) / (1 - a_t),
          (1 - a_s) / (1 - a_t) * beta)
  np.testing.assert_allclose(got, want, rtol=1e-9)
  np.testing.assert_allclose(steps.posterior(np.sqrt(abar[0]), np.sqrt(1 - abar[0]), 1.0, 0.0),
                             (1.0, 0.0, 0.0), atol=1e-15)  # the last step returns x0


@pytest.mark.parametrize('path', ['ve', 'flow', 'vp'])
def test_posterior_is_the_gaussian_conditional(path, x64):
  """For any path x_t = alpha_t x0 + sigma_t eps with x_s -> x_t Markov, q(x_s | x_t, x0) is the
  conditional of the joint Gaussian: Cov(x_s, x_t | x0) = alpha_ts sigma_s^2, so
  mean = alpha_s x0 + alpha_ts sigma_s^2 / sigma_t^2 (x_t - alpha_t x0),
  var = sigma_s^2 - (alpha_ts sigma_s^2)^2 / sigma_t^2."""
  alpha_t, sigma_t, alpha_s, sigma_s = {'ve': (1.0, 7.0, 1.0, 2.5), 'flow': (0.3, 0.7, 0.6, 0.4),
                                        'vp': (0.6, 0.8, 0.8, 0.6)}[path]
  rng = np.random.default_rng(1)
  x0, x_t = rng.standard_normal((2, *SHAPE))
  c_x0, c_xt, var = steps.posterior(alpha_t, sigma_t, alpha_s, sigma_s)
  cov = alpha_t / alpha_s * sigma_s ** 2
  np.testing.assert_allclose(c_x0 * x0 + c_xt * x_t,
                             alpha_s * x0 + cov / sigma_t ** 2 * (x_t - alpha_t * x0), rtol=1e-12)
  np.testing.assert_allclose(var, sigma_s ** 2 - cov ** 2 / sigma_t ** 2, rtol=1e-12)


@pytest.mark.parametrize('eta', [0.0, 0.3, 1.0])
def test_ddim_step_matches_song_eq12(eta, x64):
  """DDIM eq. 12 with eq. 16's sigma_t(eta), written with abar (the paper's alpha)."""
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  rng = np.random.default_rng(2)
  x_t, x0, z = rng.standard_normal((3, *SHAPE))
  for t, s in ((999, 899), (300, 200), (50, 0)):
    a_t, a_s = abar[t], abar[s]
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1 - a_t)
    sig = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
    want = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s - sig ** 2) * eps + sig * z
    got = steps.ddim_step(x_t, x0, np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_s), np.sqrt(1 - a_s),
                          eta, z)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_ddim_with_eta_one_is_ancestral(x64):
  rng = np.random.default_rng(3)
  x_t, x0, z = rng.standard_normal((3, *SHAPE))
  for coeffs in ((0.6, 0.8, 0.8, 0.6), (1.0, 7.0, 1.0, 2.5), (0.3, 0.7, 0.6, 0.4)):
    np.testing.assert_allclose(steps.ddim_step(x_t, x0, *coeffs, 1.0, z),
                               steps.ancestral_step(x_t, x0, *coeffs, z), rtol=1e-12, atol=1e-12)


def test_reverse_sde_step_matches_song(x64):
  """Euler-Maruyama on the reverse SDE as score_sde's EulerMaruyamaPredictor: with dt < 0,
  x_mean = x + (f - g^2 score) dt, x = x_mean + g sqrt(-dt) z."""
  rng = np.random.default_rng(4)
  x, drift, z = rng.standard_normal((3, *SHAPE))
  got, mean = steps.reverse_sde_step(x, drift, 2.5, 0.01, z)
  np.testing.assert_allclose(mean, x + drift * -0.01, rtol=1e-13)
  np.testing.assert_allclose(got, x + drift * -0.01 + 2.5 * np.sqrt(0.01) * z, rtol=1e-13)


def test_langevin_correct_matches_song(x64):
  """score_sde's LangevinCorrector: step = 2 alpha (snr mean_b ||z_b|| / mean_b ||score_b||)^2,
  x + step score + sqrt(2 step) z."""
  rng = np.random.default_rng(5)
  x, score, z = rng.standard_normal((3, 4, 3, 5))
  score *= np.array([1.0, 3.0, 0.5, 2.0])[:, None, None]  # per-example norms differ
  norm = lambda v: np.linalg.norm(v.reshape(4, -1), axis=1).mean()
  step = 2 * 0.97 * (0.16 * norm(z) / norm(score)) ** 2
  np.testing.assert_allclose(steps.langevin_correct(x, score, 0.16, 0.97, z),
                             x + step * score + np.sqrt(2 * step) * z, rtol=1e-12)
