"""Runs a test on 8 simulated CPU devices, in a fresh Python process when this one has fewer.

XLA fixes the device count when jax first initialises its backend, and a pytest(-xdist) worker
has usually done that with one device already. A test decorated with `on_8_devices` runs its body
directly when jax.device_count() >= 8 (e.g. under XLA_FLAGS set by the caller); otherwise it
re-runs itself in `python -c` with XLA_FLAGS=--xla_force_host_platform_device_count=8, loading
the test file by path and calling the same function there.
"""
import functools
import inspect
import os
import subprocess
import sys

import jax
import pytest

from conftest import xla_flags_plus

N_DEVICES = 8
_CHILD = 'LAB_MULTIDEVICE_CHILD'
_CHILD_CODE = '''
import runpy, sys
sys.path[:0] = [{test_dir!r}, {tests_root!r}]
runpy.run_path({test_file!r})[{name!r}]()
'''


def on_8_devices(test):
  """Decorator for a test without arguments: its body always sees at least 8 jax devices."""
  @functools.wraps(test)
  def wrapper():
    if jax.device_count() >= N_DEVICES:
      return test()
    if os.environ.get(_CHILD):
      raise RuntimeError(f'XLA_FLAGS={os.environ.get("XLA_FLAGS")!r} gave {jax.device_count()} '
                         f'devices; expected {N_DEVICES}')
    test_file = inspect.getsourcefile(test)
    env = dict(os.environ, JAX_PLATFORMS='cpu', **{_CHILD: '1'},
               XLA_FLAGS=xla_flags_plus(f'--xla_force_host_platform_device_count={N_DEVICES}'))
    code = _CHILD_CODE.format(test_dir=os.path.dirname(test_file), test_file=test_file,
                              tests_root=os.path.dirname(os.path.abspath(__file__)),
                              name=test.__name__)
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
      pytest.fail(f'{test.__name__} on {N_DEVICES} devices failed:\n{out.stdout[-3000:]}\n'
                  f'{out.stderr[-6000:]}', pytrace=False)
  return wrapper
