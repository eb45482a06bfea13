"""One diffusion method = a noise path, a training noise distribution and a preconditioning.

Following EDM (Karras et al. 2022, §2-5 and Table 1), every method here is a choice of a few
functions, written in the (alpha, sigma) form x_t = alpha x_0 + sigma eps (Kingma et al. 2021),
where alpha = s(t) and sigma = s(t) sigma_EDM(t):

  kind   path (alpha, sigma)                     training draw                    network F predicts
  ddpm   sqrt(abar_t), sqrt(1 - abar_t), t in 0..T-1   t ~ U{0..T-1} (Ho eq. 14)   eps | v | x0
  vp     the VP SDE, t in [t_eps, 1]             t ~ U(t_eps, 1) (Song et al. 2021) eps | v | x0
  ve     1, sigma_min (sigma_max/sigma_min)^t    t ~ U(0, 1)                       NCSN: x0 = x + sigma F
  edm    1, sigma                                ln sigma ~ N(P_mean, P_std^2)     EDM eq. 7 preconditioning
  flow   1 - t, t                                t ~ U(0, 1) (Lipman; Liu)         velocity eps - x_0

The network sees c_in x_t and c_noise and the denoised estimate is x0_hat = a x_t + b F, so the
training target for F is F* = (x_0 - a x_t) / b and the loss E ||F - F*||^2 is the "simple" loss
of each paper: eps-MSE (Ho eq. 14), v-MSE (Salimans & Ho 2022), EDM's eq. 8 with
lambda(sigma) = 1/c_out^2, denoising score matching (Song eq. 7 with lambda = sigma^2) and
conditional flow matching (Lipman eq. 23; Liu eq. 1). In EDM's notation, for alpha = 1,
c_skip = a and c_out = b.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lab.objectives import noise_schedules as ns

KINDS = ('ddpm', 'vp', 've', 'edm', 'flow')
PREDICTIONS = ('eps', 'v', 'x0')


@dataclasses.dataclass(frozen=True)
class Method:
  """The constants of one method; build it with `from_config`."""
  kind: str
  prediction: str = 'eps'          # ddpm and vp only
  num_steps: int = 1000            # ddpm: T
  beta_schedule: str = 'linear'    # ddpm
  beta_min: float = 0.1            # vp
  beta_max: float = 20.0           # vp
  t_eps: float = 1e-3              # vp: smallest training / sampling time
  sigma_min: float = 0.01          # ve (and EDM's sampling range)
  sigma_max: float = 50.0          # ve (and EDM's sampling range)
  sigma_data: float = 0.5          # edm
  p_mean: float = -1.2             # edm
  p_std: float = 1.2               # edm

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'diffusion method {self.kind!r}; expected one of {KINDS}')
    if self.kind in ('ddpm', 'vp') and self.prediction not in PREDICTIONS:
      raise ValueError(f'prediction {self.prediction!r}; expected one of {PREDICTIONS}')

  @property
  def alpha_bars(self) -> np.ndarray:
    """abar_t for t = 0..T-1 (DDPM's t = 1..T), float64."""
    return ns.alpha_bars(ns.ddpm_betas(self.beta_schedule, self.num_steps))

  def alpha_sigma(self, t):
    """(alpha, sigma) at the method's native time t: an int index for ddpm, t in [0, 1] for vp, ve
    and flow, sigma itself for edm."""
    if self.kind == 'ddpm':
      abar = self.alpha_bars   # both tables in float64, then cast: 1 - abar loses no bits
      return (jnp.asarray(np.sqrt(abar), jnp.float32)[t],
              jnp.asarray(np.sqrt(1.0 - abar), jnp.float32)[t])
    if self.kind == 'vp':
      log_abar = -0.5 * t ** 2 * (self.beta_max - self.beta_min) - t * self.beta_min
      return jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))
    if self.kind == 've':
      return jnp.ones_like(t), self.sigma_min * (self.sigma_max / self.sigma_min) ** t
    if self.kind == 'edm':
      return jnp.ones_like(t), t
    return 1.0 - t, t

  def draw_training_noise(self, key: jax.Array, batch: int):
    """(alpha_B, sigma_B) of the training noise distribution (see the table above)."""
    if self.kind == 'ddpm':
      return self.alpha_sigma(jax.random.randint(key, (batch,), 0, self.num_steps))
    if self.kind == 'vp':
      return self.alpha_sigma(jax.random.uniform(key, (batch,), minval=self.t_eps, maxval=1.0))
    if self.kind == 'edm':
      return self.alpha_sigma(jnp.exp(self.p_mean + self.p_std * jax.random.normal(key, (batch,))))
    return self.alpha_sigma(jax.random.uniform(key, (batch,)))

  def c_noise(self, alpha, sigma):
    """The network's noise input. ddpm: the (fractional) step index, interpolated in log sigma
    between table entries as diffusers' EulerDiscreteScheduler does; vp: 999 t (EDM Table 1,
    M = 1000); ve: ln(sigma / 2); edm: ln(sigma) / 4; flow: 999 t."""
    if self.kind == 'flow':
      return 999.0 * sigma / (alpha + sigma)
    log_sigma = jnp.log(sigma / alpha)
    if self.kind == 'ddpm':
      table = jnp.asarray(0.5 * np.log((1 - self.alpha_bars) / self.alpha_bars), jnp.float32)
      return jnp.interp(log_sigma, table, jnp.arange(self.num_steps, dtype=jnp.float32))
    if self.kind == 'vp':  # the inverse of noise_schedules.vp_sigma, in jnp
      beta_d = self.beta_max - self.beta_min
      t = (jnp.sqrt(self.beta_min ** 2 + 2 * beta_d * jnp.log1p(jnp.exp(2 * log_sigma)))
           - self.beta_min) / beta_d
      return 999.0 * t
    if self.kind == 've':
      return log_sigma - jnp.log(2.0)
    return 0.25 * log_sigma

  def coefficients(self, alpha, sigma):
    """(c_in, a, b): the network sees c_in x_t and x0_hat = a x_t + b F (EDM Table 1)."""
    one, zero = jnp.ones_like(sigma), jnp.zeros_like(sigma)
    if self.kind == 'edm':
      sd2 = self.sigma_data ** 2
      norm = jnp.sqrt(sigma ** 2 + sd2)
      return 1.0 / norm, sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / norm
    if self.kind == 've':
      return one, one, sigma
    if self.kind == 'flow':
      return one, one, -sigma
    if self.prediction == 'eps':
      return one, 1.0 / alpha, -sigma / alpha
    if self.prediction == 'v':
      return one, alpha, -sigma
    return one, zero, one

  def sampling_range(self) -> tuple[float, float]:
    """(sigma_min, sigma_max) in EDM's unscaled sigma = sigma_t / alpha that the method's
    training covered; EDM-style samplers run over this range."""
    if self.kind == 'ddpm':
      s = ns.sigma_from_alpha_bar(self.alpha_bars)
      return float(s[0]), float(s[-1])
    if self.kind == 'vp':
      return (float(ns.vp_sigma(self.t_eps, self.beta_min, self.beta_max)),
              float(ns.vp_sigma(1.0, self.beta_min, self.beta_max)))
    if self.kind == 'flow':
      raise ValueError('flow reaches sigma = inf at t = 1; sample it with sampler euler or heun '
                       'in t, not with an EDM sigma schedule')
    return self.sigma_min, self.sigma_max

  def alpha_from_sigma_edm(self, sigma_edm):
    """alpha = s for EDM's unscaled sigma (see noise_schedules.scale_from_sigma)."""
    if self.kind in ('ddpm', 'vp'):
      return jax.lax.rsqrt(1.0 + sigma_edm ** 2)
    if self.kind == 'flow':
      return 1.0 / (1.0 + sigma_edm)
    return jnp.ones_like(sigma_edm)


def from_config(args) -> Method:
  """A Method from config.objective_args (fields named as Method's)."""
  fields = {f.name for f in dataclasses.fields(Method)}
  return Method(**{k: v for k, v in dict(args).items() if k in fields})


def denoiser(method: Method, net, params, labels_B=None):
  """D(x_t, alpha_B, sigma_B) -> x0_hat = a x_t + b F(c_in x_t, c_noise, labels).

  `net(params, x, c_noise_B, labels_B)` is a model's forward. alpha_B and sigma_B broadcast over
  the trailing dims of x_t.
  """
  def D(x_t, alpha_B, sigma_B):
    expand = lambda v: jnp.reshape(v, v.shape + (1,) * (x_t.ndim - 1))
    c_in, a, b = method.coefficients(alpha_B, sigma_B)
    F = net(params, expand(c_in) * x_t, method.c_noise(alpha_B, sigma_B), labels_B)
    return expand(a) * x_t + expand(b) * F.astype(x_t.dtype)
  return D
