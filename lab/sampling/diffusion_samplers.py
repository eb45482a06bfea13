"""Diffusion and flow samplers over one denoiser, each a loop of lab.sampling.diffusion_steps.

  ancestral   DDPM (Ho et al. 2020, Alg. 2) over all T steps                      NFE T
  ddim        DDIM (Song, Meng & Ermon 2021) on the sub-sequence t = T-1-k T/n ... NFE n
              (diffusers' 'leading' spacing), eta = 0 deterministic
  euler       1st-order solver of the probability-flow ODE: EDM's rho = 7 sigma steps
              (Karras et al. 2022, eq. 5), or t = 1 .. 0 evenly for flow               NFE n
  heun        EDM Algorithm 1 (2nd order, no correction into sigma = 0)              NFE 2n - 1
  stochastic  EDM Algorithm 2 (S_churn, S_tmin, S_tmax, S_noise) with Heun            NFE 2n - 1
  em          Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6)            NFE n
  pc          predictor-corrector: Langevin corrector then EM predictor (Alg. 4/5)   NFE 2n - 1
  ode         the probability-flow ODE (Song et al. 2021, eq. 13) by Heun in t       NFE 2n - 1
em, pc and ode finish with the denoiser's estimate at t_eps (Tweedie's formula).

Classifier-free guidance (Ho & Salimans 2022, eq. 6) enters through the denoiser:
D_w = D(x | null) + w (D(x | y) - D(x | null)), w = guidance_scale, batched in one forward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lab.objectives import noise_schedules as ns
from lab.objectives.diffusion_method import Method, denoiser
from lab.sampling import diffusion_steps as steps_lib

SAMPLERS = {
    'ddpm': ('ancestral', 'ddim', 'euler', 'heun', 'stochastic'),
    'vp': ('em', 'pc', 'ode', 'ddim', 'euler', 'heun', 'stochastic'),
    've': ('em', 'pc', 'ode', 'euler', 'heun', 'stochastic'),
    'edm': ('euler', 'heun', 'stochastic'),
    'flow': ('euler', 'heun'),
}


def check(method: Method, sampler: str, steps: int) -> None:
  """Raises a one-line ValueError for a sampler the method lacks or a bad step count."""
  if sampler not in SAMPLERS[method.kind]:
    raise ValueError(f'sampler {sampler!r} for method {method.kind!r}; expected one of '
                     f'{SAMPLERS[method.kind]}')
  low = 1 if sampler in ('ancestral', 'ddim') or method.kind == 'flow' else 2
  if steps < low:
    raise ValueError(f'sample steps={steps}; expected >= {low} for {sampler}')
  if method.kind == 'ddpm' and sampler == 'ddim' and steps > method.num_steps:
    raise ValueError(f'ddim steps={steps} exceeds the {method.num_steps} training steps')


def nfe(method: Method, sampler: str, steps: int) -> int:
  """Network evaluations of one sample (per guidance branch)."""
  if sampler == 'ancestral':
    return method.num_steps
  if sampler in ('heun', 'stochastic', 'ode', 'pc'):
    return 2 * steps - 1
  return steps


def guided_denoiser(method: Method, net, params, labels_B, guidance_scale: float,
                    null_label: int | None):
  """D(x_t, alpha_B, sigma_B) -> x0_hat, with classifier-free guidance when w != 1."""
  if labels_B is None or guidance_scale == 1.0:
    return denoiser(method, net, params, labels_B)
  both = denoiser(method, net, params,
                  jnp.concatenate([labels_B, jnp.full_like(labels_B, null_label)]))

  def D(x_t, alpha_B, sigma_B):
    two = lambda v: jnp.concatenate([v, v])
    cond, uncond = jnp.split(both(two(x_t), two(alpha_B), two(sigma_B)), 2)
    return uncond + guidance_scale * (cond - uncond)
  return D


def sample(method: Method, net, params, key: jax.Array, shape: tuple[int, ...], *,
           sampler: str, steps: int, labels_B=None, guidance_scale: float = 1.0,
           null_label: int | None = None, **options):
  """Samples of `shape` (batch first) from the model `net(params, x, c_noise_B, labels_B)`."""
  if labels_B is not None and guidance_scale != 1.0 and null_label is None:
    raise ValueError("guidance_scale != 1 needs null_label (the model's num_classes)")
  D = guided_denoiser(method, net, params, labels_B, guidance_scale, null_label)
  return sample_denoiser(method, D, key, shape, sampler=sampler, steps=steps, **options)


def sample_denoiser(method: Method, D, key: jax.Array, shape: tuple[int, ...], *, sampler: str,
                    steps: int, eta: float = 0.0, rho: float = 7.0, s_churn: float = 40.0,
                    s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003,
                    snr: float = 0.16, clip_x0: float = 0.0):
  """Samples with any denoiser D(x_t, alpha_B, sigma_B) -> x0_hat (e.g. an analytic one).

  clip_x0 > 0 clips every x0 estimate to [-clip_x0, clip_x0], as the DDPM and DDIM image
  samplers do for data in [-1, 1] (Ho et al.'s code; diffusers' clip_sample); 0 leaves it.
  """
  check(method, sampler, steps)
  if clip_x0 > 0:
    unclipped = D
    D = lambda x_t, alpha_B, sigma_B: jnp.clip(unclipped(x_t, alpha_B, sigma_B), -clip_x0, clip_x0)
  init_key, loop_key = jax.random.split(key)
  z = jax.random.normal(init_key, shape)
  B = shape[0]
  full = lambda v: jnp.full((B,), v, jnp.float32)
  if sampler in ('ancestral', 'ddim'):
    return _discrete(method, D, z, loop_key, sampler, steps, eta, full)
  if sampler in ('em', 'pc', 'ode'):
    return _sde(method, D, z, loop_key, sampler, steps, snr, full)
  if method.kind == 'flow':
    return solve_flow(D, z, steps, second_order=sampler == 'heun')
  sigma_min, sigma_max = method.sampling_range()
  sigmas = ns.karras_sigmas(steps, sigma_min, sigma_max, rho)

  def x0_of(x_hat, sigma):
    alpha = method.alpha_from_sigma_edm(full(sigma))
    return D(_expand(alpha, x_hat) * x_hat, alpha, alpha * sigma)

  x_hat = sigmas[0] * z
  if sampler == 'stochastic':
    gamma = min(s_churn / steps, np.sqrt(2.0) - 1.0)
    gammas = np.where((sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax), gamma, 0.0)
    return _stochastic(x0_of, x_hat, sigmas, gammas, s_noise, loop_key)
  return _ode(x0_of, x_hat, sigmas, sampler == 'heun')


def solve_flow(D, z, steps: int, second_order: bool = False):
  """x_0 from x_1 = z along the flow ODE dx_t/dt = (x_t - D(x_t)) / t, t = 1 .. 0 evenly
  (Euler, or Heun with second_order); D is a flow denoiser D(x_t, alpha = 1 - t, sigma = t)."""
  full = lambda v: jnp.full((z.shape[0],), v, jnp.float32)
  x0_of = lambda x, tau: D(x, full(1.0 - tau), full(tau))
  return _ode(x0_of, z, np.linspace(1.0, 0.0, steps + 1), second_order)


def _expand(v_B, x):
  return jnp.reshape(v_B, v_B.shape + (1,) * (x.ndim - 1))


def _ode(x0_of, x, taus: np.ndarray, second_order: bool):
  """EDM Algorithm 1 over the grid taus (descending, last 0): Euler, plus Heun's correction
  when second_order and tau_{i+1} > 0."""
  def body(x, pair):
    tau, tau_next = pair
    d = steps_lib.ode_derivative(x, x0_of(x, tau), tau)
    x_next = steps_lib.euler_step(x, d, tau, tau_next)
    if not second_order:
      return x_next, None
    heun = lambda: steps_lib.heun_correct(
        x, d, steps_lib.ode_derivative(x_next, x0_of(x_next, tau_next), tau_next), tau, tau_next)
    return jax.lax.cond(tau_next > 0, heun, lambda: x_next), None
  pairs = jnp.asarray(np.stack([taus[:-1], taus[1:]], 1), jnp.float32)
  return jax.lax.scan(body, x, pairs)[0]


def _stochastic(x0_of, x, sigmas: np.ndarray, gammas: np.ndarray, s_noise: float, key):
  """EDM Algorithm 2: churn up to sigma_hat, then a Heun step from sigma_hat to sigma_{i+1}."""
  def body(x, inputs):
    sigma, sigma_next, gamma, step_key = inputs
    x_hat, sigma_hat = steps_lib.churn(x, sigma, gamma, s_noise,
                                       jax.random.normal(step_key, x.shape))
    d = steps_lib.ode_derivative(x_hat, x0_of(x_hat, sigma_hat), sigma_hat)
    x_next = steps_lib.euler_step(x_hat, d, sigma_hat, sigma_next)
    heun = lambda: steps_lib.heun_correct(
        x_hat, d, steps_lib.ode_derivative(x_next, x0_of(x_next, sigma_next), sigma_next),
        sigma_hat, sigma_next)
    return jax.lax.cond(sigma_next > 0, heun, lambda: x_next), None
  n = len(gammas)
  xs = (jnp.asarray(sigmas[:-1], jnp.float32), jnp.asarray(sigmas[1:], jnp.float32),
        jnp.asarray(gammas, jnp.float32), jax.random.split(key, n))
  return jax.lax.scan(body, x, xs)[0]


def discrete_grid(method: Method, sampler: str, steps: int):
  """(alpha, sigma) from noisiest to clean, ending at (1, 0). ddpm: all T steps for ancestral,
  t_k = k floor(T / n) descending for ddim; vp: t evenly from 1 to t_eps."""
  if method.kind == 'ddpm':
    T = method.num_steps
    ts = np.arange(T)[::-1] if sampler == 'ancestral' else (np.arange(steps) * (T // steps))[::-1]
    abar = method.alpha_bars[ts]
    alphas, sigmas = np.sqrt(abar), np.sqrt(1.0 - abar)
  else:
    sigma_edm = ns.vp_sigma(np.linspace(1.0, method.t_eps, steps), method.beta_min,
                            method.beta_max)
    alphas = 1.0 / np.sqrt(1.0 + sigma_edm ** 2)
    sigmas = alphas * sigma_edm
  return np.append(alphas, 1.0), np.append(sigmas, 0.0)


def _discrete(method, D, z, key, sampler, steps, eta, full):
  """DDPM ancestral or DDIM steps over discrete_grid, starting from x_T = sigma_T z."""
  alphas, sigmas = discrete_grid(method, sampler, steps)
  eta = 1.0 if sampler == 'ancestral' else eta

  def body(x, inputs):
    a_t, s_t, a_s, s_s, step_key = inputs
    x0 = D(x, full(a_t), full(s_t))
    noise = jax.random.normal(step_key, x.shape)
    if sampler == 'ancestral':
      return steps_lib.ancestral_step(x, x0, a_t, s_t, a_s, s_s, noise), None
    return steps_lib.ddim_step(x, x0, a_t, s_t, a_s, s_s, eta, noise), None
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  xs = (f32(alphas[:-1]), f32(sigmas[:-1]), f32(alphas[1:]), f32(sigmas[1:]),
        jax.random.split(key, len(alphas) - 1))
  return jax.lax.scan(body, sigmas[0] * z, xs)[0]


def sde_coefficients(method: Method, t):
  """(f / x, g^2) of the forward SDE dx = f dt + g dw (Song et al. 2021, eq. 5):
  VP f = -beta(t) x / 2, g^2 = beta(t); VE f = 0, g^2 = d sigma^2 / dt = 2 sigma^2 ln(max/min)."""
  if method.kind == 'vp':
    beta = ns.vp_beta(t, method.beta_min, method.beta_max)
    return -0.5 * beta, beta
  if method.kind == 've':
    sigma = method.alpha_sigma(t)[1]
    return jnp.zeros_like(t), 2.0 * sigma ** 2 * np.log(method.sigma_max / method.sigma_min)
  raise ValueError(f'method {method.kind!r} has no SDE form; expected vp or ve')


def score_fn(method: Method, D):
  """score(x, t) = grad log p_t(x) = (alpha x0_hat - x) / sigma^2 (Tweedie)."""
  def score(x, t):
    alpha, sigma = method.alpha_sigma(t)
    return (_expand(alpha, x) * D(x, alpha, sigma) - x) / _expand(sigma, x) ** 2
  return score


def pf_ode_drift(method: Method, D):
  """dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13)."""
  score = score_fn(method, D)

  def drift(x, t):
    f, g2 = sde_coefficients(method, t)
    return _expand(f, x) * x - 0.5 * _expand(g2, x) * score(x, t)
  return drift


def _sde(method, D, z, key, sampler, steps, snr, full):
  """em, pc or ode on t = 1 .. t_eps, then x0_hat = D(x, t_eps)."""
  ts = np.linspace(1.0, method.t_eps, steps)
  alpha_1, sigma_1 = method.alpha_sigma(1.0)
  x = (sigma_1 if method.kind == 've' else 1.0) * z
  score, drift = score_fn(method, D), pf_ode_drift(method, D)

  def sde_step(x, t, dt, step_key):
    f, g2 = sde_coefficients(method, full(t))
    x_noise = x
    if sampler == 'pc':
      corr_key, step_key = jax.random.split(step_key)
      lang_alpha = 1.0 - g2[0] * dt if method.kind == 'vp' else 1.0
      x_noise = steps_lib.langevin_correct(x, score(x, full(t)), snr, lang_alpha,
                                           jax.random.normal(corr_key, x.shape))
    reverse_drift = _expand(f, x) * x_noise - _expand(g2, x) * score(x_noise, full(t))
    return steps_lib.reverse_sde_step(x_noise, reverse_drift, jnp.sqrt(g2[0]), dt,
                                      jax.random.normal(step_key, x.shape))[0]

  def body(x, inputs):
    t, t_next, step_key = inputs
    if sampler == 'ode':
      d = drift(x, full(t))
      x_euler = x + (t_next - t) * d
      return x + (t_next - t) * 0.5 * (d + drift(x_euler, full(t_next))), None
    return sde_step(x, t, t - t_next, step_key), None
  xs = (jnp.asarray(ts[:-1], jnp.float32), jnp.asarray(ts[1:], jnp.float32),
        jax.random.split(key, steps - 1))
  x = jax.lax.scan(body, x, xs)[0]
  alpha, sigma = method.alpha_sigma(full(ts[-1]))
  return D(x, alpha, sigma)
