"""Runs a few GPT train steps on several meshes of 8 simulated CPU devices and prints, as JSON,
each mesh's losses, final gradients and whether every parameter's sharding is what the rules say.

Run as a script (it sets XLA_FLAGS before importing jax): python mesh_runs.py 'd,f,t,e' ...
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lab import config as config_lib  # noqa: E402
from lab import run  # noqa: E402
from lab.nn import param_spec  # noqa: E402
from lab.parallel import mesh as mesh_lib  # noqa: E402
from lab.parallel import rules as rules_lib  # noqa: E402
from lab.train import loop  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL = ['model.d_model=32', 'model.n_heads=8', 'model.n_kv_heads=8', 'model.d_ff=64',
         'model.vocab_multiple=8', 'model.norm=rmsnorm', 'model.mlp=swiglu',
         'model.positions=rope', 'model.tie_embeddings=False', 'model.bias=False',
         'train.batch_size=8', 'train.warmup_steps=0']


def run_mesh(shape, extra):
  config = config_lib.load(f'{REPO}/experiments/gpt_chars.py:tiny')
  config = config_lib.override(config, MODEL + extra + [
      f'mesh.{a}={n}' for a, n in zip(mesh_lib.AXES, shape)])
  config, task, data = run.prepare(config)
  devices = jax.devices()[:int(np.prod(shape))]
  setup = loop.setup(config, task, mesh_lib.make_mesh(config.mesh, devices=devices))
  it = data.make_train_iter()
  losses = []
  with rules_lib.activate(setup.mesh, setup.rules):
    state = setup.init()
    for _ in range(3):
      batch = setup.global_batch(next(it))
      state, metrics = setup.train_step(state, batch)
      losses.append(float(metrics['loss']))
    loss_of = lambda p: task.loss_fn(p, state.model_state, batch, None, False)[0]
    grads = jax.jit(jax.grad(loss_of))(state.params)
  wrong = []
  for path, spec in jax.tree_util.tree_leaves_with_path(task.param_specs,
                                                        is_leaf=param_spec.is_spec):
    leaf = state.params
    for key in path:
      leaf = leaf[key.key]
    want = rules_lib.spec(spec.axes, setup.rules)
    if leaf.sharding.spec != want or leaf.sharding.mesh.shape != setup.mesh.shape:
      wrong.append(f'{jax.tree_util.keystr(path)}: {leaf.sharding.spec} != {want}')
  flat = [np.asarray(g).ravel().tolist() for g in jax.tree.leaves(grads)]
  return {'losses': losses, 'grads': flat, 'wrong_shardings': wrong}


if __name__ == '__main__':
  extra = [a for a in sys.argv[1:] if '=' in a]
  shapes = [tuple(int(n) for n in a.split(',')) for a in sys.argv[1:] if '=' not in a]
  print(json.dumps({','.join(map(str, s)): run_mesh(s, extra) for s in shapes}))
