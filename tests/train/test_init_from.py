"""Starting from another run: the specs' initialisers return that run's (EMA) parameters, a
run of a different network is a one-line ConfigError, and shapes are checked."""
import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab import run
from lab.config import ConfigError
from lab.nn import param_spec as ps
from lab.train import init_from, loop

TOY = str(REPO_ROOT / 'experiments/diffusion_toy.py') + ':method=flow,tiny'


def test_diffusion_run_starts_from_a_finished_run(tmp_path):
  first = loop.train(*run.prepare(config_lib.load(TOY)), str(tmp_path / 'first'))
  trained = first.ema_params if first.ema_params is not None else first.params
  config = config_lib.override(config_lib.load(TOY),
                               [f'objective_args.init_workdir={tmp_path / "first"}'])
  _, task, _ = run.prepare(config)
  started = ps.init(task.param_specs, jax.random.key(123))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(started), jax.device_get(trained))
  fresh = ps.init(run.prepare(config_lib.load(TOY))[1].param_specs, jax.random.key(123))
  assert not np.allclose(jax.tree.leaves(fresh)[0], jax.tree.leaves(started)[0])

  other = config_lib.load(TOY)
  other.model.update({k: 2 * v for k, v in other.model.items()
                      if k in ('hidden', 'width', 'd_model') and isinstance(v, int)})
  other = config_lib.override(other, [f'objective_args.init_workdir={tmp_path / "first"}'])
  with pytest.raises(ConfigError, match='holds a different model'):
    run.prepare(other)


def test_constant_specs_checks_shapes():
  specs = {'w': ps.ParamSpec((2, 3), ps.zeros, (None, None))}
  with pytest.raises(ValueError, match=r"\['w'\] has shape \(3, 2\)"):
    init_from.constant_specs(specs, {'w': np.zeros((3, 2))})
