"""Training continuous generative models: DDPM, VP/VE score SDEs, EDM and flow matching.

The method (config.objective_args.kind, see lab/objectives/diffusion_method.py) fixes the noise
path x_t = alpha x_0 + sigma eps, the training distribution of (alpha, sigma) and the network's
preconditioning x0_hat = a x_t + b F(c_in x_t, c_noise). The loss is the method's own simple loss

  L = E_{x_0, eps, t} || F(c_in x_t, c_noise, y) - (x_0 - a x_t) / b ||^2   (mean over elements)

(EDM eq. 2 and 8 with lambda(sigma) = 1 / c_out^2). Batches are {'image': [B, X, Y, C],
'label': [B]} or {'x': [B, C]} (2-D toys); a batch may carry its own 'noise' paired with each
x_0 (rectified flow's reflow, Liu et al. 2023 §2.2), otherwise eps is drawn fresh.

Classifier-free guidance (Ho & Salimans 2022): with model.num_classes > 0, each label is replaced
by the null label `num_classes` with probability objective_args.label_dropout.
The sample hook draws config.sample.num samples with config.sample.sampler.
objective_args.init_workdir (optional, '' for none) starts the parameters from a finished run of
the same network, e.g. reflow fine-tuning the 1-rectified flow as Liu et al. do (Algorithm 1).
"""
from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp

from lab.config import require
from lab.eval import distances
from lab.objectives import diffusion_method
from lab.sampling import diffusion_samplers
from lab.train import init_from
from lab.train.task import Task

_FREE_MODEL_FIELDS = ('dropout', 'attention_backend')


# The sampler (and its step count) each method's experiments use unless told otherwise.
DEFAULT_SAMPLER = {'ddpm': ('ancestral', 1000), 'vp': ('ode', 100), 've': ('pc', 500),
                   'edm': ('heun', 18), 'flow': ('euler', 50)}


def default_args(kind: str, prediction: str, *, ve_sigma_max: float, sigma_data: float,
                 label_dropout: float) -> dict:
  """config.objective_args with each paper's constants: Ho et al.'s 1000 linear steps, Song et
  al.'s VP beta range, EDM's sigma range and log-normal training noise (P_mean -1.2, P_std 1.2)."""
  if kind not in DEFAULT_SAMPLER:
    raise ValueError(f'diffusion method={kind!r}; expected one of {sorted(DEFAULT_SAMPLER)}')
  return dict(kind=kind, prediction=prediction, num_steps=1000, beta_schedule='linear',
              beta_min=0.1, beta_max=20.0, t_eps=1e-3,
              sigma_min=0.002 if kind == 'edm' else 0.01,
              sigma_max=80.0 if kind == 'edm' else ve_sigma_max, sigma_data=sigma_data,
              p_mean=-1.2, p_std=1.2, label_dropout=label_dropout, init_workdir='')


def data_key(batch: dict) -> str:
  """'image' for image batches, 'x' for vectors."""
  return 'image' if 'image' in batch else 'x'


def drop_labels(key: jax.Array, labels_B: jax.Array, num_classes: int, rate: float):
  """Labels with a fraction `rate` replaced by the null label num_classes (CFG training)."""
  drop_B = jax.random.bernoulli(key, rate, labels_B.shape)
  return jnp.where(drop_B, num_classes, labels_B)


def loss(method, net, params, x0, rng, labels_B=None, noise=None):
  """The simple loss above for one batch x0 [B, ...] -> (loss, per-example loss [B])."""
  noise_key, level_key = jax.random.split(rng)
  eps = jax.random.normal(noise_key, x0.shape, x0.dtype) if noise is None else noise
  alpha_B, sigma_B = method.draw_training_noise(level_key, x0.shape[0])
  expand = lambda v: jnp.reshape(v, v.shape + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  x_t = expand(alpha_B) * x0 + expand(sigma_B) * eps
  c_in, a, b = method.coefficients(alpha_B, sigma_B)
  F = net(params, expand(c_in) * x_t, method.c_noise(alpha_B, sigma_B), labels_B)
  target = (x0 - expand(a) * x_t) / expand(b)
  per_example_B = jnp.square(F.astype(jnp.float32) - target).reshape(x0.shape[0], -1).mean(-1)
  return per_example_B.mean(), per_example_B


def validate(config) -> None:
  args, s = config.objective_args, config.sample
  diffusion_method.from_config(args)   # raises on an unknown kind or prediction
  require(0.0 <= args.label_dropout < 1.0,
          f'objective_args.label_dropout={args.label_dropout}; expected 0 <= rate < 1')
  require(args.label_dropout == 0.0 or config.model.num_classes > 0,
          f'objective_args.label_dropout={args.label_dropout} needs model.num_classes > 0')
  diffusion_samplers.check(diffusion_method.from_config(args), s.sampler, s.steps)


def make_task(config, data) -> Task:
  model = importlib.import_module(f'lab.models.{config.model.name}')
  cfg, args = config.model, config.objective_args
  method = diffusion_method.from_config(args)
  conditional = cfg.num_classes > 0

  def loss_fn(params, state, batch, rng, train):
    drop_key, noise_key, net_key = jax.random.split(rng, 3)
    net = lambda p, x, c_noise_B, labels_B: model.forward(cfg, p, x, c_noise_B, labels_B,
                                                          rng=net_key, train=train)
    labels_B = batch.get('label') if conditional else None
    if labels_B is not None and train and args.label_dropout > 0:
      labels_B = drop_labels(drop_key, labels_B, cfg.num_classes, args.label_dropout)
    value, _ = loss(method, net, params, batch[data_key(batch)], noise_key, labels_B,
                    batch.get('noise'))
    return value, ({'loss': value}, state)

  s = config.sample
  shape = _sample_shape(cfg)

  @jax.jit
  def draw(params, rng):
    label_key, sample_key = jax.random.split(rng)
    labels_B = (jax.random.randint(label_key, (s.num,), 0, cfg.num_classes) if conditional
                else None)
    net = lambda p, x, c_noise_B, labels_B: model.forward(cfg, p, x, c_noise_B, labels_B)
    return diffusion_samplers.sample(method, net, params, sample_key, (s.num, *shape),
                                     sampler=s.sampler, steps=s.steps, labels_B=labels_B,
                                     guidance_scale=s.guidance_scale, null_label=cfg.num_classes,
                                     eta=s.eta, clip_x0=s.clip_x0)

  reference = (jnp.concatenate([b['x'] for b in data.eval_batches])
               if data.eval_batches and 'x' in data.eval_batches[0] else None)

  def sample(params, state, rng):
    """Samples (a PNG) and, for vectors, the sliced Wasserstein distance to held-out data."""
    del state  # denoisers have no model state
    samples = draw(params, rng)
    out = {s.sampler: jax.device_get(samples)}
    if reference is not None:
      swd = distances.sliced_wasserstein(samples, reference, jax.random.key(0))
      out['sliced_wasserstein'] = f'{float(swd):.4f}'
    return out

  specs = model.param_specs(cfg)
  if args.get('init_workdir'):
    specs = init_from.constant_specs(
        specs, init_from.restored_params(args.init_workdir, cfg, _FREE_MODEL_FIELDS))
  return Task(param_specs=specs, init_state=lambda key: {}, loss_fn=loss_fn, sample=sample)


def _sample_shape(cfg) -> tuple[int, ...]:
  """One sample's shape from the model config: (X, Y, C) for images, (C,) for vectors."""
  if 'image_size' in cfg:
    return (cfg.image_size, cfg.image_size, cfg.channels)
  return (cfg.channels,)
