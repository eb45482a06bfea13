"""ParamSpec, init, stack, count and shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.nn import param_spec as ps


def specs_example():
  return {
      'embed': ps.ParamSpec((7, 4), ps.normal(1.0), ('vocab', 'embed')),
      'block': {'w': ps.ParamSpec((4, 5), ps.normal(1.0), ('embed', 'mlp')),
                'b': ps.ParamSpec((5,), ps.zeros, ('mlp',)),
                'scale': ps.ParamSpec((4,), ps.ones, ('embed',), jnp.bfloat16)},
  }


@pytest.fixture(scope='module')
def params_example():
  return ps.init(specs_example(), jax.random.key(0))


def test_count_is_the_sum_of_sizes(params_example):
  specs = specs_example()
  assert ps.count(specs) == 7 * 4 + 4 * 5 + 5 + 4
  assert ps.count(specs) == sum(x.size for x in jax.tree.leaves(params_example))
  assert ps.count(ps.stack(specs['block']['w'], 3)) == 3 * 4 * 5


def test_init_shapes_dtypes_and_initializers(params_example):
  specs, params = specs_example(), params_example
  assert jax.tree.structure(params) == jax.tree.structure(ps.shapes(specs))
  for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(ps.shapes(specs))):
    assert (p.shape, p.dtype) == (s.shape, s.dtype)
  assert params['block']['scale'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(params['block']['b'], 0.0)
  np.testing.assert_array_equal(params['block']['scale'], 1.0)


def test_normal_initializer_has_the_requested_std():
  w = ps.init({'w': ps.ParamSpec((200, 200), ps.normal(0.02), (None, None))},
              jax.random.key(3))['w']
  # 40,000 draws: a standard error of 0.35% on the std and 1e-4 on the mean; bounds at 5-6 of them.
  np.testing.assert_allclose(np.std(w), 0.02, rtol=0.02)
  assert abs(np.mean(w)) < 0.02 * 5 / 200


def test_init_is_deterministic_for_a_key(params_example):
  specs = specs_example()
  a = params_example
  b = ps.init(specs, jax.random.key(0))
  c = ps.init(specs, jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a['embed'], c['embed'])
  assert not np.allclose(a['block']['w'], c['block']['w'])


def test_adding_a_parameter_does_not_change_the_others(params_example):
  specs, before = specs_example(), params_example
  specs['block']['v'] = ps.ParamSpec((4, 5), ps.normal(1.0), ('embed', 'mlp'))
  specs['a_first'] = ps.ParamSpec((3,), ps.normal(1.0), (None,))  # first in leaf order
  after = ps.init(specs, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, before['embed'], after['embed'])
  jax.tree.map(np.testing.assert_array_equal, before['block'],
               {k: v for k, v in after['block'].items() if k != 'v'})
  # The same spec at another path (of the same length) is a different draw.
  assert not np.allclose(after['block']['v'], after['block']['w'])


def test_stack_makes_independent_layers():
  spec = ps.ParamSpec((300,), ps.normal(2.0), ('embed',))
  stacked = ps.stack(spec, 4)
  assert stacked.shape == (4, 300) and stacked.axes == ('layers', 'embed')
  assert stacked.dtype == spec.dtype
  w = ps.init({'w': stacked}, jax.random.key(0))['w']
  assert w.shape == (4, 300)
  np.testing.assert_allclose(np.std(w, axis=1), 2.0, rtol=0.15)
  corr = np.corrcoef(np.asarray(w))
  # Independent draws of 300: off-diagonal correlations are ~N(0, 1/300), well below 0.3.
  assert np.abs(corr[~np.eye(4, dtype=bool)]).max() < 0.3


def test_stack_axis_name_and_zeros():
  stacked = ps.stack(ps.ParamSpec((2, 3), ps.zeros, ('a', 'b')), 5, axis_name='stages')
  assert stacked.axes == ('stages', 'a', 'b')
  np.testing.assert_array_equal(ps.init([stacked], jax.random.key(0))[0], np.zeros((5, 2, 3)))


def test_paramspec_with_mismatched_axes_raises():
  with pytest.raises(ValueError, match=r"\(4, 5\).*\('embed',\)"):
    ps.ParamSpec((4, 5), ps.zeros, ('embed',))


def test_init_on_a_mesh_gives_the_same_values_in_the_named_layout(params_example):
  specs = specs_example()
  mesh = jax.make_mesh((1,), ('fsdp',), axis_types=(jax.sharding.AxisType.Auto,))
  rules = [('embed', 'fsdp'), ('vocab', None), ('mlp', None)]
  sharded = ps.init(specs, jax.random.key(0), mesh, rules)
  jax.tree.map(np.testing.assert_array_equal, sharded, params_example)
  assert sharded['block']['w'].sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
