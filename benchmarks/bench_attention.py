"""Flash-attention speed on a GPU: lab's Pallas kernels against cuDNN, XLA and JAX's own kernels.

  .venv/bin/python benchmarks/bench_attention.py [--quick]

On a GPU, for head dims 64 and 128, sequence lengths 1k-16k, causal and not, bfloat16, with
B T = 16384 tokens and N H = 2048 (the FlashAttention-2 paper's setting), one run times:
  lab_pallas  lab.kernels.flash_attention(backend='pallas_gpu'): our Triton-lowered kernels
  cudnn       jax.nn.dot_product_attention(implementation='cudnn'): the baseline of the ratios
  xla         jax.nn.dot_product_attention(implementation='xla')
  lab_xla     lab.kernels.flash_attention(backend='xla')
  jax_mha     jax.experimental.pallas.ops.gpu.attention.mha, JAX's Pallas (Triton) example
  jax_mgpu    jax.experimental.pallas.ops.gpu.attention_mgpu, JAX's Mosaic GPU example for
              Hopper (forward only; only where it runs)
Forward FLOPs are 4 B N T S H (two matmuls), halved when causal; forward+backward counts the
forward and a backward of 2.5 times it (five matmuls). Each time is the median of repeated
jitted calls after a warm-up. MFU is taken against a bf16 8192^3 matmul timed in the same run.
lab_pallas's output and gradients are compared with cuDNN's in every configuration.
Writes benchmarks/results/bench_attention.json (bench_attention_quick.json with --quick) and
prints a Markdown table.

Without a GPU it only runs a correctness smoke test (the interpret backend against the reference
on tiny shapes, no timings), says so, and writes bench_attention_smoke.json.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from lab.kernels import flash_attention

_RESULTS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
_TOKENS, _WIDTH = 16384, 2048


def _lab(backend):
  return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, backend=backend)


def _jax_nn(implementation):
  return lambda q, k, v, causal: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation=implementation)


def _jax_mha(q, k, v, causal):
  from jax.experimental.pallas.ops.gpu import attention
  return attention.mha(q, k, v, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=causal)


def _jax_mgpu(q, k, v, causal):
  from jax.experimental.pallas.ops.gpu import attention_mgpu
  config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                       causal=causal)
  return attention_mgpu.attention(q, k, v, config)


IMPLS = {'lab_pallas': _lab('pallas_gpu'), 'cudnn': _jax_nn('cudnn'), 'xla': _jax_nn('xla'),
         'lab_xla': _lab('xla'), 'jax_mha': _jax_mha, 'jax_mgpu': _jax_mgpu}
FORWARD_ONLY = {'jax_mgpu'}


def median_seconds(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  return 2 * n**3 / median_seconds(jax.jit(jnp.matmul), a, a, reps=reps) / 1e12


def attention_flops(B, T, N, H, causal: bool) -> float:
  return 4 * B * N * T * T * H / (2 if causal else 1)


def fwd_and_fwd_bwd(impl):
  """Jitted forward(q, k, v) and forward+backward(q, k, v, do) -> (dq, dk, dv) of an impl."""
  def fwd_bwd(q, k, v, do, causal):
    _, vjp = jax.vjp(lambda q, k, v: impl(q, k, v, causal), q, k, v)
    return vjp(do)
  return (jax.jit(impl, static_argnames='causal'), jax.jit(fwd_bwd, static_argnames='causal'))


def inputs(B, T, N, H, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  return [jax.random.normal(key, (B, T, N, H), jnp.bfloat16) for key in keys]


def max_errors(lab_outs, cudnn_outs) -> dict:
  return {name: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
          for name, a, b in zip(('o', 'dq', 'dk', 'dv'), lab_outs, cudnn_outs)}


def time_config(H: int, T: int, causal: bool, impls, reps: int, peak: float) -> list[dict]:
  B, N = _TOKENS // T, _WIDTH // H
  q, k, v, do = inputs(B, T, N, H)
  flops = attention_flops(B, T, N, H, causal)
  rows, outputs = [], {}
  for name in impls:
    fwd, fwd_bwd = fwd_and_fwd_bwd(IMPLS[name])
    row = dict(impl=name, head_dim=H, seq=T, batch=B, heads=N, causal=causal)
    try:
      row['fwd_ms'] = 1e3 * median_seconds(functools.partial(fwd, causal=causal), q, k, v,
                                           reps=reps)
      if name not in FORWARD_ONLY:
        row['fwd_bwd_ms'] = 1e3 * median_seconds(functools.partial(fwd_bwd, causal=causal),
                                                 q, k, v, do, reps=reps)
      if name in ('lab_pallas', 'cudnn'):
        outputs[name] = (fwd(q, k, v, causal=causal), *fwd_bwd(q, k, v, do, causal=causal))
    except Exception as e:  # an impl that cannot run this config (memory, hardware) is recorded
      row['error'] = f'{type(e).__name__}: {str(e).split(chr(10))[0][:200]}'
    for key, factor in (('fwd', 1.0), ('fwd_bwd', 3.5)):
      if f'{key}_ms' in row:
        row[f'{key}_tflops'] = factor * flops / (row[f'{key}_ms'] / 1e3) / 1e12
        row[f'{key}_mfu'] = row[f'{key}_tflops'] / peak
    rows.append(row)
    print(json.dumps(row), flush=True)
  if len(outputs) == 2:
    lab_row = next(r for r in rows if r['impl'] == 'lab_pallas')
    lab_row['max_abs_err_vs_cudnn'] = max_errors(outputs['lab_pallas'], outputs['cudnn'])
  return rows


def markdown(rows: list[dict], device: str, peak: float) -> str:
  """One line per configuration: TFLOP/s of each impl (fwd / fwd+bwd), and lab / cuDNN."""
  impls = list(dict.fromkeys(r['impl'] for r in rows))
  by_config = {}
  for r in rows:
    by_config.setdefault((r['head_dim'], r['seq'], r['causal']), {})[r['impl']] = r
  fmt = lambda r, key: f"{r[key]:.0f}" if key in r else '-'
  lines = [f'{device}, bf16, B T = {_TOKENS} tokens, N H = {_WIDTH}; TFLOP/s forward / '
           f'forward+backward; bf16 matmul peak {peak:.0f} TFLOP/s', '',
           '| hd | seq | causal | ' + ' | '.join(impls) + ' | lab / cuDNN |',
           '|---' * (len(impls) + 4) + '|']
  for (H, T, causal), got in by_config.items():
    cells = [f"{fmt(got[i], 'fwd_tflops')} / {fmt(got[i], 'fwd_bwd_tflops')}" if i in got
             else '-' for i in impls]
    lab, cudnn = got.get('lab_pallas', {}), got.get('cudnn', {})
    ratio = ' / '.join(f"{lab[k] / cudnn[k]:.2f}" if k in lab and k in cudnn else '-'
                       for k in ('fwd_tflops', 'fwd_bwd_tflops'))
    lines.append(f"| {H} | {T} | {'yes' if causal else 'no'} | " + ' | '.join(cells)
                 + f' | {ratio} |')
  return '\n'.join(lines)


def smoke() -> dict:
  """Interpret backend vs reference, forward and gradients, on tiny shapes (no timings)."""
  checks = []
  rng = np.random.default_rng(0)
  for T, S, causal, dtype, tol in [(40, 40, True, jnp.float32, 1e-5), (17, 50, True,
                                   jnp.bfloat16, 5e-2), (33, 33, False, jnp.float16, 1e-2)]:
    q, k, v, do = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in
                   ((2, T, 4, 64), (2, S, 2, 64), (2, S, 2, 64), (2, T, 4, 64)))

    def run(backend):
      f = lambda q, k, v: flash_attention(q, k, v, causal=causal, backend=backend)
      o, vjp = jax.vjp(f, q, k, v)
      return (o, *vjp(do))

    got, want = jax.jit(lambda: run('interpret'))(), jax.jit(lambda: run('reference'))()
    errors = max_errors(got, want)
    checks.append(dict(T=T, S=S, causal=causal, dtype=jnp.dtype(dtype).name,
                       max_abs_err=errors, ok=max(errors.values()) <= tol))
    print(json.dumps(checks[-1]), flush=True)
  return dict(mode='cpu smoke test: correctness of the interpret backend only, no timings',
              checks=checks)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='hd 128, seq 1k and 4k only')
  parser.add_argument('--reps', type=int, default=10)
  args = parser.parse_args(argv)
  _RESULTS.mkdir(parents=True, exist_ok=True)
  meta = dict(date=datetime.datetime.now().isoformat(timespec='seconds'), jax=jax.__version__,
              jaxlib=jaxlib.__version__, device=jax.devices()[0].device_kind)
  if jax.default_backend() != 'gpu':
    print(f'No GPU ({jax.default_backend()}): running the correctness smoke test only.')
    report = dict(meta, **smoke())
    (_RESULTS / 'bench_attention_smoke.json').write_text(json.dumps(report, indent=2))
    if not all(c['ok'] for c in report['checks']):
      raise SystemExit('interpret backend disagrees with the reference')
    return report
  peak = matmul_peak_tflops()
  dims, seqs = ((128,), (1024, 4096)) if args.quick else ((64, 128), (1024, 2048, 4096, 8192,
                                                                      16384))
  rows = [row for H in dims for T in seqs for causal in (False, True)
          for row in time_config(H, T, causal, IMPLS, args.reps, peak)]
  table = markdown(rows, meta['device'], peak)
  print(table)
  report = dict(meta, matmul_peak_tflops=peak, results=rows, table=table)
  name = 'bench_attention_quick.json' if args.quick else 'bench_attention.json'
  (_RESULTS / name).write_text(json.dumps(report, indent=2))
  return report


if __name__ == '__main__':
  main()
