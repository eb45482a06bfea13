"""Medusa speculative decoding against plain greedy decoding on a small trained char GPT.

  .venv/bin/python benchmarks/bench_speculative.py [--workdir DIR] [--quick]

1. The model: DIR/gpt (experiments/gpt_chars.py, --backbone_steps steps) and DIR/medusa
   (experiments/medusa_chars.py, Medusa-1 heads on it, --heads_steps steps) are trained here
   unless DIR already holds them (then they are restored with lab.train.restore); DIR defaults
   to a fresh temporary directory.
2. Prompts: --prompts windows of 16 characters from the validation text; each row decodes
   --new tokens at batch size 1 (Medusa's setting).
3. Plain greedy decoding (lab.sampling.decode.generate, temperature 0) and medusa_generate with
   several trees, greedy (whose output must equal plain decoding's, token for token) and
   typical acceptance; every method is jitted and compiled before timing, and the repeats
   alternate between methods so that load from other processes hits all alike.
Reported per method: mean tokens per verification step (accepted path length, root included;
plain decoding is 1), base-model forwards, median seconds per prompt and the speedup over plain
decoding timed in the same run. Writes benchmarks/results/bench_speculative.json
(bench_speculative_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time

import jax
import jaxlib
import numpy as np

from lab import config as config_lib
from lab import run
from lab.models import transformer
from lab.sampling import decode, medusa, tree_attention
from lab.train import loop, restore

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_RESULTS = _ROOT / 'benchmarks' / 'results'
_PROMPT_CHARS = 16
_SAME = {True: 'yes', False: 'NO', None: '-'}


def train_models(workdir: str, backbone_steps: int, heads_steps: int) -> None:
  """gpt_chars then medusa_chars (Medusa-1) into workdir/gpt and workdir/medusa, unless there."""
  gpt_dir, medusa_dir = os.path.join(workdir, 'gpt'), os.path.join(workdir, 'medusa')
  stages = [(gpt_dir, 'gpt_chars.py', backbone_steps, []),
            (medusa_dir, 'medusa_chars.py', heads_steps,
             [f'objective_args.backbone_workdir={gpt_dir}'])]
  for stage_dir, experiment, steps, extra in stages:
    if os.path.exists(os.path.join(stage_dir, 'config.json')):
      continue
    config = config_lib.override(config_lib.load(str(_ROOT / 'experiments' / experiment)), [
        f'train.steps={steps}', f'train.eval_every={steps}', f'train.checkpoint_every={steps}',
        'train.sample_every=0', f'train.log_every={max(1, steps // 10)}', *extra])
    loop.train(*run.prepare(config), stage_dir)


def load_models(workdir: str):
  """(cfg, backbone params, heads params, data) of the trained Medusa run."""
  medusa_run = restore.load(os.path.join(workdir, 'medusa'))
  params = medusa_run.params
  backbone = (medusa_run.state.model_state['backbone']
              if medusa_run.config.objective_args.mode == 'medusa1' else params['backbone'])
  return medusa_run.config.model, backbone, params['heads'], medusa_run.data


def prompts(data, n: int) -> np.ndarray:
  """int32 [n, 16]: evenly spaced windows of the first validation batch's rows."""
  rows = np.asarray(data.eval_batches[0]['tokens'])
  return np.stack([rows[i % len(rows), :_PROMPT_CHARS] for i in range(n)]).astype(np.int32)


def _medusa_runner(fn):
  def run_one(params, heads, prompt_1T, rng):
    tokens, stats = fn(params, heads, prompt_1T, rng=rng)
    return tokens, stats['steps'], stats['advanced_N'].sum()
  return run_one


def methods(cfg, num_new: int, temperature: float) -> dict:
  """name -> (fn(params, heads, prompt_1T, rng) -> (tokens, verification steps, tokens those
  steps advanced), tree or None, acceptance)."""
  decoder = medusa.transformer_decoder(cfg)
  plain = jax.jit(functools.partial(decode.generate, transformer, cfg, num_new=num_new,
                                    temperature=0.0))
  out = {'plain greedy': (lambda p, h, x, rng: (plain(p, x, rng=rng), num_new - 1, num_new - 1),
                          None, 'greedy')}
  trees = {'chain 4 (top-1)': tree_attention.cartesian((1, 1, 1, 1)),
           'cartesian 3x2x1x1': tree_attention.cartesian((3, 2, 1, 1)),
           'Medusa sparse 63': tree_attention.build(tree_attention.MEDUSA_63)}
  for acceptance in ('greedy', 'typical'):
    for name, tree in trees.items():
      if acceptance == 'typical' and name != 'cartesian 3x2x1x1':
        continue
      fn = jax.jit(functools.partial(medusa.medusa_generate, decoder, num_new=num_new, tree=tree,
                                     acceptance=acceptance, temperature=temperature))
      out[f'medusa {acceptance}, {name}'] = (_medusa_runner(fn), tree, acceptance)
  return out


def bench(fns: dict, backbone, heads, prompts_PT, num_new, repeats) -> list[dict]:
  """Times every method of `fns` (name -> (fn, tree, acceptance) as `methods` gives them, the
  first one the plain baseline) on each prompt at batch 1, compiled first, repeats alternating
  between methods."""
  rng = jax.random.key(0)
  run_all = lambda fn: [jax.block_until_ready(fn(backbone, heads, p[None],
                                                 jax.random.fold_in(rng, i)))
                        for i, p in enumerate(prompts_PT)]
  outputs, steps, advanced = {}, {}, {}
  for name, (fn, _, _) in fns.items():      # compile, and record outputs and step counts
    results = run_all(fn)
    outputs[name] = np.concatenate([np.asarray(r[0]) for r in results])
    steps[name] = np.array([int(r[1]) for r in results])
    advanced[name] = np.array([int(r[2]) for r in results])
  seconds = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (fn, _, _) in fns.items():
      start = time.perf_counter()
      run_all(fn)
      seconds[name].append((time.perf_counter() - start) / len(prompts_PT))
  plain = next(iter(fns))
  plain_s = statistics.median(seconds[plain])
  rows = []
  for name, (_, tree, acceptance) in fns.items():
    median_s = statistics.median(seconds[name])
    rows.append({
        'method': name, 'tree_nodes': None if tree is None else tree.size,
        'tokens_per_step': float(advanced[name].sum() / steps[name].sum()),
        'base_forwards_per_prompt': 1 + float(steps[name].mean()),
        'median_s_per_prompt': median_s, 'tokens_per_s': num_new / median_s,
        'speedup_vs_plain': plain_s / median_s,
        'identical_to_plain_greedy': (bool(np.array_equal(outputs[name], outputs[plain]))
                                      if acceptance == 'greedy' else None),
        'seconds_each_repeat': seconds[name]})
  return rows


def markdown(rows: list) -> str:
  lines = ['| method | tree nodes | tokens/step | forwards/prompt | ms/prompt | speedup | '
           '= greedy |', '|---|---:|---:|---:|---:|---:|:---:|']
  for r in rows:
    lines.append(f"| {r['method']} | {r['tree_nodes'] or '-'} | {r['tokens_per_step']:.2f} | "
                 f"{r['base_forwards_per_prompt']:.1f} | {1e3 * r['median_s_per_prompt']:.1f} | "
                 f"{r['speedup_vs_plain']:.2f}x | {_SAME[r['identical_to_plain_greedy']]} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='', help='holds gpt/ and medusa/ runs (trained here '
                                                    'if missing); default: a temporary dir')
  parser.add_argument('--backbone_steps', type=int, default=600)
  parser.add_argument('--heads_steps', type=int, default=400)
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--new', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--temperature', type=float, default=0.7, help='for typical acceptance')
  parser.add_argument('--quick', action='store_true', help='a smoke run (tiny training)')
  args = parser.parse_args()
  if args.quick:
    args.backbone_steps, args.heads_steps, args.prompts, args.repeats = 60, 50, 2, 2
  start_wall = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    train_models(workdir, args.backbone_steps, args.heads_steps)
    train_wall = time.perf_counter() - start_wall
    cfg, backbone, heads, data = load_models(workdir)
    rows = bench(methods(cfg, args.new, args.temperature), backbone, heads,
                 prompts(data, args.prompts), args.new, args.repeats)
  result = {
      'benchmark': 'bench_speculative', 'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': {'jax_devices': [str(d) for d in jax.devices()],
                 'cores': len(os.sched_getaffinity(0))},
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__},
      'model': {k: cfg[k] for k in ('d_model', 'n_layers', 'n_heads', 'd_ff', 'vocab_size',
                                    'max_len', 'attention_backend')},
      'protocol': {'backbone_steps': args.backbone_steps, 'heads_steps': args.heads_steps,
                   'prompts': args.prompts, 'prompt_chars': _PROMPT_CHARS, 'new_tokens': args.new,
                   'batch': 1, 'repeats': args.repeats, 'typical_temperature': args.temperature,
                   'statistic': 'median over repeats of the mean seconds per prompt',
                   'training_wall_seconds': train_wall,
                   'wall_seconds': time.perf_counter() - start_wall},
      'rows': rows,
  }
  _RESULTS.mkdir(parents=True, exist_ok=True)
  out = _RESULTS / ('bench_speculative_quick.json' if args.quick else 'bench_speculative.json')
  out.write_text(json.dumps(result, indent=2) + '\n')
  print(markdown(rows))
  print(f'\nWrote {out}')


if __name__ == '__main__':
  main()
