"""Receptive fields: the analytic recurrences against a NumPy backward propagation of index sets,
and the gradient-measured field of an actual conv stack against the same propagation."""
import numpy as np
import pytest

from lab.nn import receptive_field as rf
from lab.nn.receptive_field import Layer

POOL_3_2 = Layer(3, 2, 1)  # max pool 3x3 / 2: as a field, a layer like any other
RESNET18 = ([Layer(7, 2, 3), POOL_3_2] + [Layer(3, 1, 1)] * 4 +
            [layer for _ in range(3) for layer in [Layer(3, 2, 1)] + [Layer(3, 1, 1)] * 3])
VGG16 = [layer for convs in (2, 2, 3, 3, 3)
         for layer in [Layer(3, 1, 1)] * convs + [Layer(2, 2)]]  # Layer(2, 2): max pool 2x2 / 2
STACKS = {  # name: (layers, input size)
    'plain': ([Layer(3), Layer(3, padding=1), Layer(5, padding=2)], 16),
    'strided': ([Layer(3, 2, 1), Layer(3, 2, 1), Layer(3, 1, 1)], 24),
    'dilated': ([Layer(3, 1, 1), Layer(3, 1, 2, 2), Layer(3, 1, 4, 4)], 24),
    'dilated_holes': ([Layer(3, 1, 0, 2), Layer(3, 1, 2, 2)], 16),
    'pooled': ([Layer(3, 1, 1), Layer(2, 2), Layer(3, 1, 1), Layer(3, 2, 1, 2)], 24),  # 2 pools
    'kernel_below_stride': ([Layer(1, 2), Layer(3, 1, 1), Layer(2, 3)], 30),
    'resnet18': (RESNET18, 448),
}


def np_support(layers, size, index, clip=True):
  """Indices of the 1-D input that output `index` reads: S_{l-1} = {s i - p + d t : i in S_l,
  0 <= t < k}, kept inside the layer's input when `clip` (padding is not an input pixel)."""
  sizes = [size]
  for l in layers:
    sizes.append((sizes[-1] + 2 * l.padding - l.dilation * (l.kernel - 1) - 1) // l.stride + 1)
  support = {index}
  for l, n_in in zip(reversed(layers), reversed(sizes[:-1])):
    support = {l.stride * i - l.padding + l.dilation * t for i in support for t in range(l.kernel)}
    if clip:
      support = {i for i in support if 0 <= i < n_in}
  return support


def random_stack(rng):
  return [Layer(*(int(rng.integers(lo, hi)) for lo, hi in ((1, 6), (1, 4), (0, 3), (1, 4))))
          for _ in range(rng.integers(1, 6))]


@pytest.mark.parametrize('seed', range(6))
def test_analytic_field_matches_unclipped_propagation(seed):
  rng = np.random.default_rng(seed)
  for _ in range(20):
    layers = random_stack(rng)
    field = rf.receptive_field(layers)
    for index in (0, 1, 5):
      support = np_support(layers, 10 ** 6, index, clip=False)
      assert rf.field_interval(field, index) == (min(support), max(support))
    assert field.jump == min(np_support(layers, 10 ** 6, 1, clip=False)) - min(
        np_support(layers, 10 ** 6, 0, clip=False))


def test_published_fields():
  """ResNet-18's well-known 435-pixel field at stride 32 (centred on pixel 0: 'same' paddings);
  VGG-16 up to pool5: 212 pixels, jump 32, effective padding 90 (Araujo et al. 2019's table)."""
  assert rf.receptive_field(RESNET18) == (435, 32, 0.0)
  field = rf.receptive_field(VGG16)
  assert field == (212, 32, -90 + (212 - 1) / 2)
  assert rf.field_interval(field, 0)[0] == -90


@pytest.mark.parametrize('name', list(STACKS))
def test_measured_field_matches_propagation_and_analytic(name):
  layers, size = STACKS[name]
  n_out = rf.output_size(layers, size)
  field = rf.receptive_field(layers)
  holes = any(l.dilation > 1 or l.kernel < l.stride for l in layers)
  for index in sorted({0, n_out // 2, n_out - 1}):
    mask_XY = rf.measured_field(layers, size, (index, n_out - 1 - index))
    rows, cols = (sorted(np_support(layers, size, i)) for i in (index, n_out - 1 - index))
    want_XY = np.zeros((size, size), bool)
    want_XY[np.ix_(rows, cols)] = True
    np.testing.assert_array_equal(mask_XY, want_XY)
    lo, hi = rf.field_interval(field, index)
    seen = np.flatnonzero(mask_XY.any(1))
    assert lo <= seen.min() and seen.max() <= hi
    if not holes:  # these stacks are 'same'-padded: the field is the interval cut by the image
      np.testing.assert_array_equal(seen, np.arange(max(lo, 0), min(hi, size - 1) + 1))


def test_resnet18_interior_unit_sees_its_whole_field():
  mask_XY = rf.measured_field(RESNET18, 448, (7, 7))
  lo, hi = rf.field_interval(rf.receptive_field(RESNET18), 7)
  assert (lo, hi) == (7, 441) and mask_XY.sum() == 435 ** 2
  assert mask_XY[7:442, 7:442].all()


@pytest.mark.parametrize('seed', range(3))
def test_measured_random_stacks(seed):
  rng = np.random.default_rng(100 + seed)
  layers = random_stack(rng)
  while rf.output_size(layers, 20) < 2:
    layers = random_stack(rng)
  index = int(rng.integers(0, rf.output_size(layers, 20)))
  support = sorted(np_support(layers, 20, index))
  want_XY = np.zeros((20, 20), bool)
  want_XY[np.ix_(support, support)] = True
  np.testing.assert_array_equal(rf.measured_field(layers, 20, (index, index)), want_XY)


def test_bad_input():
  with pytest.raises(ValueError, match=r'index=\(4, 0\) with a 8-pixel input'):
    rf.measured_field([Layer(3, 2, 1)], 8, (4, 0))
  with pytest.raises(ValueError, match='layers\\[1\\]'):
    rf.receptive_field([Layer(3), Layer(3, stride=0)])
