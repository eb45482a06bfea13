"""Every sampler of every method, driven by the exact denoiser of Gaussian data, samples that
Gaussian; whole loops against diffusers' Euler, Heun and EDM schedulers; guidance and bookkeeping.

For x0 ~ N(mu, Sigma) and x_t = alpha x0 + sigma eps, E[x0 | x_t] = mu + alpha Sigma
(alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha mu) is the ideal denoiser, so a correct sampler must
return N(mu, Sigma) up to its discretisation error and Monte-Carlo noise.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from lab.objectives.diffusion_method import Method, denoiser
from lab.sampling import diffusion_samplers as ds

MU = np.array([1.0, -0.5])
SIGMA = np.array([[1.0, 0.5], [0.5, 0.8]])


def exact_denoiser(x_t, alpha_B, sigma_B):
  """E[x0 | x_t] for x0 ~ N(MU, SIGMA): x_t [B, 2], alpha_B and sigma_B [B]. The 2x2 system
  A = alpha^2 SIGMA + sigma^2 I is solved by its adjugate."""
  (s11, s12), (_, s22) = SIGMA
  a2, v = alpha_B ** 2, sigma_B ** 2
  a, b, d = a2 * s11 + v, a2 * s12, a2 * s22 + v
  r1, r2 = x_t[:, 0] - alpha_B * MU[0], x_t[:, 1] - alpha_B * MU[1]
  det = a * d - b * b
  y1, y2 = (d * r1 - b * r2) / det, (a * r2 - b * r1) / det  # A^-1 r
  return jnp.stack([MU[0] + alpha_B * (s11 * y1 + s12 * y2),
                    MU[1] + alpha_B * (s12 * y1 + s22 * y2)], axis=1)


def sample_errors(method, sampler, steps, num, **options):
  """(mean error, covariance error, [(alpha, sigma)] of each denoiser call) for `num` samples.
  The errors are measured in SIGMA's whitened frame w = L^-1 (x - MU), SIGMA = L L^T:
  max |mean(w)| and max |cov(w) - I|."""
  calls = []

  def D(x_t, alpha_B, sigma_B):  # records evaluations at run time (not lax.cond's skipped ones)
    jax.debug.callback(lambda a, s: calls.append((float(a), float(s))), alpha_B[0], sigma_B[0])
    return exact_denoiser(x_t, alpha_B, sigma_B)

  run = jax.jit(lambda key: ds.sample_denoiser(method, D, key, (num, 2), sampler=sampler,
                                               steps=steps, **options))
  x = np.asarray(run(jax.random.key(0)), np.float64)
  jax.effects_barrier()
  assert np.all(np.isfinite(x))
  w = (x - MU) @ np.linalg.inv(np.linalg.cholesky(SIGMA)).T
  return np.abs(w.mean(0)).max(), np.abs(np.cov(w.T) - np.eye(2)).max(), np.array(calls)


METHODS = {
    'ddpm': Method('ddpm'),
    'vp': Method('vp'),
    've': Method('ve', sigma_min=0.01, sigma_max=50.0),
    'edm': Method('edm', sigma_min=0.002, sigma_max=80.0),
    'flow': Method('flow'),
}
EXACT = {'s_noise': 1.0}  # EDM's S_noise > 1 inflates the variance on purpose

# (kind, sampler, steps, options, samples, tolerance on both errors). Monte-Carlo noise: the
# whitened mean has std 1/sqrt(n) per coordinate and the covariance entries sqrt(1/n) to sqrt(2/n)
# (0.007-0.01 at n = 20000, 0.01-0.014 at n = 10000). Step counts keep the discretisation bias
# near or below that, and tolerances are ~4 standard errors. pc keeps a ~0.06 bias at any step
# count: its Langevin corrector (snr = 0.16) has ULA's O(step size) variance bias.
CASES = [
    ('ddpm', 'ancestral', 1000, {}, 10000, 0.06),
    ('ddpm', 'ddim', 500, {'eta': 0.5}, 20000, 0.04),  # 'leading' t_k = k floor(T/n) reaches 998
    ('ddpm', 'euler', 400, {}, 20000, 0.04),
    ('ddpm', 'heun', 60, {}, 20000, 0.04),
    ('ddpm', 'stochastic', 200, EXACT, 20000, 0.04),
    ('vp', 'em', 300, {}, 10000, 0.06),
    ('vp', 'pc', 300, {}, 10000, 0.12),
    ('vp', 'ode', 50, {}, 20000, 0.04),
    ('vp', 'ddim', 400, {}, 20000, 0.04),
    ('vp', 'euler', 400, {}, 20000, 0.04),
    ('vp', 'heun', 60, {}, 20000, 0.04),
    ('vp', 'stochastic', 200, EXACT, 20000, 0.04),
    ('ve', 'em', 300, {}, 10000, 0.06),
    ('ve', 'pc', 300, {}, 10000, 0.12),
    ('ve', 'ode', 200, {}, 20000, 0.04),
    ('ve', 'euler', 400, {}, 20000, 0.04),
    ('ve', 'heun', 60, {}, 20000, 0.04),
    ('ve', 'stochastic', 200, EXACT, 20000, 0.04),
    ('edm', 'euler', 400, {}, 20000, 0.04),
    ('edm', 'heun', 60, {}, 20000, 0.04),
    ('edm', 'stochastic', 200, EXACT, 20000, 0.04),
    ('flow', 'euler', 200, {}, 20000, 0.04),
    ('flow', 'heun', 10, {}, 20000, 0.04),
]


@pytest.mark.parametrize('kind,sampler,steps,options,num,tol', CASES,
                         ids=[f'{c[0]}-{c[1]}-{c[2]}' + ('-eta' if 'eta' in c[3] else '')
                              for c in CASES])
def test_sampler_reproduces_gaussian_data(kind, sampler, steps, options, num, tol):
  """The samples have mean MU and covariance SIGMA; the loop makes nfe() denoiser calls, each at a
  point (alpha, sigma) of the method's own path (the exact denoiser cannot see a wrong alpha:
  E[x0 | alpha x_hat] is the same for any alpha, while a network fed c_in x_t and c_noise can)."""
  mean_err, cov_err, calls = sample_errors(METHODS[kind], sampler, steps, num, **options)
  assert mean_err < tol and cov_err < tol, (mean_err, cov_err)
  assert len(calls) == ds.nfe(METHODS[kind], sampler, steps)
  alpha, sigma = calls.T
  on_path = {'ddpm': alpha ** 2 + sigma ** 2, 'vp': alpha ** 2 + sigma ** 2, 'flow': alpha + sigma,
             've': alpha, 'edm': alpha}[kind]
  np.testing.assert_allclose(on_path, 1.0, rtol=2e-6)


def test_ddim_with_eta_one_over_the_full_chain_is_ancestral():
  """DDIM's eta = 1 on every step of the chain is DDPM (Song et al. 2021, §4.1): with the same key
  both loops draw the same noise and must agree to float32 rounding."""
  method = Method('ddpm', num_steps=50)
  run = lambda sampler, eta: ds.sample_denoiser(method, exact_denoiser, jax.random.key(3),
                                                (256, 2), sampler=sampler, steps=50, eta=eta)
  np.testing.assert_allclose(run('ddim', 1.0), run('ancestral', 0.0), rtol=1e-5, atol=1e-5)


def net(params, x, c_noise_B, labels_B):
  """A smooth stand-in for a trained network, F(x, c_noise) [B, 6]; its eps ~ x_t keeps samples
  of a ddpm / vp path at a data-like scale."""
  del labels_B
  return 0.9 * x + 0.3 * jnp.tanh(x @ params + c_noise_B[:, None] / 500.0)


def their_net(params, x, t):
  """`net` on diffusers' side: a torch sample and their (fractional) timestep."""
  t_B = jnp.full((x.shape[0],), float(t), jnp.float32)
  return torch.tensor(np.asarray(net(params, jnp.asarray(x.numpy()), t_B, None)))


def lab_and_their_start(key, shape):
  """sample_denoiser draws its x_T direction from the first half of split(key)."""
  return np.asarray(jax.random.normal(jax.random.split(key)[0], shape))


PARAMS = jnp.asarray(np.random.default_rng(7).standard_normal((6, 6)) / 3, jnp.float32)


def run_theirs(sched, params, x):
  """diffusers' sampling loop from x (their pipelines' order: scale input, model, step)."""
  for t in sched.timesteps:
    x = sched.step(their_net(params, sched.scale_model_input(x, t), t), t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize('cls,sampler,prediction', [(EulerDiscreteScheduler, 'euler', 'eps'),
                                                    (EulerDiscreteScheduler, 'euler', 'v'),
                                                    (HeunDiscreteScheduler, 'heun', 'eps')])
def test_ddpm_loop_matches_diffusers_karras(cls, sampler, prediction):
  """The whole ddpm euler / heun loop against Euler/HeunDiscreteScheduler(use_karras_sigmas=True,
  timestep_spacing='linspace'): same start, same network, same fractional timesteps."""
  n, key, shape = 12, jax.random.key(4), (4, 6)
  sched = cls(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02,
              use_karras_sigmas=True, timestep_spacing='linspace',
              prediction_type={'eps': 'epsilon', 'v': 'v_prediction'}[prediction])
  sched.set_timesteps(n)
  z = lab_and_their_start(key, shape)
  want = run_theirs(sched, PARAMS, torch.tensor(z) * sched.init_noise_sigma)
  got = ds.sample(Method('ddpm', prediction=prediction), net, PARAMS, key, shape,
                  sampler=sampler, steps=n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_edm_euler_loop_matches_diffusers():
  """The edm euler loop against EDMEulerScheduler (its c_in, c_noise = ln(sigma)/4, c_skip and
  c_out). Their init_noise_sigma is sqrt(sigma_max^2 + 1), so both start from sigma_max z."""
  n, key, shape = 12, jax.random.key(5), (4, 6)
  sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0)
  sched.set_timesteps(n)
  z = lab_and_their_start(key, shape)
  want = run_theirs(sched, PARAMS, torch.tensor(z) * 80.0)
  got = ds.sample(Method('edm', sigma_min=0.002, sigma_max=80.0), net, PARAMS, key, shape,
                  sampler='euler', steps=n)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def labelled_net(params, x, c_noise_B, labels_B):
  """A network whose output depends on the label (label 3 is the null label)."""
  return net(params, x, c_noise_B, None) + 0.5 * jnp.sin(labels_B.astype(jnp.float32))[:, None]


def test_guidance_interpolates_conditional_and_unconditional():
  """Ho & Salimans 2022, eq. 6: D_w = D(x | null) + w (D(x | y) - D(x | null))."""
  method = Method('edm')
  x_t = jnp.asarray(np.random.default_rng(8).standard_normal((4, 6)), jnp.float32)
  alpha, sigma = jnp.ones(4), jnp.asarray([0.1, 1.0, 3.0, 20.0])
  labels = jnp.asarray([0, 1, 2, 1])
  cond = np.asarray(denoiser(method, labelled_net, PARAMS, labels)(x_t, alpha, sigma))
  uncond = np.asarray(denoiser(method, labelled_net, PARAMS, jnp.full(4, 3))(x_t, alpha, sigma))
  assert np.abs(cond - uncond).max() > 0.05
  for w in (1.0, 0.0, 2.5, -0.5):
    guided = ds.guided_denoiser(method, labelled_net, PARAMS, labels, w, 3)(x_t, alpha, sigma)
    np.testing.assert_allclose(guided, uncond + w * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_sample_needs_null_label_for_guidance():
  with pytest.raises(ValueError, match='null_label'):
    ds.sample(Method('edm'), labelled_net, PARAMS, jax.random.key(0), (2, 6), sampler='euler',
              steps=4, labels_B=jnp.asarray([0, 1]), guidance_scale=2.0)


@pytest.mark.parametrize('kind,sampler,steps,match', [
    ('ddpm', 'em', 10, "'em' for method 'ddpm'"),
    ('flow', 'stochastic', 10, "'stochastic' for method 'flow'"),
    ('edm', 'ancestral', 10, "'ancestral' for method 'edm'"),
    ('ve', 'ddim', 10, "'ddim' for method 've'"),
    ('edm', 'heun', 1, 'steps=1'),
    ('vp', 'em', 1, 'steps=1'),
    ('flow', 'euler', 0, 'steps=0'),
    ('ddpm', 'ddim', 0, 'steps=0'),
    ('ddpm', 'ddim', 1001, 'ddim steps=1001'),
])
def test_check_raises(kind, sampler, steps, match):
  with pytest.raises(ValueError, match=match):
    ds.check(Method(kind), sampler, steps)


def test_every_listed_sampler_passes_check():
  for kind, samplers in ds.SAMPLERS.items():
    for sampler in samplers:
      ds.check(Method(kind), sampler, 2)
  ds.check(Method('flow'), 'euler', 1)
  ds.check(Method('ddpm'), 'ddim', 1000)


def gaussian_score(x, alpha, sigma):
  """grad log N(x; alpha MU, alpha^2 SIGMA + sigma^2 I) = -A^-1 (x - alpha MU)."""
  A = alpha ** 2 * SIGMA + sigma ** 2 * np.eye(2)
  return -np.linalg.solve(A, (x - alpha * MU).T).T


@pytest.mark.parametrize('kind', ['vp', 've'])
def test_sde_coefficients_match_the_path(kind, x64):
  """For x_t = alpha x0 + sigma eps to solve dx = f x dt + g dw: f = d ln(alpha)/dt and
  g^2 = d sigma^2/dt - 2 f sigma^2 (Kingma et al. 2021, App. A), by central differences."""
  method = Method(kind)
  t = np.array([0.01, 0.2, 0.5, 0.9])
  h = 1e-6
  alpha = lambda t: np.asarray(method.alpha_sigma(jnp.asarray(t))[0])
  sigma = lambda t: np.asarray(method.alpha_sigma(jnp.asarray(t))[1])
  f_want = (np.log(alpha(t + h)) - np.log(alpha(t - h))) / (2 * h)
  g2_want = (sigma(t + h) ** 2 - sigma(t - h) ** 2) / (2 * h) - 2 * f_want * sigma(t) ** 2
  f, g2 = ds.sde_coefficients(method, jnp.asarray(t))
  np.testing.assert_allclose(f, f_want, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(g2, g2_want, rtol=1e-6)


def test_sde_coefficients_raise_for_ode_only_methods():
  with pytest.raises(ValueError, match="'edm'"):
    ds.sde_coefficients(Method('edm'), jnp.asarray([0.5]))


@pytest.mark.parametrize('kind', ['vp', 've'])
def test_score_and_probability_flow_drift(kind, x64):
  """Tweedie: the exact denoiser's score is the Gaussian marginal's; the PF-ODE drift is
  f x - g^2 score / 2 (Song et al. 2021, eq. 13)."""
  method = Method(kind)
  rng = np.random.default_rng(9)
  x = rng.standard_normal((5, 2)) * 3
  t = np.array([0.01, 0.1, 0.4, 0.7, 1.0])
  alpha, sigma = (np.asarray(v) for v in method.alpha_sigma(jnp.asarray(t)))
  want = np.stack([gaussian_score(x[i:i + 1], alpha[i], sigma[i])[0] for i in range(5)])
  score = ds.score_fn(method, exact_denoiser)(jnp.asarray(x), jnp.asarray(t))
  np.testing.assert_allclose(score, want, rtol=1e-9, atol=1e-9)
  f, g2 = (np.asarray(v) for v in ds.sde_coefficients(method, jnp.asarray(t)))
  drift = ds.pf_ode_drift(method, exact_denoiser)(jnp.asarray(x), jnp.asarray(t))
  np.testing.assert_allclose(drift, f[:, None] * x - 0.5 * g2[:, None] * want, rtol=1e-9,
                             atol=1e-9)
