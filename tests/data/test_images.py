"""Image datasets: digits and MNIST arrays in [-1, 1], padding/resizing, and grain batches that
resume exactly."""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from lab.config import ConfigError
from lab.data import images


def test_digits_split_is_a_partition_of_sklearn_digits():
  from sklearn.datasets import load_digits
  full = load_digits()
  train_x, train_y = images.load_arrays('digits', 'train')
  test_x, test_y = images.load_arrays('digits', 'test')
  assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
  assert train_x.dtype == np.float32 and train_y.dtype == np.int32
  assert train_x.min() == -1 and train_x.max() == 1
  levels = (train_x + 1) * 8  # the 17 grey levels 0..16
  np.testing.assert_array_equal(levels, np.round(levels))
  np.testing.assert_array_equal(np.bincount(train_y) + np.bincount(test_y),
                                np.bincount(full.target))
  assert np.bincount(test_y).min() >= 15  # every class is in the test split
  # Train + test rows are exactly sklearn's rows (as a multiset): a partition, no row used twice.
  ours = np.concatenate([np.concatenate([train_x, test_x]).reshape(1797, 64),
                         np.concatenate([train_y, test_y])[:, None]], 1)
  theirs = np.concatenate([full.images.reshape(1797, 64) / 8 - 1, full.target[:, None]], 1)
  np.testing.assert_array_equal(np.unique(ours, axis=0, return_counts=True)[1],
                                np.unique(theirs, axis=0, return_counts=True)[1])
  np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))


def test_mnist_test_split_from_shared_tfds(tfds_dir):
  x, y = images.load_arrays('mnist', 'test', tfds_dir)
  assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
  assert x.min() == -1 and x.max() == 1
  np.testing.assert_array_equal(np.bincount(y), [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                                 974, 1009])  # tfds/README.md
  padded, _ = images.load_arrays('mnist', 'test', tfds_dir, image_size=32)
  assert padded.shape == (10000, 32, 32, 1)
  np.testing.assert_array_equal(padded[:, 2:30, 2:30], x)
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(padded[:, border] == -1)


def test_resize_matches_pillow_bilinear():
  x, _ = images.load_arrays('digits', 'test')
  small, _ = images.load_arrays('digits', 'test', image_size=5)
  assert small.shape == (297, 5, 5, 1)
  want = np.stack([np.asarray(Image.fromarray(img[..., 0], mode='F').resize((5, 5),
                                                                            Image.BILINEAR))
                   for img in x[:20]])
  np.testing.assert_allclose(small[:20, ..., 0], np.clip(want, -1, 1), atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [({'source': 'cifar'}, 'cifar'),
                                          ({'split': 'validation'}, 'validation'),
                                          ({'image_size': -1}, 'image_size=-1')])
def test_bad_arguments_are_errors(kwargs, match):
  args = {'source': 'digits', 'split': 'train'} | kwargs
  with pytest.raises((ValueError, ConfigError), match=match):
    images.load_arrays(**args)


def _config(**model):
  return ml_collections.ConfigDict({
      'seed': 3, 'train': {'batch_size': 32}, 'model': model,
      'data': {'name': 'images', 'source': 'digits', 'data_dir': '', 'image_size': 0,
               'eval_batches': 4}})


def test_build_batches_shuffle_cover_an_epoch_and_resume_exactly():
  data = images.build(_config(image_size=0, channels=0, num_classes=0))
  assert data.config_updates == {'model.image_size': 8, 'model.channels': 1}
  assert images.build(_config()).config_updates == {}  # only fields the model declares
  train_x, train_y = images.load_arrays('digits', 'train')
  it = data.make_train_iter()
  epoch = [next(it) for _ in range(1500 // 32)]
  assert epoch[0]['image'].shape == (32, 8, 8, 1) and epoch[0]['label'].dtype == np.int32
  # Every batch is made of training examples with their own labels, without repeats in an epoch.
  flat = train_x.reshape(1500, 64)
  rows = [np.flatnonzero((flat == img.reshape(64)).all(1)) for b in epoch for img in b['image']]
  assert all(len(r) >= 1 for r in rows)
  first = np.array([r[0] for r in rows])
  np.testing.assert_array_equal(train_y[first], np.concatenate([b['label'] for b in epoch]))
  assert len(set(first)) > 0.95 * len(first)  # (digits holds a few duplicate images)
  assert not np.array_equal(first[:32], np.arange(32))  # shuffled
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  fresh = data.make_train_iter()
  fresh.set_state(state)
  for a in after:
    np.testing.assert_array_equal(next(fresh)['image'], a['image'])
  # Eval: the first 4 x 32 test images in order.
  test_x, test_y = images.load_arrays('digits', 'test')
  assert len(data.eval_batches) == 4
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in data.eval_batches]),
                                test_x[:128])
  np.testing.assert_array_equal(data.eval_batches[3]['label'], test_y[96:128])


def test_build_rejects_a_batch_larger_than_the_test_split():
  config = _config()
  config.train.batch_size = 512
  with pytest.raises(ConfigError, match='297 test images'):
    images.build(config)


def test_processes_read_disjoint_slices(monkeypatch):
  import jax
  train_x, _ = images.load_arrays('digits', 'train')
  flat = train_x.reshape(1500, 64)
  seen = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for proc in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda: proc)
    it = images.train_examples({'image': train_x, 'label': np.arange(1500, dtype=np.int32)}, 32,
                              seed=3)
    batches = [next(it) for _ in range(10)]
    assert batches[0]['image'].shape == (16, 8, 8, 1)
    seen.append(np.concatenate([b['label'] for b in batches]))  # labels here are row indices
    np.testing.assert_array_equal(flat[seen[-1]], np.concatenate([b['image'] for b in batches])
                                  .reshape(-1, 64))
  assert not set(seen[0]) & set(seen[1])


def test_train_batches_carry_their_row_index(tfds_dir):
  data = images.build(_config())
  train_x, train_y = images.load_arrays('digits', 'train')
  assert images.train_size('digits') == len(train_y) == 1500
  assert images.train_size('mnist', tfds_dir) == 60000
  it = data.make_train_iter()
  epoch = [next(it) for _ in range(1500 // 32)]
  index = np.concatenate([b['index'] for b in epoch])
  assert index.dtype == np.int32 and len(set(index)) == len(index)  # no repeat in an epoch
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in epoch]), train_x[index])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in epoch]), train_y[index])
  assert 'index' not in data.eval_batches[0]  # test images have no row in the training bank
