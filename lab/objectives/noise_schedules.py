"""Noise schedules of the diffusion family, all expressed as EDM's (sigma, s) pair.

Every method here perturbs data the same way (Karras et al. 2022, "EDM", eq. 4 and Table 1):
  x_t = s(t) (x_0 + sigma(t) eps),   eps ~ N(0, I),
so a schedule is a map t -> sigma (the noise level of the *unscaled* x_hat = x_t / s) and a
scale s. Code that must also reach flow's t = 1 (s = 0, sigma = inf) uses the equivalent pair
(alpha, sigma_t) = (s, s sigma) of Kingma et al. 2021: x_t = alpha x_0 + sigma_t eps.
The map between the usual forms:
  DDPM/VP (Ho et al. 2020):  x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps
                             -> s = sqrt(abar), sigma = sqrt((1 - abar) / abar), abar = 1/(1+sigma^2)
  VE (Song et al. 2021):     s = 1, sigma = sigma_min (sigma_max / sigma_min)^t
  flow / rectified flow:     x_t = (1 - t) x_0 + t eps  (Lipman et al. 2023; Liu et al. 2023)
                             -> s = 1 - t, sigma = t / (1 - t)
Schedules are constants of the method, so they are computed on the host in float64 NumPy.
"""
from __future__ import annotations

import numpy as np

BETA_SCHEDULES = ('linear', 'cosine')


def ddpm_betas(kind: str, num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """beta_1..beta_T (float64[T]).

  linear: beta_t evenly spaced from beta_start to beta_end (Ho et al. 2020, §4: 1e-4 to 0.02).
  cosine: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), beta_t =
          min(1 - abar(t) / abar(t-1), max_beta)  (Nichol & Dhariwal 2021, eq. 17).
  """
  if kind not in BETA_SCHEDULES:
    raise ValueError(f'beta schedule {kind!r}; expected one of {BETA_SCHEDULES}')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps}; expected >= 1')
  if kind == 'linear':
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  f = lambda t: np.cos((t / num_steps + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
  t = np.arange(num_steps + 1, dtype=np.float64)
  abar = f(t) / f(0)
  return np.minimum(1 - abar[1:] / abar[:-1], max_beta)


def alpha_bars(betas_T: np.ndarray) -> np.ndarray:
  """abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
  return np.cumprod(1.0 - betas_T)


def sigma_from_alpha_bar(abar):
  """sigma = sqrt((1 - abar) / abar): the DDPM noise level in EDM's unscaled space."""
  return np.sqrt((1.0 - abar) / abar)


def vp_sigma(t, beta_min: float = 0.1, beta_max: float = 20.0):
  """VP SDE (Song et al. 2021, eq. 32-33; EDM Table 1): with beta(t) = beta_min + t (beta_max -
  beta_min), abar(t) = exp(-1/2 t^2 (beta_max - beta_min) - t beta_min) and
  sigma(t) = sqrt(exp(1/2 beta_d t^2 + beta_min t) - 1), beta_d = beta_max - beta_min."""
  return np.sqrt(np.expm1(0.5 * (beta_max - beta_min) * np.square(t) + beta_min * t))


def vp_beta(t, beta_min: float = 0.1, beta_max: float = 20.0):
  """beta(t) = beta_min + t (beta_max - beta_min): the VP SDE's drift f = -1/2 beta x, g^2 = beta."""
  return beta_min + t * (beta_max - beta_min)


def vp_t_from_sigma(sigma, beta_min: float = 0.1, beta_max: float = 20.0):
  """The inverse of vp_sigma (EDM Table 1's sigma^-1 for VP)."""
  beta_d = beta_max - beta_min
  return (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(np.square(sigma))) - beta_min) / beta_d


def ve_sigma(t, sigma_min: float = 0.01, sigma_max: float = 50.0):
  """VE SDE (Song et al. 2021, eq. 30-31): sigma(t) = sigma_min (sigma_max / sigma_min)^t, s = 1."""
  return sigma_min * (sigma_max / sigma_min) ** t


def karras_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  rho: float = 7.0) -> np.ndarray:
  """EDM's time steps (Karras et al. 2022, eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1)
  (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i < N, and sigma_N = 0 (float64[N + 1])."""
  if num_steps < 2:
    raise ValueError(f'num_steps={num_steps}; the rho schedule needs at least 2 steps')
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f'sigma_min={sigma_min}, sigma_max={sigma_max}; expected 0 < min < max')
  ramp = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
  inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
  return np.append(inv ** rho, 0.0)
