"""A killed run resumes bit-exactly; SIGTERM saves at the next step boundary and exits 0."""
import os
import signal
import subprocess
import sys
import time

from conftest import REPO_ROOT
from lab.train import metrics_log

TINY = 'experiments/gpt_chars.py:tiny'


def _start(workdir, *overrides):
  cmd = [sys.executable, '-m', 'lab.run', '--config', TINY, '--workdir', str(workdir),
         '--config.train.log_every=1', '--config.train.eval_every=0', *overrides]
  return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'run ended early:\n{proc.stdout.read()}'
    assert time.time() < deadline, 'timed out waiting for the run'
    time.sleep(0.01)


def _checkpoints(workdir):
  d = workdir / 'checkpoints'
  return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if d.exists() else []


def test_resume_after_kill_is_bit_exact(tmp_path):
  steps = ['--config.train.steps=30', '--config.train.checkpoint_every=10']
  full = _start(tmp_path / 'full', *steps)
  killed = _start(tmp_path / 'killed', *steps)
  _wait_for(lambda: _checkpoints(tmp_path / 'killed'), killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  resumed_from = max(_checkpoints(tmp_path / 'killed'))
  assert resumed_from < 30
  resumed = _start(tmp_path / 'killed', *steps)
  assert resumed.wait() == 0, resumed.stdout.read()
  assert full.wait() == 0, full.stdout.read()
  expected = metrics_log.read(tmp_path / 'full' / 'metrics.jsonl')
  got = metrics_log.read(tmp_path / 'killed' / 'metrics.jsonl')
  assert [r['step'] for r in got] == list(range(1, 31))
  assert got == expected  # every metric of every step, exactly


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  run = _start(tmp_path, '--config.train.steps=500', '--config.train.checkpoint_every=1000')
  _wait_for(lambda: len(metrics_log.read(tmp_path / 'metrics.jsonl')) >= 3, run)
  run.send_signal(signal.SIGTERM)
  out, _ = run.communicate(timeout=120)
  assert run.returncode == 0, out
  last_logged = metrics_log.read(tmp_path / 'metrics.jsonl')[-1]['step']
  assert 'SIGTERM' in out
  assert _checkpoints(tmp_path) == [last_logged] and last_logged < 500
