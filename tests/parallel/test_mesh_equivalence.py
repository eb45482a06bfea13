"""Sharding never changes the numbers: the GPT's losses and gradients after a few steps are the
same on every mesh of 8 simulated devices as on one device, and each parameter is sharded as
the rules table says."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name('mesh_runs.py')
DATA_FSDP_TENSOR = ['1,8,1,1', '2,2,2,1', '1,1,8,1']
WITH_SEQ = ['2,1,1,1,4', '1,2,2,1,2']


def _run(*args):
  out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('meshes', [DATA_FSDP_TENSOR, WITH_SEQ], ids=['dp_fsdp_tp', 'seq'])
def test_dense_gpt_is_mesh_invariant(meshes):
  results = _run('1,1,1,1', *meshes)
  base = results.pop('1,1,1,1')
  assert base['losses'][-1] < base['losses'][0]
  for mesh, r in results.items():
    assert r['wrong_shardings'] == [], mesh
    np.testing.assert_allclose(r['losses'], base['losses'], rtol=2e-6, err_msg=mesh)
    for g, g0 in zip(r['grads'], base['grads']):
      np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6, err_msg=mesh)


def test_moe_gpt_is_mesh_invariant():
  """Expert parallelism (all_to_all over 'expert') on (2,2,1,2): with a capacity that cannot
  drop (factor E / top_k), the numbers equal the single-device model's."""
  moe = ['model.moe_experts=8', 'model.moe_top_k=2', 'model.moe_capacity_factor=4.0']
  results = _run('1,1,1,1', '2,2,1,2', '1,1,1,8', *moe)
  base = results.pop('1,1,1,1')
  for mesh, r in results.items():
    assert r['wrong_shardings'] == [], mesh
    np.testing.assert_allclose(r['losses'], base['losses'], rtol=2e-6, err_msg=mesh)
    for g, g0 in zip(r['grads'], base['grads']):
      np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6, err_msg=mesh)
