"""Diffusion denoisers: lab's U-Net and DiT against diffusers in eager PyTorch, training images/s,
sampling images/s and MFU.

  .venv/bin/python benchmarks/bench_diffusion.py [--quick]

Cases: the four networks of experiments/diffusion_images.py with its default method (EDM):
U-Net and DiT on digits (8x8) and on MNIST (28x28), unconditional, batch 64, float32.
- lab: the train step exactly as the trainer builds and runs it (lab.run.prepare on the
  experiment config, then loop.setup: loop.init_state and jax.jit(step.make_train_step(...)) with
  donation: forward, EDM loss, backward, clipping, AdamW, EMA), and the task's `sample` hook (the
  jitted EDM Heun sampler over sample.num = 64 images, with clip_x0). MNIST shapes come from the
  digits padded to 28x28 (data.source=digits, data.image_size=28): the model config and every
  shape are those of source=mnist, without reading 60000 images.
- PyTorch: diffusers' UNet2DModel / DiTTransformer2DModel built with the same channels, blocks,
  attention placement, heads, patch size, width and depth (`diffusers_unet`, `diffusers_dit`);
  the script asserts the parameter counts are within 1%. The same step in eager torch (EDM
  noise draw and preconditioning, MSE, backward, clip_grad_norm_, AdamW, EMA lerp) and the same
  Heun sampler (EDM Algorithm 1 on the rho = 7 grid, clipped x0 estimates), under
  torch.inference_mode, with as many threads as this process has cores.
Both run on one fixed random batch in [-1, 1] and are timed alternately, so load from other
processes hits both alike: compile and warm-up excluded, then repeats of a few steps (or draws),
each ended by block_until_ready (torch.cuda.synchronize on a GPU); each number is the median over
repeats. Sampling is timed with a short Heun run (sample.steps, NFE 2 steps - 1) and reported as
denoiser forwards/s per image and as images/s at the experiment's own sampler (18 Heun steps,
NFE 35): images/s = image-forwards/s / 35.

Model FLOPs are XLA's cost analysis of lab's compiled forward at the training batch
(jax.jit(forward).lower(...).compile().cost_analysis()['flops']; it counts every op, elementwise
ones included). XLA counts a while loop's body once, so DiT's scanned blocks are counted as the
1-layer forward plus (n_layers - 1) compiled blocks. A train step is 3 forwards (backward = 2x);
a sample is NFE forwards. MFU is against the best float32 n x n matmul (n = 1024, 2048) timed
in jnp and torch in the same run (bench_gpt_cpu.matmul_peaks).
Writes benchmarks/results/bench_diffusion.json (bench_diffusion_quick.json with --quick) and
prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import statistics
import time

import diffusers
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import torch

from bench_gpt_cpu import (cpu_model_name, git_state, matmul_peaks, peak_sentence,
                           time_interleaved)
from lab import config as config_lib
from lab import run
from lab.models import dit
from lab.nn import param_spec
from lab.objectives import diffusion_method
from lab.objectives import noise_schedules as ns
from lab.parallel import rules as rules_lib
from lab.sampling import diffusion_samplers
from lab.train import loop

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_EXPERIMENT = str(_ROOT / 'experiments' / 'diffusion_images.py')
_RESULTS = _ROOT / 'benchmarks' / 'results'
CASES = (('digits', 'unet'), ('digits', 'dit'), ('mnist', 'unet'), ('mnist', 'dit'))
_NAMES = {'digits': 'digits 8x8', 'mnist': 'MNIST 28x28', 'unet': 'U-Net', 'dit': 'DiT'}


def lab_setup(source: str, net: str, sample_steps: int):
  """(config, task) from lab.run.prepare on diffusion_images.py:net=NET,source=SOURCE with
  sample.steps replaced; MNIST's shapes come from the digits padded to 28x28."""
  overrides = [f'sample.steps={sample_steps}']
  if source == 'mnist':
    overrides += ['data.source=digits', 'data.image_size=28']
  config = config_lib.load(f'{_EXPERIMENT}:net={net},source={source}')
  config, task, _ = run.prepare(config_lib.override(config, overrides))
  return config, task


def random_images(config) -> np.ndarray:
  """float32 [batch, X, Y, C], uniform in [-1, 1], the range of lab's image data."""
  cfg = config.model
  shape = (config.train.batch_size, cfg.image_size, cfg.image_size, cfg.channels)
  return np.random.default_rng(0).uniform(-1.0, 1.0, shape).astype(np.float32)


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()['flops'])


def forward_flops(config, params, x_BXYC: np.ndarray) -> float:
  """FLOPs of one denoiser forward per image, from XLA's cost analysis at the training batch.
  For DiT: the forward with 1 layer plus (n_layers - 1) blocks, since XLA counts a scan body
  once."""
  cfg, B = config.model, x_BXYC.shape[0]
  model = importlib.import_module(f'lab.models.{cfg.name}')
  noise_B = jnp.zeros((B,), jnp.float32)
  if cfg.name != 'dit':
    return _flops(lambda p, x, n: model.forward(cfg, p, x, n), params, x_BXYC, noise_B) / B
  one = cfg.as_configdict()
  one.n_layers = 1
  first = jax.tree.map(lambda w: w[:1], params['blocks'])
  one_layer = _flops(lambda p, x, n: dit.forward(one, p, x, n), dict(params, blocks=first),
                     x_BXYC, noise_B)
  T = (cfg.image_size // cfg.patch_size) ** 2
  block = _flops(lambda p, x, c: dit.block(cfg, p, x, c),
                 jax.tree.map(lambda w: w[0], params['blocks']),
                 jnp.zeros((B, T, cfg.d_model)), jnp.zeros((B, cfg.d_model)))
  return (one_layer + (cfg.n_layers - 1) * block) / B


def lab_runners(config, task, x_BXYC: np.ndarray):
  """(train(n): n train steps as lab.train.loop runs them, sample(n): n draws of the task's
  sample hook, the initial params)."""
  setup = loop.setup(config, task)
  with rules_lib.activate(setup.mesh, setup.rules):
    holder = [setup.init()]
    batch = setup.global_batch({'image': x_BXYC})
  params = holder[0].params

  def train(n: int):
    state = holder[0]
    with rules_lib.activate(setup.mesh, setup.rules):
      for _ in range(n):
        state, _ = setup.train_step(state, batch)
      holder[0] = jax.block_until_ready(state)

  def sample(n: int):
    for i in range(n):
      task.sample(params, {}, jax.random.key(i))   # returns host arrays: the draw has finished

  return train, sample, jax.device_get(params)


def diffusers_unet(cfg) -> diffusers.UNet2DModel:
  """lab's two-level ADM U-Net (lab/models/unet.py) in diffusers: residual blocks with
  scale-shift conditioning, group norm (also before every attention), attention at the second
  level and in the middle, conv down/up sampling, base_channels sinusoidal features."""
  levels = len(cfg.channel_mults)
  res = [cfg.image_size // 2 ** level for level in range(levels)]
  attention = [r in cfg.attention_resolutions for r in res]
  if levels != 2 or attention != [False, True]:
    raise ValueError(f'model.channel_mults={cfg.channel_mults}, attention_resolutions='
                     f'{cfg.attention_resolutions}; expected two levels, attention at the second')
  widths = tuple(cfg.base_channels * m for m in cfg.channel_mults)
  return diffusers.UNet2DModel(
      sample_size=cfg.image_size, in_channels=cfg.channels, out_channels=cfg.channels,
      block_out_channels=widths, layers_per_block=cfg.blocks_per_level,
      down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
      up_block_types=('AttnUpBlock2D', 'UpBlock2D'), norm_num_groups=cfg.norm_groups,
      attn_norm_num_groups=cfg.norm_groups, attention_head_dim=widths[1] // cfg.heads,
      resnet_time_scale_shift='scale_shift', downsample_type='conv', upsample_type='conv',
      time_embedding_type='positional', flip_sin_to_cos=True, freq_shift=0, add_attention=True,
      dropout=cfg.dropout)


def diffusers_dit(cfg) -> diffusers.DiTTransformer2DModel:
  """lab's DiT in diffusers. diffusers gives every block its own noise + label embedder; they are
  tied to the first block's here, as DiT has one (each block still recomputes it, about 1% of
  the FLOPs). diffusers always has a label table: one class (2 rows with the dropout row)."""
  model = diffusers.DiTTransformer2DModel(
      num_attention_heads=cfg.n_heads, attention_head_dim=cfg.d_model // cfg.n_heads,
      in_channels=cfg.channels, out_channels=cfg.channels, num_layers=cfg.n_layers,
      sample_size=cfg.image_size, patch_size=cfg.patch_size, num_embeds_ada_norm=1,
      activation_fn='gelu-approximate', norm_eps=1e-6, dropout=cfg.dropout)
  blocks = model.transformer_blocks
  for block in blocks[1:]:
    block.norm1.emb = blocks[0].norm1.emb
  return model


def torch_net(cfg, device):
  """(module, F(x_BCXY, c_noise_B) -> network output): the diffusers model matching cfg."""
  if cfg.name == 'unet':
    model = diffusers_unet(cfg).to(device)
    return model, lambda x, c_noise: model(x, c_noise).sample
  model = diffusers_dit(cfg).to(device)
  return model, lambda x, c_noise: model(
      x, timestep=c_noise, class_labels=torch.zeros(x.shape[0], dtype=torch.long,
                                                    device=device)).sample


def edm_coefficients(method, sigma_B: torch.Tensor):
  """(c_in, c_skip, c_out) of EDM's preconditioning (Karras et al. 2022, Table 1), as [B,1,1,1]."""
  sd2 = method.sigma_data ** 2
  norm = torch.sqrt(sigma_B ** 2 + sd2)
  expand = lambda v: v[:, None, None, None]
  return expand(1 / norm), expand(sd2 / (sigma_B ** 2 + sd2)), expand(sigma_B * method.sigma_data
                                                                       / norm)


def torch_runners(config, x_BXYC: np.ndarray, device):
  """(train(n), sample(n) -> forwards per draw, the parameter count): the diffusers model in
  eager torch with the step and sampler of the module docstring."""
  cfg, t, s = config.model, config.train, config.sample
  method = diffusion_method.from_config(config.objective_args)
  if method.kind != 'edm' or s.sampler != 'heun':
    raise ValueError(f'method {method.kind!r}, sampler {s.sampler!r}; expected edm, heun')
  model, F = torch_net(cfg, device)
  params = list(model.parameters())
  x0 = torch.from_numpy(x_BXYC).permute(0, 3, 1, 2).contiguous().to(device)
  B = x0.shape[0]
  optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                                weight_decay=t.weight_decay, fused=True)
  ema = [p.detach().clone() for p in params]
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

  def train(n: int):
    for _ in range(n):
      sigma_B = torch.exp(method.p_mean + method.p_std * torch.randn(B, device=device))
      x_t = x0 + sigma_B[:, None, None, None] * torch.randn_like(x0)
      c_in, c_skip, c_out = edm_coefficients(method, sigma_B)
      out = F(c_in * x_t, 0.25 * torch.log(sigma_B))
      loss = torch.mean(torch.square(out - (x0 - c_skip * x_t) / c_out))
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, t.clip_norm)
      optimizer.step()
      torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - t.ema_decay)
    sync()

  sigma_min, sigma_max = method.sampling_range()
  sigmas = ns.karras_sigmas(s.steps, sigma_min, sigma_max).tolist()
  forwards = [0]

  def denoise(x, sigma: float):
    forwards[0] += 1
    sigma_B = torch.full((x.shape[0],), sigma, device=device)
    c_in, c_skip, c_out = edm_coefficients(method, sigma_B)
    x0_hat = c_skip * x + c_out * F(c_in * x, 0.25 * torch.log(sigma_B))
    return torch.clamp(x0_hat, -s.clip_x0, s.clip_x0) if s.clip_x0 > 0 else x0_hat

  @torch.inference_mode()
  def draw(seed: int):
    """EDM Algorithm 1 (Heun, no correction into sigma = 0) from sigma_max."""
    z = torch.randn((s.num, cfg.channels, cfg.image_size, cfg.image_size), device=device,
                    generator=torch.Generator(device).manual_seed(seed))
    x = sigmas[0] * z
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
      d = (x - denoise(x, sigma)) / sigma
      x_next = x + (sigma_next - sigma) * d
      if sigma_next > 0:
        d_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * 0.5 * (d + d_next)
      x = x_next
    return x

  def sample(n: int):
    for i in range(n):
      forwards[0] = 0
      draw(i)
    sync()
    return forwards[0]

  return train, sample, sum(p.numel() for p in params)


def summarise(name: str, config, timings: dict, flops_forward: float, nfe_timed: int,
              nfe_report: int, peak_gflops: float, n_params: int) -> dict:
  """One row: train and sampling throughput, and MFU against the matmul peak."""
  train_s, sample_s = (statistics.median(timings[k]['seconds']) / timings[k]['n']
                       for k in ('train', 'sample'))
  train_images_s = config.train.batch_size / train_s
  forwards_s = config.sample.num * nfe_timed / sample_s
  train_gflops = train_images_s * 3 * flops_forward / 1e9
  sample_gflops = forwards_s * flops_forward / 1e9
  return {'name': name, 'params': n_params, 'forward_mflops_per_image': flops_forward / 1e6,
          'train_step_ms': 1e3 * train_s, 'train_images_per_s': train_images_s,
          'train_images_per_s_each_repeat': [config.train.batch_size * timings['train']['n'] / t
                                             for t in timings['train']['seconds']],
          'train_gflops': train_gflops, 'train_mfu': train_gflops / peak_gflops,
          'sample_draw_ms': 1e3 * sample_s, 'sample_image_forwards_per_s': forwards_s,
          f'sample_images_per_s_at_nfe_{nfe_report}': forwards_s / nfe_report,
          'sample_gflops': sample_gflops, 'sample_mfu': sample_gflops / peak_gflops}


def bench_case(source: str, net: str, args, peak_gflops: float, device) -> tuple[list, dict]:
  report_steps = config_lib.load(f'{_EXPERIMENT}:net={net},source={source}').sample.steps
  config, task = lab_setup(source, net, args.sample_steps)
  method = diffusion_method.from_config(config.objective_args)
  nfe_timed = diffusion_samplers.nfe(method, config.sample.sampler, config.sample.steps)
  nfe_report = diffusion_samplers.nfe(method, config.sample.sampler, report_steps)
  x_BXYC = random_images(config)
  lab_train, lab_sample, params = lab_runners(config, task, x_BXYC)
  flops = forward_flops(config, params, x_BXYC)
  torch_train, torch_sample, torch_params = torch_runners(config, x_BXYC, device)
  n_params = param_spec.count(task.param_specs)
  assert abs(torch_params - n_params) <= 0.01 * n_params, (
      f'{source} {net}: lab has {n_params} parameters, diffusers {torch_params}')
  torch_nfe = torch_sample(1)
  assert torch_nfe == nfe_timed, f'torch Heun took {torch_nfe} forwards, lab {nfe_timed}'
  train_seconds, train_busy = time_interleaved(
      {'lab': lab_train, 'torch': torch_train}, args.train_steps[source], args.repeats,
      args.warmup)
  sample_seconds, sample_busy = time_interleaved(
      {'lab': lab_sample, 'torch': torch_sample}, args.draws, args.repeats, 1)
  title = f'{_NAMES[source]} {_NAMES[net]}'
  rows = []
  baseline = 'UNet2DModel' if net == 'unet' else 'DiTTransformer2DModel'
  for key, impl, count in (('lab', 'lab (jax.jit)', n_params),
                           ('torch', f'diffusers {baseline} eager', torch_params)):
    timings = {'train': {'seconds': train_seconds[key], 'n': args.train_steps[source]},
               'sample': {'seconds': sample_seconds[key], 'n': args.draws}}
    rows.append(summarise(f'{title}, {impl}', config, timings, flops, nfe_timed, nfe_report,
                          peak_gflops, count))
  lab_row, torch_row = rows
  per_s = f'sample_images_per_s_at_nfe_{nfe_report}'
  return rows, {
      'config': f'experiments/diffusion_images.py:net={net},source={source}',
      'model': config.model.to_dict(), 'batch': config.train.batch_size,
      'sample': {'sampler': config.sample.sampler, 'images_per_draw': config.sample.num,
                 'timed_steps': config.sample.steps, 'timed_nfe': nfe_timed,
                 'reported_steps': report_steps, 'reported_nfe': nfe_report},
      'params': {'lab': n_params, 'diffusers': torch_params},
      'forward_flops_per_image': flops,
      'ratio_lab_over_torch': {
          'train_images_per_s': lab_row['train_images_per_s'] / torch_row['train_images_per_s'],
          'sample_images_per_s': lab_row[per_s] / torch_row[per_s]},
      'other_processes_cores_busy': {'train': train_busy, 'sample': sample_busy}}


def markdown(rows: list, cases: dict, peaks: dict) -> str:
  nfe = ', '.join(str(n) for n in sorted({c['sample']['reported_nfe'] for c in cases.values()}))
  lines = ['| case, implementation | params | fwd MFLOP/image | train step ms | train images/s '
           f'| train MFU | sample images/s (NFE {nfe}) | sample MFU | lab / diffusers (train, '
           'sample) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for row, case in zip(rows, [c for c in cases.values() for _ in range(2)]):
    per_s = f"sample_images_per_s_at_nfe_{case['sample']['reported_nfe']}"
    ratio = case['ratio_lab_over_torch']
    ratio_text = (f"{ratio['train_images_per_s']:.2f}x, {ratio['sample_images_per_s']:.2f}x"
                  if row['name'].endswith('(jax.jit)') else '')
    lines.append(f"| {row['name']} | {row['params']:,} | {row['forward_mflops_per_image']:.1f} | "
                 f"{row['train_step_ms']:.0f} | {row['train_images_per_s']:,.0f} | "
                 f"{100 * row['train_mfu']:.1f}% | {row[per_s]:,.1f} | "
                 f"{100 * row['sample_mfu']:.1f}% | {ratio_text} |")
  lines.append(f'\n{peak_sentence(peaks)}.')
  return '\n'.join(lines)


def load_average() -> list[float]:
  with open('/proc/loadavg') as f:
    return [float(v) for v in f.read().split()[:3]]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='a smoke run of a few steps')
  args = parser.parse_args()
  if args.quick:
    args.train_steps, args.draws, args.sample_steps = {'digits': 1, 'mnist': 1}, 1, 2
    args.repeats, args.warmup, matmul_reps = 1, 1, 2
  else:
    args.train_steps, args.draws, args.sample_steps = {'digits': 5, 'mnist': 2}, 1, 3
    args.repeats, args.warmup, matmul_reps = 7, 2, 10
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  load_start, start_wall = load_average(), time.perf_counter()

  peaks = matmul_peaks((1024, 2048), matmul_reps)
  rows, cases = [], {}
  for source, net in CASES:
    case_rows, cases[f'{source}_{net}'] = bench_case(source, net, args, peaks['peak_gflops'],
                                                     device)
    rows += case_rows

  wall = time.perf_counter() - start_wall
  result = {
      'benchmark': 'bench_diffusion', 'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': {'jax_devices': [str(d) for d in jax.devices()], 'cpu': cpu_model_name(),
                 'cores': cores, 'torch_device': str(device),
                 'torch_threads': torch.get_num_threads()},
      'load_average_1_5_15min': {'start': load_start, 'end': load_average()},
      'git': git_state(),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__, 'torch': torch.__version__,
                   'diffusers': diffusers.__version__, 'numpy': np.__version__},
      'protocol': {'train_steps_per_repeat': args.train_steps, 'draws_per_repeat': args.draws,
                   'repeats': args.repeats, 'warmup_steps': args.warmup, 'warmup_draws': 1,
                   'statistic': 'median over repeats', 'train_flops': '3 x forward',
                   'sample_flops': 'NFE x forward', 'wall_seconds': wall},
      'matmul_peak': peaks, 'cases': cases, 'rows': rows,
  }
  _RESULTS.mkdir(parents=True, exist_ok=True)
  out = _RESULTS / ('bench_diffusion_quick.json' if args.quick else 'bench_diffusion.json')
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(markdown(rows, cases, peaks))
  busy = max(max(c['other_processes_cores_busy'].values()) for c in cases.values())
  print(f"\nOther processes kept up to {busy:.2f} of {cores} cores busy while timed; load average "
        f"{load_start[0]:.1f} at the start. {wall:.0f} s in all. Wrote {out}")


if __name__ == '__main__':
  main()
