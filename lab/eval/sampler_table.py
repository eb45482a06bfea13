"""Rank trained diffusion/flow models and samplers by feature-FID at their NFE.

  python -m lab.eval.sampler_table --out runs/table \
      --entry ddpm:runs/mnist_ddpm:ancestral:1000 --entry ddpm:runs/mnist_ddpm:ddim:50 \
      --entry edm:runs/mnist_edm:heun:18 --entry flow:runs/mnist_flow:euler:10 --num 1000

Each --entry is label:workdir:sampler:steps. Every entry draws --num samples from its run's (EMA)
parameters with the same seed, and is scored by the Fréchet distance in the feature space of a
small classifier that lab trains on the same dataset (lab/eval/feature_fid.py; cached in --out),
against the statistics of the training split, as FID does. Writes table.json, table.md, one
sample grid per entry and fid_vs_nfe.png to --out.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import jax
import numpy as np

from lab.data import images
from lab.eval import feature_fid, image_grid
from lab.objectives import diffusion_method
from lab.sampling import diffusion_samplers
from lab.train import restore


def classifier(out: str, source: str, data_dir: str, steps: int) -> feature_fid.FeatureNet:
  """The feature network for `source`, trained once and cached as out/classifier_<source>.npz."""
  path = os.path.join(out, f'classifier_{source}.npz')
  if os.path.exists(path):
    return feature_fid.FeatureNet.load(path)
  x, y = images.load_arrays(source, 'train', data_dir)
  net = feature_fid.train_classifier(x, y, num_classes=10, steps=steps, seed=0)
  net.save(path)
  return net


def draw(run: restore.Run, sampler: str, steps: int, num: int, batch: int, seed: int):
  """num samples from a restored run, in batches of `batch`."""
  config = run.config
  model = importlib.import_module(f'lab.models.{config.model.name}')
  method = diffusion_method.from_config(config.objective_args)
  cfg = config.model
  shape = (cfg.image_size, cfg.image_size, cfg.channels)
  net = lambda p, x, c_noise_B, labels_B: model.forward(cfg, p, x, c_noise_B, labels_B)
  clip = config.sample.get('clip_x0', 0.0)

  @jax.jit
  def one(params, key):
    labels_B = None
    if cfg.num_classes > 0:
      key, label_key = jax.random.split(key)
      labels_B = jax.random.randint(label_key, (batch,), 0, cfg.num_classes)
    return diffusion_samplers.sample(
        method, net, params, key, (batch, *shape), sampler=sampler, steps=steps,
        labels_B=labels_B, guidance_scale=config.sample.guidance_scale,
        null_label=cfg.num_classes, clip_x0=clip)
  keys = jax.random.split(jax.random.key(seed), -(-num // batch))
  return np.concatenate([np.asarray(one(run.params, k)) for k in keys])[:num]


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m lab.eval.sampler_table',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--entry', action='append', required=True,
                      help='label:workdir:sampler:steps')
  parser.add_argument('--out', required=True)
  parser.add_argument('--num', type=int, default=1000)
  parser.add_argument('--batch', type=int, default=250)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--classifier_steps', type=int, default=500)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  entries = []
  for text in args.entry:
    parts = text.split(':')
    if len(parts) != 4 or not parts[3].isdigit():
      parser.error(f'--entry {text!r}; expected label:workdir:sampler:steps')
    entries.append((parts[0], parts[1], parts[2], int(parts[3])))
  runs, rows = {}, []
  for label, workdir, sampler, steps in entries:
    if workdir not in runs:
      runs[workdir] = restore.load(workdir)
    run = runs[workdir]
    data = run.config.data
    net = classifier(args.out, data.source, data.data_dir, args.classifier_steps)
    real, _ = images.load_arrays(data.source, 'train', data.data_dir, data.image_size)
    method = diffusion_method.from_config(run.config.objective_args)
    start = time.time()
    fake = draw(run, sampler, steps, args.num, args.batch, args.seed)
    seconds = time.time() - start
    fid = feature_fid.feature_fid(net, real, fake)
    name = f'{label}_{sampler}_{steps}'
    image_grid.save_image_grid(fake[:64], os.path.join(args.out, f'{name}.png'), nrow=8)
    rows.append(dict(label=label, workdir=workdir, method=method.kind, sampler=sampler,
                     steps=steps, nfe=diffusion_samplers.nfe(method, sampler, steps),
                     fid=float(fid), seconds=seconds, num=args.num, train_steps=run.step))
    print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(args.out, 'table.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write('| model | sampler | steps | NFE | feature-FID | sampling s |\n|---|---|---|---|---|---|\n')
    for r in rows:
      f.write(f"| {r['label']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.2f} | "
              f"{r['seconds']:.0f} |\n")
  by_label = {}
  for r in rows:
    by_label.setdefault(f"{r['label']} {r['sampler']}", []).append((r['nfe'], r['fid']))
  curves = {k: sorted(v) for k, v in by_label.items() if len(v) > 1}
  if curves:
    nfes = sorted({n for v in curves.values() for n, _ in v})
    image_grid.save_curve(nfes, {k: [dict(v).get(n, np.nan) for n in nfes]
                                 for k, v in curves.items()},
                          os.path.join(args.out, 'fid_vs_nfe.png'), 'NFE', 'feature-FID',
                          log_x=True)


if __name__ == '__main__':
  main()
