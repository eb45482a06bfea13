"""GPT training step on CPU: lab's jitted train step against eager PyTorch, tokens/s and MFU.

  .venv/bin/python benchmarks/bench_gpt_cpu.py [--quick]

1. Matmul peak of this machine: float32 n x n matmuls (n = 1024, 2048), best of several reps, in
   jnp (jit) and in torch; MFU is taken against the largest of these.
2. nanoGPT's shakespeare_char `baby` config (experiments/gpt_chars.py:baby; 4 layers, width 128,
   block 64, batch 12, vocab 65) on one fixed random token batch: lab's full step (forward,
   backward, clipping, AdamW) exactly as the trainer builds and runs it (lab.run.prepare, then
   loop.setup: loop.init_state and jax.jit(step.make_train_step(...)) with donation), against
   the same model and step in eager torch (torch_gpt.py) started from the same parameters.
   Repeats alternate between the two, so load from other processes hits both alike.
3. The default demo config (experiments/gpt_chars.py), lab only.
Writes benchmarks/results/bench_gpt_cpu.json (bench_gpt_cpu_quick.json with --quick) and prints
a Markdown table. Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B):
  6 N + 12 L T D,   N = L (2 D (N_h + N_kv) H + 2 D F) + D V   (3 D F with SwiGLU),
N counting the matmul weights: q, k, v, out and the two MLP matrices of every block and the tied
LM head (embedding lookups, biases and norms are not matmuls); 12 L T D is the attention scores
and values (forward 4 L T D, backward twice that), with causal masking not halved.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np
import torch

import torch_gpt
from lab import config as config_lib
from lab import run
from lab.nn import param_spec
from lab.objectives import lm
from lab.parallel import rules as rules_lib
from lab.train import loop

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_EXPERIMENT = str(_ROOT / 'experiments' / 'gpt_chars.py')
_RESULTS = _ROOT / 'benchmarks' / 'results'
_SHAKESPEARE_CHAR_VOCAB = 65


def _best_seconds(fn, reps: int) -> float:
  fn()
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peaks(sizes, reps: int) -> dict:
  """GFLOP/s of float32 n x n matmuls (2 n^3 FLOPs), best of `reps`, in jnp and in torch."""
  rng = np.random.default_rng(0)
  matmul = jax.jit(jnp.matmul)
  out = {'jnp_gflops': {}, 'torch_gflops': {}}
  for n in sizes:
    a_np, b_np = (rng.standard_normal((n, n), np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    a_t, b_t = torch.from_numpy(a_np), torch.from_numpy(b_np)
    out['jnp_gflops'][n] = 2 * n**3 / _best_seconds(lambda: matmul(a, b).block_until_ready(),
                                                    reps) / 1e9
    out['torch_gflops'][n] = 2 * n**3 / _best_seconds(lambda: torch.mm(a_t, b_t), reps) / 1e9
  best = {lib: max(out[f'{lib}_gflops'].values()) for lib in ('jnp', 'torch')}
  out['mfu_against'] = max(best, key=best.get)
  out['peak_gflops'] = max(best.values())
  return out


def lab_setup(variant: str, vocab_size: int | None):
  """lab.run.prepare on the python_docs corpus (no download); `vocab_size` then replaces the
  corpus's vocab (the task is rebuilt for it), since only the shapes matter here."""
  spec = f'{_EXPERIMENT}:{variant}' if variant else _EXPERIMENT
  config = config_lib.override(config_lib.load(spec), ['data.source=python_docs'])
  config, task, data = run.prepare(config)
  if vocab_size:
    unlocked = config.as_configdict()
    unlocked.model.vocab_size = vocab_size
    config = ml_collections.FrozenConfigDict(unlocked)
    task = lm.make_task(config, data)
  return config, task


def flops_per_token(cfg, T: int) -> dict:
  """PaLM appendix B: 6 N + 12 L T D over the matmul weights N (see the module docstring)."""
  H = cfg.head_dim or cfg.d_model // cfg.n_heads
  mlp_matrices = 3 if cfg.mlp == 'swiglu' else 2
  attention_matrices = 2 * cfg.d_model * (cfg.n_heads + cfg.n_kv_heads) * H
  block = attention_matrices + mlp_matrices * cfg.d_model * cfg.d_ff
  matmul_params = cfg.n_layers * block + cfg.d_model * cfg.vocab_size
  attention = 12 * cfg.n_layers * T * cfg.n_heads * H
  return {'matmul_params': matmul_params, 'dense': 6 * matmul_params, 'attention': attention,
          'total': 6 * matmul_params + attention}


def random_tokens(config) -> np.ndarray:
  """int32 [batch, block + 1]: inputs and shifted targets, as lab.objectives.lm reads them."""
  shape = (config.train.batch_size, config.data.block_size + 1)
  return np.random.default_rng(0).integers(0, config.model.vocab_size, shape, dtype=np.int32)


def lab_runner(config, task, tokens_BT1: np.ndarray):
  """(run(n) taking n train steps as lab.train.loop runs them, the initial params on the host)."""
  setup = loop.setup(config, task)
  with rules_lib.activate(setup.mesh, setup.rules):
    holder = [setup.init()]
    params = jax.device_get(holder[0].params)
    batch = setup.global_batch({'tokens': tokens_BT1})

  def run_steps(n: int):
    state = holder[0]
    with rules_lib.activate(setup.mesh, setup.rules):
      for _ in range(n):
        state, _ = setup.train_step(state, batch)
      holder[0] = jax.block_until_ready(state)

  return run_steps, params


def torch_runner(config, tokens_BT1: np.ndarray, params):
  """(run(n) taking n eager torch train steps, the parameter count, the initial loss)."""
  model = torch_gpt.GPT(config.model)
  torch_gpt.load_lab_params(model, params)
  tokens = torch.from_numpy(tokens_BT1.astype(np.int64))
  with torch.no_grad():
    loss = float(torch_gpt.loss_fn(model, tokens))
  train_step = torch_gpt.make_train_step(model, config.train)

  def run_steps(n: int):
    for _ in range(n):
      train_step(tokens)

  return run_steps, sum(p.numel() for p in model.parameters()), loss


def cpu_seconds() -> tuple[float, float]:
  """(CPU seconds all processes have used, CPU seconds this process has used), from /proc/stat."""
  with open('/proc/stat') as f:
    user, nice, system, _, _, irq, softirq = map(int, f.readline().split()[1:8])
  own = os.times()
  return (user + nice + system + irq + softirq) / os.sysconf('SC_CLK_TCK'), own.user + own.system


def time_interleaved(runners: dict, steps: int, repeats: int, warmup: int) -> tuple[dict, float]:
  """Seconds per repeat of `steps` steps for each runner (repeats alternate between runners),
  and how many cores other processes kept busy meanwhile."""
  for run_steps in runners.values():
    run_steps(warmup)
  seconds = {name: [] for name in runners}
  start_wall, (start_all, start_own) = time.perf_counter(), cpu_seconds()
  for _ in range(repeats):
    for name, run_steps in runners.items():
      start = time.perf_counter()
      run_steps(steps)
      seconds[name].append(time.perf_counter() - start)
  end_all, end_own = cpu_seconds()
  others = (end_all - start_all) - (end_own - start_own)
  return seconds, max(0.0, others) / (time.perf_counter() - start_wall)


def summarise(name: str, config, seconds: list, steps: int, flops: dict, peak_gflops: float,
              n_params: int) -> dict:
  tokens_per_step = config.train.batch_size * config.data.block_size
  step_s = statistics.median(seconds) / steps
  tokens_per_s = tokens_per_step / step_s
  gflops = tokens_per_s * flops['total'] / 1e9
  return {'name': name, 'params': n_params, 'tokens_per_step': tokens_per_step,
          'model_flops_per_token': flops['total'], 'median_step_ms': 1e3 * step_s,
          'tokens_per_s': tokens_per_s,
          'tokens_per_s_each_repeat': [tokens_per_step * steps / s for s in seconds],
          'achieved_gflops': gflops, 'mfu': gflops / peak_gflops}


def bench_baby(args, peak_gflops: float) -> tuple[list, dict]:
  config, task = lab_setup('baby', _SHAKESPEARE_CHAR_VOCAB)
  tokens_BT1 = random_tokens(config)
  lab_run, params = lab_runner(config, task, tokens_BT1)
  lab_loss = float(task.loss_fn(params, {}, {'tokens': tokens_BT1}, None, False)[0])
  torch_run, torch_params, torch_loss = torch_runner(config, tokens_BT1, params)
  n_params = param_spec.count(task.param_specs)
  assert n_params == torch_params, f'lab has {n_params} parameters, torch {torch_params}'
  assert abs(lab_loss - torch_loss) < 1e-4, f'initial loss: lab {lab_loss}, torch {torch_loss}'
  flops = flops_per_token(config.model, config.data.block_size)
  seconds, other_cores = time_interleaved({'lab': lab_run, 'torch': torch_run}, args.baby_steps,
                                          args.repeats, args.warmup)
  rows = [summarise(f'baby, {name}', config, seconds[key], args.baby_steps, flops, peak_gflops,
                    n_params)
          for key, name in (('lab', 'lab (jax.jit)'), ('torch', 'PyTorch eager'))]
  return rows, {'flops_per_token': flops, 'initial_loss': {'lab': lab_loss, 'torch': torch_loss},
                'ratio_lab_over_torch': rows[0]['tokens_per_s'] / rows[1]['tokens_per_s'],
                'other_processes_cores_busy': other_cores}


def bench_default(args, peak_gflops: float) -> tuple[dict, dict]:
  config, task = lab_setup('', None)
  lab_run, _ = lab_runner(config, task, random_tokens(config))
  flops = flops_per_token(config.model, config.data.block_size)
  seconds, other_cores = time_interleaved({'lab': lab_run}, args.default_steps, args.repeats,
                                          args.warmup)
  row = summarise('default, lab (jax.jit)', config, seconds['lab'], args.default_steps, flops,
                  peak_gflops, param_spec.count(task.param_specs))
  return row, {'flops_per_token': flops, 'other_processes_cores_busy': other_cores}


def cpu_model_name() -> str:
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  return platform.processor()


def git_state() -> dict:
  """The commit benchmarked, and whether the working tree differed from it."""
  git = lambda *a: subprocess.run(['git', *a], cwd=_ROOT, capture_output=True, text=True).stdout
  return {'commit': git('rev-parse', 'HEAD').strip(), 'dirty': bool(git('status', '--porcelain'))}


def peak_sentence(peaks: dict) -> str:
  """'Matmul peak, ...: jnp (...), torch (...); MFU is against X's P GFLOP/s' (no full stop)
  from matmul_peaks' result, for the tables under each benchmark."""
  per_size = lambda lib: ', '.join(f'{n}: {g:.0f}' for n, g in peaks[f'{lib}_gflops'].items())
  return (f"Matmul peak, float32 n x n, best of reps, GFLOP/s: jnp ({per_size('jnp')}), "
          f"torch ({per_size('torch')}); MFU is against {peaks['mfu_against']}'s "
          f"{peaks['peak_gflops']:.0f} GFLOP/s")


def markdown(rows: list, peaks: dict) -> str:
  lines = ['| config, implementation | params | tokens/step | model FLOPs/token | step ms '
           '(median) | tokens/s | GFLOP/s | MFU |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['name']} | {r['params']:,} | {r['tokens_per_step']} | "
                 f"{r['model_flops_per_token'] / 1e6:.2f} M | {r['median_step_ms']:.1f} | "
                 f"{r['tokens_per_s']:,.0f} | {r['achieved_gflops']:.1f} | {100 * r['mfu']:.1f}% |")
  lines.append(f'\n{peak_sentence(peaks)}.')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='a smoke run of a few steps (< 1 min)')
  args = parser.parse_args()
  args.baby_steps, args.default_steps = (3, 2) if args.quick else (20, 10)
  args.repeats, args.warmup, matmul_reps = (2, 1, 3) if args.quick else (7, 3, 10)
  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(cores)
  start_wall = time.perf_counter()

  peaks = matmul_peaks((1024, 2048), matmul_reps)
  baby_rows, baby = bench_baby(args, peaks['peak_gflops'])
  default_row, default = bench_default(args, peaks['peak_gflops'])
  rows = baby_rows + [default_row]

  wall = time.perf_counter() - start_wall
  other_cores = max(baby['other_processes_cores_busy'], default['other_processes_cores_busy'])
  result = {
      'benchmark': 'bench_gpt_cpu', 'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': {'jax_devices': [str(d) for d in jax.devices()], 'cpu': cpu_model_name(),
                 'platform_processor': platform.processor(), 'cores': cores,
                 'torch_threads': torch.get_num_threads()},
      'git': git_state(),
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__, 'torch': torch.__version__,
                   'numpy': np.__version__},
      'protocol': {'baby_steps_per_repeat': args.baby_steps,
                   'default_steps_per_repeat': args.default_steps, 'repeats': args.repeats,
                   'warmup_steps': args.warmup, 'statistic': 'median over repeats',
                   'wall_seconds': wall},
      'matmul_peak': peaks, 'baby': baby, 'default': default, 'rows': rows,
  }
  _RESULTS.mkdir(parents=True, exist_ok=True)
  out = _RESULTS / ('bench_gpt_cpu_quick.json' if args.quick else 'bench_gpt_cpu.json')
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(markdown(rows, peaks))
  warning = ' (over 0.2: expect slower, noisier timings)' if other_cores > 0.2 else ''
  print(f"\nlab / PyTorch tokens/s (baby): {baby['ratio_lab_over_torch']:.2f}x. Other processes "
        f"kept up to {other_cores:.2f} of {cores} cores busy while steps were timed{warning}. "
        f"Wrote {out}")


if __name__ == '__main__':
  main()
