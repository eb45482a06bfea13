"""CapFilt: the filter keeps exactly the captions at or above the threshold, its detection
precision and recall against hand counts, the kept pairs laid out for the cleaned data module,
the pairs file round-tripping through lab.data.image_text_cleaned (images re-rendered from the
scene indices), a scene-field mismatch refused, and the captioner and filter run over a tiny
data set by scene index."""
import jax
import ml_collections
import numpy as np
import pytest

from lab.config import ConfigError
from lab.data import image_text, image_text_cleaned, scenes
from lab.eval import capfilt
from lab.models import blip
from lab.nn import param_spec as ps


def test_keep_is_exactly_the_threshold_rule():
  rng = np.random.default_rng(0)
  p = rng.random(1000)
  for threshold in (0.0, 0.3, 0.5, 1.0):
    np.testing.assert_array_equal(capfilt.keep(p, threshold), p >= threshold)
  np.testing.assert_array_equal(capfilt.keep(np.array([0.4999, 0.5, 0.5001]), 0.5),
                                [False, True, True])
  with pytest.raises(ValueError, match='threshold=1.5'):
    capfilt.keep(p, 1.5)


def test_detection_counts():
  removed = np.array([1, 1, 0, 0, 1, 0, 1], bool)
  noisy = np.array([1, 0, 1, 0, 1, 0, 0], bool)
  got = capfilt.detection(removed, noisy)
  assert got == {'precision': 2 / 4, 'recall': 2 / 3, 'removed': 4, 'noisy': 3,
                 'removed_noisy': 2}
  assert np.isnan(capfilt.detection(np.zeros(3, bool), np.zeros(3, bool))['precision'])


def _scored(n=10, T=5, seed=1):
  rng = np.random.default_rng(seed)
  return {'tokens_NT': rng.integers(5, 30, (n, T)).astype(np.int32),
          'mask_NT': np.ones((n, T), np.int32),
          'noisy_N': (rng.random(n) < 0.4).astype(np.int32),
          'synth_tokens_NT': rng.integers(5, 30, (n, T)).astype(np.int32),
          'synth_mask_NT': (np.arange(T)[None] < rng.integers(2, T + 1, (n, 1))).astype(np.int32),
          'p_original_N': rng.random(n), 'p_synthetic_N': rng.random(n)}


def test_cleaned_pairs_are_the_kept_originals_then_the_kept_synthetic_captions():
  scored = _scored()
  pairs, summary = capfilt.cleaned_pairs(scored, 0.45)
  orig = np.flatnonzero(scored['p_original_N'] >= 0.45)
  synth = np.flatnonzero(scored['p_synthetic_N'] >= 0.45)
  np.testing.assert_array_equal(pairs['image_K'], np.concatenate([orig, synth]))
  np.testing.assert_array_equal(pairs['tokens_KT'], np.concatenate(
      [scored['tokens_NT'][orig], scored['synth_tokens_NT'][synth]]))
  np.testing.assert_array_equal(pairs['mask_KT'], np.concatenate(
      [scored['mask_NT'][orig], scored['synth_mask_NT'][synth]]))
  np.testing.assert_array_equal(pairs['synthetic_K'], [0] * len(orig) + [1] * len(synth))
  removed = scored['p_original_N'] < 0.45
  assert summary['kept_original'] == len(orig) and summary['kept_synthetic'] == len(synth)
  assert summary['precision'] == capfilt.detection(removed, scored['noisy_N'])['precision']
  assert summary['recall'] == capfilt.detection(removed, scored['noisy_N'])['recall']


def _data_config(path='', batch=8):
  fields = dict(name='image_text_cleaned', task='caption', seed=3, image_size=24, grid=3,
                max_objects=2, digit_fraction=0.5, glyphs='digits', data_dir='', n_train=24,
                n_eval=16, holdout=(), eval_split='test', noise_fraction=0.0, text_len=24,
                n_tiles=0, eval_batches=1, pairs_path=path)
  return ml_collections.ConfigDict({
      'seed': 5, 'train': {'batch_size': batch},
      'model': {'vocab_size': 0, 'image_size': 0, 'channels': 0}, 'data': fields})


def test_pairs_file_round_trips_through_the_data_module(tmp_path):
  path = str(tmp_path / 'pairs.npz')
  config = _data_config(path)
  rng = np.random.default_rng(2)
  K = 16
  pairs = {'image_K': rng.integers(0, 24, K).astype(np.int32),
           'tokens_KT': rng.integers(5, 40, (K, 24)).astype(np.int32),
           'mask_KT': (np.arange(24)[None] < rng.integers(3, 24, (K, 1))).astype(np.int32),
           'synthetic_K': (np.arange(K) >= 10).astype(np.int32)}
  image_text_cleaned.save_pairs(path, pairs, image_text_cleaned.scene_fields(config.data))
  loaded, fields = image_text_cleaned.load_pairs(path)
  assert fields == image_text_cleaned.scene_fields(config.data)
  for k in pairs:
    np.testing.assert_array_equal(loaded[k], pairs[k])

  data = image_text_cleaned.build(config)
  reference = image_text.build(config)
  assert data.config_updates == reference.config_updates
  np.testing.assert_array_equal(data.eval_batches[0]['image'], reference.eval_batches[0]['image'])
  it = data.make_train_iter()
  epoch = [next(it) for _ in range(K // 8)]  # K divisible by the batch: one epoch, each pair once
  got = {k: np.concatenate([b[k] for b in epoch]) for k in epoch[0]}
  order = np.lexsort((*got['tokens'].T[::-1], got['label']))  # by scene, then by caption
  want = np.lexsort((*pairs['tokens_KT'].T[::-1], pairs['image_K']))
  np.testing.assert_array_equal(got['label'][order], pairs['image_K'][want])
  np.testing.assert_array_equal(got['tokens'][order], pairs['tokens_KT'][want])
  np.testing.assert_array_equal(got['mask'][order], pairs['mask_KT'][want])
  np.testing.assert_array_equal(got['synthetic'][order], pairs['synthetic_K'][want])
  spec = scenes.SceneSpec(image_size=24, grid=3, max_objects=2, digit_fraction=0.5, seed=3)
  images, _ = scenes.generate(spec, 'train', got['label'], scenes.Glyphs.load('digits', 'train'))
  np.testing.assert_array_equal(got['image'], images)


def test_a_scene_field_mismatch_is_refused(tmp_path):
  path = str(tmp_path / 'pairs.npz')
  config = _data_config(path)
  pairs = {'image_K': np.arange(8), 'tokens_KT': np.ones((8, 24), np.int32),
           'mask_KT': np.ones((8, 24), np.int32), 'synthetic_K': np.zeros(8, np.int32)}
  image_text_cleaned.save_pairs(path, pairs, image_text_cleaned.scene_fields(config.data))
  config.data.seed = 4
  with pytest.raises(ConfigError, match=r'data.seed=4, but data.pairs_path=.* seed=3'):
    image_text_cleaned.build(config)
  with pytest.raises(ConfigError, match='pairs_path'):
    image_text_cleaned.build(_data_config(str(tmp_path / 'missing.npz')))


def test_bootstrap_scores_every_training_example_by_index():
  """A random tiny BLIP over 12 noisy training scenes (batch 8, so the iterator wraps): every
  index gets its own caption, noise flag, a synthetic caption and both match probabilities."""
  config = _data_config(batch=8)
  config.data.update(name='image_text', n_train=12, noise_fraction=0.5)
  data = image_text.build(config)
  cfg = ml_collections.ConfigDict(dict(
      image_size=24, channels=3, vocab_size=data.config_updates['model.vocab_size'], max_len=24,
      embed_dim=8, attention_backend='reference',
      vision=dict(patch_size=12, d_model=8, n_layers=1, n_heads=2, mlp_dim=8),
      text=dict(d_model=8, n_layers=1, n_heads=2, mlp_dim=8)))
  params = ps.init(blip.param_specs(cfg), jax.random.key(0))
  scored = capfilt.bootstrap(cfg, params, data, 12, jax.random.key(1))
  truth = {}
  it = data.make_train_iter()
  while len(truth) < 12:
    b = next(it)
    for i, label in enumerate(b['label']):
      truth[int(label)] = (b['tokens'][i], b['noisy'][i])
  for i in range(12):
    np.testing.assert_array_equal(scored['tokens_NT'][i], truth[i][0])
    assert scored['noisy_N'][i] == truth[i][1]
  assert scored['noisy_N'].sum() == 6
  assert np.all((scored['p_original_N'] > 0) & (scored['p_original_N'] < 1))
  assert np.all((scored['p_synthetic_N'] > 0) & (scored['p_synthetic_N'] < 1))
  assert np.all(scored['synth_tokens_NT'][:, 0] == data.encode('<bos>')[0])
  assert np.all(scored['synth_mask_NT'].sum(1) >= 2)
