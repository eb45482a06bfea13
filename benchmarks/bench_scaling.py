"""Step time and per-device memory of one GPT across meshes of simulated CPU devices.

Per-device state memory is read from the arrays' shardings (the bytes of the shards that live
on device 0), so it shows exactly what FSDP and tensor parallelism divide. Step time on
simulated devices measures partitioning overhead, not real interconnects.

  python benchmarks/bench_scaling.py [--devices 8] [--steps 5]
"""
import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument('--devices', type=int, default=8)
parser.add_argument('--steps', type=int, default=5)
parser.add_argument('--out', default='benchmarks/results/bench_scaling.json')
args = parser.parse_args()
os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'

import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lab import config as config_lib  # noqa: E402
from lab import run  # noqa: E402
from lab.nn import param_spec  # noqa: E402
from lab.parallel import mesh as mesh_lib  # noqa: E402
from lab.parallel import rules as rules_lib  # noqa: E402
from lab.train import loop  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = ['model.d_model=256', 'model.n_layers=4', 'model.n_heads=8', 'model.n_kv_heads=8',
         'model.d_ff=1024', 'model.max_len=128', 'data.block_size=128', 'model.vocab_multiple=8',
         'train.batch_size=16']
MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 4, 1, 1), (2, 2, 2, 1), (1, 1, 8, 1), (4, 1, 2, 1)]


def bytes_on_device0(tree) -> int:
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def measure(shape):
  config = config_lib.override(config_lib.load(f'{REPO}/experiments/gpt_chars.py'), MODEL + [
      f'mesh.{a}={n}' for a, n in zip(mesh_lib.AXES, shape)])
  config, task, data = run.prepare(config)
  setup = loop.setup(config, task)
  it = data.make_train_iter()
  with rules_lib.activate(setup.mesh, setup.rules):
    state = setup.init()
    mem = {'params': bytes_on_device0(state.params), 'opt_state': bytes_on_device0(state.opt_state)}
    state, _ = setup.train_step(state, setup.global_batch(next(it)))  # compile
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
      batch = setup.global_batch(next(it))
      t0 = time.perf_counter()
      state, metrics = setup.train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
  return {'mesh': dict(zip(mesh_lib.AXES, shape)), 'step_s': float(np.median(times)),
          'param_bytes_per_device': mem['params'], 'opt_bytes_per_device': mem['opt_state'],
          'n_params': param_spec.count(task.param_specs)}


def main():
  rows = [measure(s) for s in MESHES if np.prod(s) == args.devices]
  base = rows[0]
  for r in rows:
    r['step_time_vs_data_parallel'] = r['step_s'] / base['step_s']
    r['param_memory_vs_data_parallel'] = r['param_bytes_per_device'] / base['param_bytes_per_device']
  out = {'device': f'{args.devices} simulated CPU devices on {platform.processor() or platform.machine()}'
                   f' ({os.cpu_count()} cores)',
         'jax': jax.__version__, 'max_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
         'rows': rows}
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
  print(f"| mesh (data, fsdp, tensor, expert) | params/device (MiB) | Adam state/device (MiB) | "
        f"param memory vs data-parallel | step time (ms) | vs data-parallel |")
  print('| --- | --- | --- | --- | --- | --- |')
  for r in rows:
    m = tuple(r['mesh'].values())
    print(f"| {m} | {r['param_bytes_per_device'] / 2**20:.2f} | {r['opt_bytes_per_device'] / 2**20:.2f} | "
          f"{r['param_memory_vs_data_parallel']:.3f} | {1e3 * r['step_s']:.1f} | "
          f"{r['step_time_vs_data_parallel']:.2f}x |")
  print(f"model: {rows[0]['n_params']:,} parameters; {out['device']}; max host RSS {out['max_rss_mb']:.0f} MiB")


if __name__ == '__main__':
  sys.exit(main())
