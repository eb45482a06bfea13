"""Reflow (Liu, Gong & Liu 2023, "Flow Straight and Fast", §2.2 and Algorithm 1).

Given a trained flow v_k, draw noise z ~ N(0, I), solve the ODE dx/dt = v_k from t = 1 to 0 to get
x = Flow_k(z), and keep the coupling (x, z). Training the next flow on these pairs, with the same
flow-matching loss but x_t = (1 - t) x + t z for the *paired* z, gives the (k+1)-rectified flow,
whose paths are straighter, so few Euler steps (even one) stay accurate.

  python -m lab.sampling.reflow --run runs/mnist_flow --out runs/mnist_pairs.npz --num 20000

writes {'image' or 'x': samples, 'noise': z, ('label': y)} for lab/data/reflow_pairs.py.
"""
from __future__ import annotations

import argparse
import importlib

import jax
import numpy as np

from lab.objectives import diffusion_method
from lab.sampling import diffusion_samplers
from lab.train import restore


def make_pairs(run: restore.Run, num: int, steps: int, batch: int, seed: int) -> dict:
  """num (sample, noise) pairs from a restored flow run, solving its ODE with `steps` Euler
  steps from the stored noise. Class-conditional runs draw labels uniformly and keep them."""
  config, cfg = run.config, run.config.model
  method = diffusion_method.from_config(config.objective_args)
  if method.kind != 'flow':
    raise ValueError(f'reflow needs a flow run; {config.objective_args.kind!r} is not one')
  model = importlib.import_module(f'lab.models.{cfg.name}')
  shape = ((cfg.image_size, cfg.image_size, cfg.channels) if 'image_size' in cfg
           else (cfg.channels,))
  net = lambda p, x, c_noise_B, labels_B: model.forward(cfg, p, x, c_noise_B, labels_B)
  key_name = 'image' if len(shape) == 3 else 'x'

  @jax.jit
  def one(params, key):
    noise_key, label_key = jax.random.split(key)
    z = jax.random.normal(noise_key, (batch, *shape))
    labels_B = (jax.random.randint(label_key, (batch,), 0, cfg.num_classes)
                if cfg.num_classes > 0 else None)
    D = diffusion_samplers.guided_denoiser(method, net, params, labels_B,
                                           config.sample.guidance_scale, cfg.num_classes)
    x = diffusion_samplers.solve_flow(D, z, steps)
    return x, z, labels_B

  outs = [one(run.params, k) for k in jax.random.split(jax.random.key(seed), -(-num // batch))]
  pairs = {key_name: np.concatenate([np.asarray(o[0]) for o in outs])[:num],
           'noise': np.concatenate([np.asarray(o[1]) for o in outs])[:num]}
  if cfg.num_classes > 0:
    pairs['label'] = np.concatenate([np.asarray(o[2]) for o in outs])[:num].astype(np.int32)
  return pairs


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m lab.sampling.reflow',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='workdir of a trained flow run')
  parser.add_argument('--out', required=True, help='.npz file to write')
  parser.add_argument('--num', type=int, default=10000)
  parser.add_argument('--steps', type=int, default=100, help='Euler steps of the ODE solve')
  parser.add_argument('--batch', type=int, default=500)
  parser.add_argument('--seed', type=int, default=1)
  args = parser.parse_args(argv)
  np.savez(args.out, **make_pairs(restore.load(args.run), args.num, args.steps, args.batch,
                                  args.seed))


if __name__ == '__main__':
  main()
