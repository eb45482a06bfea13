"""Each diffusion method, trained briefly on a 2-D Gaussian mixture, samples close to the truth.

Distance: sliced Wasserstein (lab.eval.distances) between 2000 model samples and 4000 fresh true
samples. Measured with this setup: two independent true sample sets are 0.10 apart (the
finite-sample floor), a Gaussian with the data's mean and covariance 0.45. After 1200 Adam steps
every method lands at 0.15-0.20; the bound 0.26 separates "learned the eight modes" from
"a blur" with room for seed noise.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from lab.data import toy2d
from lab.eval import distances
from lab.models import mlp_denoiser
from lab.nn import param_spec as ps
from lab.objectives import diffusion, diffusion_method
from lab.sampling import diffusion_samplers

CFG = ml_collections.ConfigDict(dict(channels=2, width=128, depth=3, num_classes=0,
                                     noise_max_period=10000.0, dropout=0.0))
STEPS = 1200
BOUND = 0.26


def net(params, x, c_noise_B, labels_B):
  return mlp_denoiser.forward(CFG, params, x, c_noise_B, labels_B)


def train(method, seed=0):
  data = jnp.asarray(toy2d.sample('gmm', np.random.default_rng(seed + 1), 100_000))
  params = ps.init(mlp_denoiser.param_specs(CFG), jax.random.key(seed))
  opt = optax.adam(optax.cosine_decay_schedule(2e-3, STEPS, 0.05))

  def step(carry, i):
    params, opt_state = carry
    data_key, loss_key = jax.random.split(jax.random.key(1000 * seed + i))
    x0 = data[jax.random.randint(data_key, (256,), 0, data.shape[0])]
    value, grads = jax.value_and_grad(
        lambda p: diffusion.loss(method, net, p, x0, loss_key)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), value

  # All steps in one scan: a Python loop's per-step dispatch was most of this test's time.
  (params, _), losses = jax.jit(lambda carry: jax.lax.scan(step, carry, jnp.arange(STEPS)))(
      (params, opt.init(params)))
  return params, [float(v) for v in losses]


@pytest.mark.slow
@pytest.mark.parametrize('kind, sampler, steps, extra', [
    ('ddpm', 'ancestral', 1, {}),
    ('ddpm', 'ddim', 50, dict(prediction='v')),
    ('vp', 'em', 200, {}),
    ('ve', 'pc', 200, dict(sigma_max=10.0)),
    ('edm', 'heun', 18, dict(sigma_min=0.002, sigma_max=80.0, sigma_data=1.0)),
    ('flow', 'euler', 50, {}),
])
def test_method_learns_the_mixture(kind, sampler, steps, extra):
  method = diffusion_method.Method(kind=kind, **extra)
  params, losses = train(method)
  # The zero-initialised output layer makes the first loss E||F*||^2; v-prediction's target keeps
  # most of its variance (v = alpha eps - sigma x0), so the fall asked for is modest.
  assert np.mean(losses[-100:]) < 0.95 * np.mean(losses[:20])
  x = jax.jit(lambda p, k: diffusion_samplers.sample(method, net, p, k, (2000, 2),
                                                      sampler=sampler, steps=steps))(
      params, jax.random.key(5))
  truth = jnp.asarray(toy2d.sample('gmm', np.random.default_rng(7), 4000))
  swd = float(distances.sliced_wasserstein(x, truth, jax.random.key(0)))
  assert swd < BOUND, f'{kind}/{sampler}: sliced Wasserstein {swd:.3f} >= {BOUND}'


def test_untrained_model_is_far_from_the_mixture():
  """The bound above means something: the untrained network's samples (pure noise through the
  sampler) are well beyond it."""
  method = diffusion_method.Method(kind='edm', sigma_min=0.002, sigma_max=80.0, sigma_data=1.0)
  params = ps.init(mlp_denoiser.param_specs(CFG), jax.random.key(0))
  x = diffusion_samplers.sample(method, net, params, jax.random.key(5), (2000, 2),
                                sampler='heun', steps=10)
  truth = jnp.asarray(toy2d.sample('gmm', np.random.default_rng(7), 4000))
  assert float(distances.sliced_wasserstein(x, truth, jax.random.key(0))) > 1.5 * BOUND
