"""Multi-host behaviour on one machine: two jax.distributed processes (CPU collectives) train like
one process with the same global batch, and a checkpoint resumes onto a different mesh."""
import os
import socket
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT, xla_flags_plus
from lab.train import metrics_log

TINY = 'experiments/gpt_chars.py:tiny'
COMMON = ['--config.train.log_every=1', '--config.train.eval_every=0',
          '--config.train.batch_size=8', '--config.train.decay_steps=12',
          '--config.model.vocab_multiple=2']


def _lab_run(workdir, devices: int, *args):
  env = dict(os.environ,
             XLA_FLAGS=xla_flags_plus(f'--xla_force_host_platform_device_count={devices}'))
  return subprocess.Popen([sys.executable, '-m', 'lab.run', '--config', TINY, '--workdir',
                           str(workdir), *COMMON, *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(*procs):
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def _losses(workdir):
  return {r['step']: r['loss'] for r in metrics_log.read(workdir / 'metrics.jsonl')}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  steps = ['--config.train.steps=6', '--config.train.checkpoint_every=6']
  one = _lab_run(tmp_path / 'one', 4, *steps)
  coordinator = f'localhost:{_free_port()}'
  two = [_lab_run(tmp_path / 'two', 2, *steps, '--coordinator', coordinator,
                  '--num_processes=2', f'--process_id={i}') for i in range(2)]
  _finish(one, *two)
  single, multi = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
  assert sorted(multi) == list(range(1, 7))
  # Each process reads its own half of every global batch: the same examples, another order.
  np.testing.assert_allclose([multi[s] for s in sorted(multi)],
                             [single[s] for s in sorted(single)], rtol=1e-5)
  data_dir = tmp_path / 'two' / 'checkpoints' / '6' / 'data'
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(data_dir))


def test_resume_onto_a_different_mesh(tmp_path):
  _finish(_lab_run(tmp_path / 'full', 8, '--config.train.steps=12',
                   '--config.train.checkpoint_every=6'))
  _finish(_lab_run(tmp_path / 'split', 8, '--config.train.steps=6',
                   '--config.train.checkpoint_every=6'))
  _finish(_lab_run(tmp_path / 'split', 8, '--config.train.steps=12',
                   '--config.train.checkpoint_every=6', '--config.mesh.data=2',
                   '--config.mesh.fsdp=2', '--config.mesh.tensor=2'))
  full, split = _losses(tmp_path / 'full'), _losses(tmp_path / 'split')
  assert sorted(split) == list(range(1, 13))
  np.testing.assert_allclose([split[s] for s in range(1, 13)], [full[s] for s in range(1, 13)],
                             rtol=1e-5)
