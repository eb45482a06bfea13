"""DeepSeek-V3 MTP self-speculation against plain greedy decoding on the tiny trained model.

  .venv/bin/python benchmarks/bench_mtp_speculative.py [--workdir DIR] [--quick]

1. The model: DIR (experiments/deepseek_tiny.py, --steps steps, model.mtp_depth=--mtp_depth) is
   trained here unless DIR already holds the run (then it is restored with lab.train.restore).
2. Prompts: --prompts windows of 16 characters from the validation text; each row decodes --new
   tokens at batch size 1.
3. Plain greedy decoding (lab.models.deepseek.generate over the MLA cache) and
   lab.sampling.mtp_draft.generate with the chain of the MTP modules' drafts, greedy (its output
   must equal plain decoding's) and typical acceptance; timing as benchmarks/bench_speculative.py
   (whose `bench` runs it): compiled first, repeats alternating between methods.
Reported per method: mean tokens per verification step, main-model forwards, median seconds per
prompt and the speedup over plain decoding timed in the same run. Writes
benchmarks/results/bench_mtp_speculative.json (_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import jaxlib

from bench_speculative import bench, markdown, prompts
from lab import config as config_lib
from lab import run
from lab.models import deepseek
from lab.sampling import mtp_draft, tree_attention
from lab.train import loop, restore

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_RESULTS = _ROOT / 'benchmarks' / 'results'


def train_model(workdir: str, steps: int, mtp_depth: int) -> None:
  if os.path.exists(os.path.join(workdir, 'config.json')):
    return
  config = config_lib.override(config_lib.load(str(_ROOT / 'experiments' / 'deepseek_tiny.py')), [
      f'train.steps={steps}', f'train.eval_every={steps}', f'train.checkpoint_every={steps}',
      'train.sample_every=0', f'train.log_every={max(1, steps // 10)}',
      f'train.warmup_steps={min(50, steps // 5)}',
      f'model.mtp_depth={mtp_depth}'])
  loop.train(*run.prepare(config), workdir)


def methods(cfg, num_new: int, temperature: float) -> dict:
  """name -> (fn(params, bias, prompt_1T, rng) -> (tokens, steps, advanced), tree, acceptance)."""
  plain = jax.jit(functools.partial(deepseek.generate, cfg, num_new=num_new, temperature=0.0))
  out = {'plain greedy': (lambda p, b, x, rng: (plain(p, b, x, rng=rng), num_new - 1,
                                                 num_new - 1), None, 'greedy')}
  chain = tree_attention.cartesian((1,) * cfg.mtp_depth)
  for acceptance in ('greedy', 'typical'):
    fn = jax.jit(functools.partial(mtp_draft.generate, cfg, num_new=num_new, tree=chain,
                                   acceptance=acceptance, temperature=temperature))

    def run_one(params, bias, prompt_1T, rng, fn=fn):
      tokens, stats = fn(params, bias, prompt_1T, rng=rng)
      return tokens, stats['steps'], stats['advanced_N'].sum()

    out[f'MTP {acceptance}, chain {cfg.mtp_depth}'] = (run_one, chain, acceptance)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='', help='the deepseek_tiny run (trained here if '
                                                    'missing); default: a temporary dir')
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--mtp_depth', type=int, default=1, help='V3 uses 1')
  parser.add_argument('--prompts', type=int, default=8)
  parser.add_argument('--new', type=int, default=40)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--temperature', type=float, default=0.7, help='for typical acceptance')
  parser.add_argument('--quick', action='store_true', help='a smoke run (tiny training)')
  args = parser.parse_args()
  if args.quick:
    args.steps, args.prompts, args.repeats = 30, 2, 2
  start_wall = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    train_model(workdir, args.steps, args.mtp_depth)
    train_wall = time.perf_counter() - start_wall
    trained = restore.load(workdir)
    cfg = trained.config.model
    rows = bench(methods(cfg, args.new, args.temperature), trained.params,
                 trained.state.model_state['bias'], prompts(trained.data, args.prompts),
                 args.new, args.repeats)
  result = {
      'benchmark': 'bench_mtp_speculative', 'quick': args.quick,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'device': {'jax_devices': [str(d) for d in jax.devices()],
                 'cores': len(os.sched_getaffinity(0))},
      'versions': {'python': platform.python_version(), 'jax': jax.__version__,
                   'jaxlib': jaxlib.__version__},
      'model': {k: cfg[k] for k in ('d_model', 'n_layers', 'n_heads', 'kv_lora_rank',
                                    'n_routed_experts', 'top_k', 'mtp_depth', 'vocab_size',
                                    'max_len', 'attention_backend')},
      'protocol': {'train_steps': trained.step, 'prompts': args.prompts, 'new_tokens': args.new,
                   'batch': 1, 'repeats': args.repeats, 'typical_temperature': args.temperature,
                   'statistic': 'median over repeats of the mean seconds per prompt',
                   'training_wall_seconds': train_wall,
                   'wall_seconds': time.perf_counter() - start_wall},
      'rows': rows,
  }
  _RESULTS.mkdir(parents=True, exist_ok=True)
  name = 'bench_mtp_speculative_quick.json' if args.quick else 'bench_mtp_speculative.json'
  (_RESULTS / name).write_text(json.dumps(result, indent=2) + '\n')
  print(markdown(rows))
  print(f'\nWrote {_RESULTS / name}')


if __name__ == '__main__':
  main()
