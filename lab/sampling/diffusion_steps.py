"""Single steps of the diffusion samplers, each one paper equation.

Notation: x_t = alpha_t x_0 + sigma_t eps (Kingma et al. 2021); s < t is the next (less noisy)
time; x0 is the model's denoised estimate at t and eps_hat = (x_t - alpha_t x0) / sigma_t.
Coefficients broadcast against x (pass scalars or arrays shaped to broadcast).
"""
from __future__ import annotations

import jax.numpy as jnp


def posterior(alpha_t, sigma_t, alpha_s, sigma_s):
  """q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var) (Ho et al. 2020, eq. 6-7, in the general
  form of Kingma et al. 2021, App. A): with alpha_ts = alpha_t / alpha_s and
  sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2,
    c_x0 = alpha_s sigma_ts^2 / sigma_t^2,  c_xt = alpha_ts sigma_s^2 / sigma_t^2,
    var = sigma_ts^2 sigma_s^2 / sigma_t^2   (DDPM's beta_tilde)."""
  alpha_ts = alpha_t / alpha_s
  sigma_ts2 = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
  return (alpha_s * sigma_ts2 / sigma_t ** 2, alpha_ts * sigma_s ** 2 / sigma_t ** 2,
          sigma_ts2 * sigma_s ** 2 / sigma_t ** 2)


def ancestral_step(x_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, z):
  """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2 in the x0 form of eq. 7):
  x_s = mu_tilde(x_t, x0) + sqrt(beta_tilde) z, with variance 'fixed_small'."""
  c_x0, c_xt, var = posterior(alpha_t, sigma_t, alpha_s, sigma_s)
  return c_x0 * x0 + c_xt * x_t + jnp.sqrt(var) * z


def ddim_step(x_t, x0, alpha_t, sigma_t, alpha_s, sigma_s, eta, z):
  """DDIM (Song, Meng & Ermon 2021, eq. 12 with sigma_t(eta) of eq. 16):
  x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta z,
  sigma_eta^2 = eta^2 var(q(x_s | x_t, x_0)). eta = 0 is deterministic; eta = 1 is DDPM."""
  eps_hat = (x_t - alpha_t * x0) / sigma_t
  var = eta ** 2 * posterior(alpha_t, sigma_t, alpha_s, sigma_s)[2]
  return alpha_s * x0 + jnp.sqrt(jnp.maximum(sigma_s ** 2 - var, 0.0)) * eps_hat + jnp.sqrt(var) * z


def ode_derivative(x, x0, tau):
  """dx/dtau = (x - D(x; tau)) / tau: EDM's probability-flow ODE with s = 1 and sigma(t) = t
  (Karras et al. 2022, eq. 1 / Algorithm 1 line 4), and equally the rectified-flow ODE
  dx_t/dt = eps - x_0 = (x_t - x0) / t of the path x_t = (1 - t) x_0 + t eps."""
  return (x - x0) / tau


def euler_step(x, d, tau, tau_next):
  """x_{i+1} = x_i + (tau_{i+1} - tau_i) d_i (Algorithm 1, line 5)."""
  return x + (tau_next - tau) * d


def heun_correct(x, d, d_next, tau, tau_next):
  """Heun's 2nd-order correction (Algorithm 1, line 8): x + (tau' - tau)(d + d') / 2."""
  return x + (tau_next - tau) * 0.5 * (d + d_next)


def churn(x, sigma, gamma, s_noise, z):
  """EDM's stochastic step up (Algorithm 2, lines 5-6): sigma_hat = (1 + gamma) sigma,
  x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise z. Returns (x_hat, sigma_hat)."""
  # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (2 + gamma)): never negative in floats.
  return x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z, sigma * (1.0 + gamma)


def reverse_sde_step(x, drift, g, dt, z):
  """Euler-Maruyama on the reverse SDE (Song et al. 2021, eq. 6), stepping t -> t - dt:
  x_{t-dt} = x_t - drift dt + g sqrt(dt) z, drift = f(x, t) - g^2 score(x, t).
  Returns (x_next, mean) where mean omits the noise (used for the last step)."""
  mean = x - drift * dt
  return mean + g * jnp.sqrt(dt) * z, mean


def langevin_correct(x, score, snr, alpha, z):
  """One Langevin corrector step (Song et al. 2021, Algorithm 4/5): step size
  eps = 2 alpha (snr ||z|| / ||score||)^2, x <- x + eps score + sqrt(2 eps) z, with the norms
  per example averaged over the batch as in the paper's code (one step size per batch)."""
  norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)).mean()
  step = 2.0 * alpha * jnp.square(snr * norm(z) / norm(score))
  return x + step * score + jnp.sqrt(2.0 * step) * z
