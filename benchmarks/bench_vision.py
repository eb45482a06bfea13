"""Vision backbones' training step on CPU: lab's jitted step against eager PyTorch (transformers),
images/s and MFU.

  .venv/bin/python benchmarks/bench_vision.py [--quick] [--batch 8] [--models resnet50,vit_s16]

Models, at 224 x 224 x 3 with a 1000-class head, float32:
  resnet18, resnet50   ResNet v1.5 (He et al. 2015, arXiv:1512.03385; lab.models.resnet against
                       transformers' ResNetForImageClassification)
  efficientnet_b0      EfficientNet-B0 (Tan & Le 2019, arXiv:1905.11946; lab.models.efficientnet
                       with efficientnet_scaling's b0 fields against EfficientNetForImage-
                       Classification)
  vit_s16              ViT-S/16 (Dosovitskiy et al. 2021, arXiv:2010.11929; width 384, 12 layers,
                       6 heads, MLP 1536, as DeiT-S, Touvron et al. 2021, arXiv:2012.12877;
                       lab.models.vit against ViTForImageClassification with SDPA attention)
Both sides start from the same weights: the transformers model is built at random and converted
with lab.models.{resnet,efficientnet,vit}_hf; the two eval-mode forwards must then agree on one
random batch (the JSON's forward_agreement), so the comparison is of one computation.

One step is forward, backward and update on a fixed random batch with random labels, loss
L = -1/B sum_b log softmax(logits_b)[y_b]. lab's step is the trainer's: lab.train.loop.setup
(optimizers.make, jax.jit(step.make_train_step(...)) with donation) on a Task over the model;
torch's is eager model(x), cross_entropy, backward, optimizer.step. Optimizers: SGD with momentum
0.9 and weight decay 1e-4 for the CNNs (ResNet's), AdamW with weight decay 0.05 for the ViT
(DeiT's), each decaying the tensors of two or more dims on its own side.
Repeats alternate between lab and torch (bench_gpt_cpu.time_interleaved), so load from other
processes hits both alike; the median repeat is reported.

Model FLOPs of a step are 3x the forward's (backward twice the forward), the forward's from XLA's
cost analysis of lab's jitted eval-mode forward (which counts the body of the ViT's scan over
layers once: the other L - 1 layers' matmul FLOPs are added, vit_layer_matmul_flops); they are set
beside the published multiply-add counts at 224^2 (1 MAC = 2 FLOPs): ResNet-18 1.8 and ResNet-50
4.1 GMACs (torchvision's model table), EfficientNet-B0 0.39 (the paper's Table 2), ViT-S/16 4.6
(DeiT's Table 1). MFU is the achieved model FLOP/s over the machine's measured float32 matmul peak
(bench_gpt_cpu.matmul_peaks).
Writes benchmarks/results/bench_vision.json (bench_vision_quick.json with --quick: 64 x 64
images, batch 2, one step a repeat) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import optax
import torch
import transformers

import bench_gpt_cpu
from lab.models import efficientnet, efficientnet_hf, resnet, resnet_hf, vit, vit_hf
from lab.models import efficientnet_scaling as scaling
from lab.nn import param_spec
from lab.parallel import rules as rules_lib
from lab.train import loop, optimizers
from lab.train.state import TrainState
from lab.train.task import Task

_RESULTS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
MODELS = ('resnet18', 'resnet50', 'efficientnet_b0', 'vit_s16')
KNOWN_GMACS_224 = {'resnet18': 1.8, 'resnet50': 4.1, 'efficientnet_b0': 0.39, 'vit_s16': 4.6}
VIT_S16 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
               intermediate_size=1536, patch_size=16, layer_norm_eps=1e-6)
NUM_CLASSES = 1000
# (module, forward(cfg, params, state, x_BXYC, train=, rng=) -> (logits_BV, new_state)).
MODULES = {'resnet': (resnet, resnet.forward), 'efficientnet': (efficientnet, efficientnet.forward),
           'vit': (vit, vit.forward_with_state)}


def family(name: str) -> str:
  return name.split('_')[0].rstrip('0123456789')


def hf_model(name: str, image_size: int) -> torch.nn.Module:
  """The transformers classifier of `name` (random init, float32, train mode)."""
  if family(name) == 'resnet':
    block, depths = resnet.DEPTHS[int(name.removeprefix('resnet'))]
    width = resnet.DEFAULTS['width']
    config = transformers.ResNetConfig(
        embedding_size=width, depths=list(depths), layer_type=block,
        hidden_sizes=[resnet.EXPANSION[block] * width * 2 ** i for i in range(len(depths))],
        num_labels=NUM_CLASSES)
    return transformers.ResNetForImageClassification(config).train()
  if family(name) == 'efficientnet':
    b0 = scaling.VARIANTS['b0']
    config = transformers.EfficientNetConfig(
        width_coefficient=b0.width, depth_coefficient=b0.depth, image_size=image_size,
        dropout_rate=b0.dropout, drop_connect_rate=scaling.DROP_CONNECT_RATE,
        hidden_dim=scaling.round_filters(scaling.HEAD_CHANNELS, b0.width), num_labels=NUM_CLASSES)
    return transformers.EfficientNetForImageClassification(config).train()
  config = transformers.ViTConfig(**VIT_S16, image_size=image_size, num_labels=NUM_CLASSES,
                                  attn_implementation='sdpa')
  return transformers.ViTForImageClassification(config).train()


def reset_batch_norm(model: torch.nn.Module, x_BCXY: torch.Tensor) -> None:
  """BN scales and biases to torch's defaults (1, 0) and running statistics to those of x (one
  train-mode forward with momentum None, the cumulative mean), so that eval mode normalises as
  training does. transformers draws EfficientNet's BN scales from N(0, 0.02^2); with eps 1e-3
  each BN then shrinks its input and the logits vanish (~1e-30 at 64 x 64) even in training."""
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  momenta = [m.momentum for m in norms]
  for m in norms:
    m.reset_parameters()
    m.momentum = None
  with torch.no_grad():
    model(pixel_values=x_BCXY)
  for m, momentum in zip(norms, momenta):
    m.momentum = momentum


def lab_model(name: str, model: torch.nn.Module) -> tuple[ml_collections.FrozenConfigDict, dict,
                                                         dict]:
  """(model config, params, state) of lab's network converted from the transformers model."""
  hf_config = model.config.to_dict()
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if family(name) == 'resnet':
    cfg = ml_collections.FrozenConfigDict(resnet_hf.config_from_hf(hf_config, NUM_CLASSES))
    depth = int(name.removeprefix('resnet'))
    if resnet.architecture(cfg) != resnet.DEPTHS[depth]:
      raise ValueError(f'{name}: converted to {resnet.architecture(cfg)}; expected '
                       f'{resnet.DEPTHS[depth]}')
    params, state = resnet_hf.params_from_hf(cfg, state_dict)
  elif family(name) == 'efficientnet':
    cfg = ml_collections.FrozenConfigDict(efficientnet_hf.config_from_hf(hf_config, NUM_CLASSES))
    fields = scaling.model_fields('b0')
    if {k: cfg[k] for k in fields} != fields:
      raise ValueError(f'{name}: converted to {dict(cfg)}; expected the b0 fields {fields}')
    params, state = efficientnet_hf.params_from_hf(cfg, state_dict)
  else:
    cfg = ml_collections.FrozenConfigDict(vit_hf.config_from_hf(hf_config,
                                                                num_classes=NUM_CLASSES))
    params, state = jax.device_get(vit_hf.params_from_hf(cfg, state_dict)), vit.init_state(cfg)
  return cfg, params, state


def make_task(name: str, cfg) -> Task:
  """The model with softmax cross-entropy on batch {'image': x_BXYC, 'label': y_B}."""
  module, forward = MODULES[family(name)]

  def loss_fn(params, state, batch, rng, train):
    logits_BV, new_state = forward(cfg, params, state, batch['image'], train=train, rng=rng)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits_BV, batch['label']).mean()
    return loss, ({'loss': loss}, new_state)

  return Task(param_specs=module.param_specs(cfg), init_state=lambda key: module.init_state(cfg),
              loss_fn=loss_fn)


def train_fields(name: str, batch_size: int) -> dict:
  """config.train: constant learning rate, no clipping, float32; SGD (CNNs) or AdamW (ViT)."""
  adamw = family(name) == 'vit'
  return dict(optimizer='adamw' if adamw else 'sgd', lr=1e-4 if adamw else 1e-3,
              weight_decay=0.05 if adamw else 1e-4, b1=0.9, b2=0.999, eps=1e-8, min_lr=0.0,
              schedule='constant', warmup_steps=0, decay_steps=0, wsd_decay_fraction=0.2,
              steps=1000, batch_size=batch_size, grad_accum=1, clip_norm=0.0, ema_decay=0.0,
              compute_dtype='float32', loss_scale_init=2.0 ** 15, loss_scale_period=2000)


def torch_optimizer(model: torch.nn.Module, train: dict) -> torch.optim.Optimizer:
  """The same optimizer as train_fields on the torch side (decay on tensors of >= 2 dims)."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{'params': [p for p in params if p.ndim >= 2], 'weight_decay': train['weight_decay']},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0}]
  if train['optimizer'] == 'adamw':
    return torch.optim.AdamW(groups, lr=train['lr'], betas=(train['b1'], train['b2']),
                             eps=train['eps'])
  return torch.optim.SGD(groups, lr=train['lr'], momentum=train['b1'])


def vit_layer_matmul_flops(cfg, image_size: int) -> float:
  """Matmul FLOPs of one ViT encoder layer per image: 2 T (4 D^2 + 2 D F) for the q, k, v, out
  and MLP projections plus 4 T^2 D for the scores and the weighted values, T = patches + 1.
  XLA's cost analysis counts the body of the layers' lax.scan once, so the other L - 1 layers
  are added with this count."""
  T = (image_size // cfg.patch_size) ** 2 + int(cfg.class_token)
  D, F = cfg.d_model, cfg.mlp_dim
  return 2 * T * (4 * D * D + 2 * D * F) + 4 * T * T * D


def forward_flops_and_agreement(name: str, cfg, params, state, model, x_BXYC) -> tuple[float,
                                                                                      dict]:
  """(XLA's FLOPs of lab's jitted eval-mode forward per image, the two eval forwards' agreement:
  max |logits_lab - logits_torch| over the batch beside max |logits_torch|)."""
  _, forward = MODULES[family(name)]
  compiled = jax.jit(lambda p, s, x: forward(cfg, p, s, x, train=False)[0]).lower(
      params, state, x_BXYC).compile()
  cost = compiled.cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost)['flops'] / x_BXYC.shape[0]
  if family(name) == 'vit':
    flops += (cfg.n_layers - 1) * vit_layer_matmul_flops(cfg, x_BXYC.shape[1])
  lab_BV = np.asarray(compiled(params, state, x_BXYC), np.float64)
  model.eval()
  with torch.no_grad():
    torch_BV = model(pixel_values=torch.from_numpy(x_BXYC.transpose(0, 3, 1, 2).copy())).logits
  model.train()
  torch_BV = torch_BV.double().numpy()
  diff, scale = float(np.abs(lab_BV - torch_BV).max()), float(np.abs(torch_BV).max())
  if not (scale > 0 and diff <= 1e-3 * scale):
    raise AssertionError(f'{name}: lab and torch eval logits differ by {diff} (max |logit| '
                         f'{scale}); expected the same computation')
  return flops, {'eval_logits_max_abs_diff': diff, 'torch_logits_max_abs': scale,
                 'relative': diff / scale}


def lab_runner(config, task, params, model_state, batch: dict):
  """run(n): n train steps as lab.train.loop runs them (loop.setup's jitted step, donating the
  state), from the converted params and BN state. The state is what loop.init_state makes but
  for the parameter values (step 0, fresh optimizer state, the root key), put in setup's layout;
  this skips compiling the parameter initialisation."""
  setup = loop.setup(config, task)
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                     opt_state=optimizers.make(config.train).init(params),
                     model_state=model_state, ema_params=None, loss_scale=None,
                     rng=jax.random.PRNGKey(config.seed))
  with rules_lib.activate(setup.mesh, setup.rules):
    holder = [jax.device_put(state, jax.tree.map(lambda a: a.sharding, setup.abstract_state))]
    global_batch = setup.global_batch(batch)

  def run_steps(n: int):
    state = holder[0]
    with rules_lib.activate(setup.mesh, setup.rules):
      for _ in range(n):
        state, _ = setup.train_step(state, global_batch)
      holder[0] = jax.block_until_ready(state)

  return run_steps


def torch_runner(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict):
  """run(n): n eager torch train steps on the same batch (images channels-first)."""
  x_BCXY = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy())
  y_B = torch.from_numpy(batch['label'].astype(np.int64))

  def run_steps(n: int):
    for _ in range(n):
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(model(pixel_values=x_BCXY).logits, y_B)
      loss.backward()
      optimizer.step()

  return run_steps


def bench_model(name: str, args, peak_gflops: float) -> dict:
  """Converts, checks and times one model; images/s, model FLOPs and MFU of both sides."""
  rng = np.random.default_rng(0)
  B, X = args.batch, args.image_size
  batch = {'image': rng.standard_normal((B, X, X, 3), np.float32),
           'label': rng.integers(0, NUM_CLASSES, (B,), dtype=np.int32)}
  torch.manual_seed(0)
  model = hf_model(name, X)
  reset_batch_norm(model, torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy()))
  cfg, params, state = lab_model(name, model)
  task = make_task(name, cfg)
  n_params = param_spec.count(task.param_specs)
  torch_params = sum(p.numel() for p in model.parameters())
  if n_params != torch_params:
    raise AssertionError(f'{name}: lab has {n_params} parameters, torch {torch_params}')
  flops_fwd, agreement = forward_flops_and_agreement(name, cfg, params, state, model,
                                                     batch['image'])
  train = train_fields(name, B)
  config = ml_collections.FrozenConfigDict(dict(
      seed=0, model=cfg, train=train, sharding_rules={},
      mesh=dict(data=-1, fsdp=1, tensor=1, expert=1, seq=1)))
  runners = {'lab': lab_runner(config, task, params, state, batch),
             'torch': torch_runner(model, torch_optimizer(model, train), batch)}
  seconds, other_cores = bench_gpt_cpu.time_interleaved(runners, args.steps, args.repeats,
                                                        args.warmup)
  step_flops = 3 * flops_fwd
  sides = {}
  for side, times in seconds.items():
    images_per_s = B * args.steps / statistics.median(times)
    sides[side] = {'images_per_s': images_per_s,
                   'images_per_s_each_repeat': [B * args.steps / s for s in times],
                   'achieved_gflops': images_per_s * step_flops / 1e9,
                   'mfu': images_per_s * step_flops / 1e9 / peak_gflops}
  known = KNOWN_GMACS_224[name]
  return {'name': name, 'batch': B, 'image_size': X, 'params': n_params,
          'optimizer': train['optimizer'], 'forward_agreement': agreement,
          'forward_gflops_per_image_xla': flops_fwd / 1e9,
          'known_gmacs_per_image_224': known,
          'xla_gmacs_over_known': flops_fwd / 2e9 / known if X == 224 else None,
          'train_step_gflops_per_image': step_flops / 1e9, 'lab': sides['lab'],
          'torch': sides['torch'],
          'ratio_lab_over_torch': sides['lab']['images_per_s'] / sides['torch']['images_per_s'],
          'other_processes_cores_busy': other_cores}


def markdown(rows: list, peaks: dict) -> str:
  lines = ['| model | batch | lab img/s | torch img/s | lab / torch | fwd GFLOPs/img, XLA '
           '(published) | lab MFU | torch MFU |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['name']} ({r['image_size']}px) | {r['batch']} | "
                 f"{r['lab']['images_per_s']:.2f} | {r['torch']['images_per_s']:.2f} | "
                 f"{r['ratio_lab_over_torch']:.2f} | {r['forward_gflops_per_image_xla']:.2f} "
                 f"({2 * r['known_gmacs_per_image_224']:.2f} at 224px) | "
                 f"{100 * r['lab']['mfu']:.1f}% | {100 * r['torch']['mfu']:.1f}% |")
  lines.append(f'\n{bench_gpt_cpu.peak_sentence(peaks)}, with 3x the forward FLOPs a step.')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='a smoke run: 64 x 64 images, batch 2, one step a repeat')
  parser.add_argument('--batch', type=int, default=0, help='images a step (default 8; quick 2)')
  parser.add_argument('--models', default=','.join(MODELS), help=f'a subset of {MODELS}')
  parser.add_argument('--steps', type=int, default=0, help='steps a repeat (default 2; quick 1)')
  parser.add_argument('--repeats', type=int, default=0, help='repeats (default 5; quick 2)')
  args = parser.parse_args()
  names = args.models.split(',')
  unknown = sorted(set(names) - set(MODELS))
  if unknown:
    parser.error(f'--models has {unknown}; expected names from {MODELS}')
  if args.batch < 0 or args.steps < 0 or args.repeats < 0:
    parser.error('--batch, --steps and --repeats must be positive (0: the default)')
  args.image_size = 64 if args.quick else 224
  args.batch = args.batch or (2 if args.quick else 8)
  args.steps = args.steps or (1 if args.quick else 2)
  args.repeats = args.repeats or (2 if args.quick else 5)
  args.warmup, matmul_reps = 1, (3 if args.quick else 10)
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  start_wall, load_start = time.perf_counter(), os.getloadavg()

  peaks = bench_gpt_cpu.matmul_peaks((1024, 2048), matmul_reps)
  rows = [bench_model(name, args, peaks['peak_gflops']) for name in names]

  result = {
      'benchmark': 'bench_vision', 'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': {'jax_devices': [str(d) for d in jax.devices()],
                 'cpu': bench_gpt_cpu.cpu_model_name(), 'cores': cores,
                 'torch_threads': torch.get_num_threads(),
                 'load_average_1_5_15_min': {'start': load_start, 'end': os.getloadavg()}},
      'git': bench_gpt_cpu.git_state(),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__, 'torch': torch.__version__,
                   'transformers': transformers.__version__, 'optax': optax.__version__,
                   'numpy': np.__version__},
      'protocol': {'image_size': args.image_size, 'batch': args.batch,
                   'steps_per_repeat': args.steps, 'repeats': args.repeats,
                   'warmup_steps': args.warmup, 'statistic': 'median over repeats',
                   'model_flops_per_step': '3 x XLA cost analysis of the eval-mode forward '
                                           '(ViT: + the L - 1 scanned layers counted once by XLA)',
                   'wall_seconds': time.perf_counter() - start_wall},
      'matmul_peak': peaks, 'rows': rows,
  }
  _RESULTS.mkdir(parents=True, exist_ok=True)
  out = _RESULTS / ('bench_vision_quick.json' if args.quick else 'bench_vision.json')
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(markdown(rows, peaks))
  other = max(r['other_processes_cores_busy'] for r in rows)
  print(f'\nOther processes kept up to {other:.2f} of {cores} cores busy while steps were timed '
        f'(load average {load_start[0]:.1f} at the start). Wrote {out}')


if __name__ == '__main__':
  main()
