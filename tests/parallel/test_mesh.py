"""Mesh shapes from config and the divisibility check: clear errors naming both numbers."""
import jax
import pytest

from lab.config import ConfigError
from lab.parallel import mesh as mesh_lib
from lab.parallel import rules as rules_lib


def test_minus_one_takes_the_remaining_devices():
  ici, dcn = mesh_lib.mesh_shape({'data': -1, 'tensor': 2}, 8)
  assert ici == (4, 1, 2, 1, 1) and dcn == (1, 1, 1, 1, 1)
  ici, dcn = mesh_lib.mesh_shape({'data': 2, 'fsdp': -1}, 16, {'data': 2})
  assert ici == (2, 4, 1, 1, 1) and dcn == (2, 1, 1, 1, 1)


@pytest.mark.parametrize('mesh, n, words', [
    ({'data': 3}, 8, ['has 3 devices', 'there are 8']),
    ({'data': -1, 'tensor': 3}, 8, ['(3 devices)', 'the 8 devices']),
    ({'data': -1, 'fsdp': -1}, 8, ['at most one axis may be -1']),
    ({'model': 2}, 8, ["unknown axes ['model']"]),
    ({'data': 0}, 8, ['positive or -1']),
])
def test_bad_meshes(mesh, n, words):
  with pytest.raises(ConfigError) as e:
    mesh_lib.mesh_shape(mesh, n)
  for w in words:
    assert w in str(e.value)


def test_make_mesh_has_auto_axes_in_order():
  mesh = mesh_lib.make_mesh({'data': -1})
  assert mesh.axis_names == mesh_lib.AXES
  assert mesh.shape['data'] == jax.device_count()
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


def test_indivisible_dim_names_both_numbers():
  mesh = jax.sharding.AbstractMesh((2, 2, 4, 1, 1), mesh_lib.AXES)
  rules = rules_lib.DEFAULT_RULES
  rules_lib.check_divisible('w', (12, 4), ('vocab', 'embed'), mesh, rules)
  with pytest.raises(ConfigError, match=r"w: dim 'vocab' of size 7 .*\('tensor',\) of total size 4"):
    rules_lib.check_divisible('w', (7, 4), ('vocab', 'embed'), mesh, rules)
  with pytest.raises(ConfigError, match=r"dim 'batch' of size 6 .* of total size 4"):
    rules_lib.check_divisible('x', (6,), ('batch',), mesh, rules)


def test_rules_override_replaces_entries():
  rules = dict(rules_lib.make_rules({'embed': None, 'mlp': ['tensor', 'fsdp']}))
  assert rules['embed'] is None and rules['mlp'] == ('tensor', 'fsdp')
  assert rules['heads'] == 'tensor'
