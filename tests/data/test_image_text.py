"""The image_text data module: batch contents re-derived from scenes/captions, shapes and dtypes,
iterators that resume exactly, VQA loss masks, recorded caption noise, digit prompts, config
errors."""
import ml_collections
import numpy as np
import pytest

from lab.config import ConfigError
from lab.data import captions, image_text, images, scenes
from lab.data.word_tokenizer import WordTokenizer


def _config(task='caption', batch=16, **data):
  fields = dict(name='image_text', task=task, seed=2, image_size=32, grid=3, max_objects=4,
                digit_fraction=0.25, glyphs='digits', data_dir='', n_train=96, n_eval=40,
                holdout=('red circle', 'blue digit'), eval_split='test', noise_fraction=0.0,
                text_len=0, n_tiles=4, eval_batches=2)
  return ml_collections.ConfigDict({
      'seed': 7, 'train': {'batch_size': batch},
      'model': {'vocab_size': 0, 'vocab_multiple': 8, 'image_size': 0, 'channels': 0},
      'data': fields | data})


def _spec(config):
  d = config.data
  return scenes.SceneSpec(image_size=d.image_size, grid=d.grid, max_objects=d.max_objects,
                          digit_fraction=d.digit_fraction,
                          holdout=image_text.holdout_pairs(d.holdout), seed=d.seed)


def _text_rng(config, split, i):
  return np.random.default_rng((config.data.seed, scenes.SPLITS.index(split), i, 2))


def test_caption_batches_are_the_scenes_and_their_captions():
  config = _config()
  data = image_text.build(config)
  tok = WordTokenizer(captions.vocabulary())
  assert data.config_updates == {'model.vocab_size': -(-tok.vocab_size // 8) * 8,
                                 'model.image_size': 32, 'model.channels': 3}
  batch = next(data.make_train_iter())
  T = batch['tokens'].shape[1]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'image': ((16, 32, 32, 3), np.float32), 'tokens': ((16, T), np.int32),
      'mask': ((16, T), np.int32), 'label': ((16,), np.int32), 'noisy': ((16,), np.int32)}
  spec, glyphs = _spec(config), scenes.Glyphs.load('digits', 'train')
  x_BXYC, lay = scenes.generate(spec, 'train', batch['label'], glyphs)
  np.testing.assert_array_equal(batch['image'], x_BXYC)
  for b, i in enumerate(batch['label']):
    want = captions.caption(lay.objects(b), _text_rng(config, 'train', i))
    assert data.decode(batch['tokens'][b]) == want
    n = len(tok.encode(want)) + 2
    np.testing.assert_array_equal(batch['mask'][b], np.arange(T) < n)
    assert batch['tokens'][b, 0] == tok.bos_id and batch['tokens'][b, n - 1] == tok.eos_id
  assert not batch['noisy'].any()
  # Eval: the first 2 x 16 scenes of 'test', in order.
  assert len(data.eval_batches) == 2
  np.testing.assert_array_equal(data.eval_batches[1]['label'], np.arange(16, 32))
  np.testing.assert_array_equal(data.eval_batches[1]['image'],
                                scenes.generate(spec, 'test', np.arange(16, 32),
                                                scenes.Glyphs.load('digits', 'test'))[0])


def test_iterator_covers_an_epoch_and_resumes_exactly():
  data = image_text.build(_config())
  it = data.make_train_iter()
  epoch = [next(it) for _ in range(96 // 16)]
  labels = np.concatenate([b['label'] for b in epoch])
  np.testing.assert_array_equal(np.sort(labels), np.arange(96))  # shuffled, each scene once
  assert not np.array_equal(labels, np.arange(96))
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  fresh = data.make_train_iter()
  fresh.set_state(state)
  for a in after:
    b = next(fresh)
    for k in a:
      np.testing.assert_array_equal(b[k], a[k])
  other = image_text.build(_config(n_train=96)).make_train_iter()
  np.testing.assert_array_equal(next(other)['label'], epoch[0]['label'])


def test_vqa_loss_mask_covers_exactly_the_answer():
  config = _config('vqa', eval_split='test_holdout')
  data = image_text.build(config)
  tok = WordTokenizer(captions.vocabulary())
  spec = _spec(config)
  for split, batch in (('train', next(data.make_train_iter())),
                       ('test_holdout', data.eval_batches[0])):
    assert set(batch) == {'image', 'tokens', 'mask', 'loss_mask', 'answer', 'label'}
    lay = scenes.layout(spec, split, batch['label'])
    pairs = scenes.split_pairs(spec, split)
    for b, i in enumerate(batch['label']):
      q, a = captions.question(lay.objects(b), _text_rng(config, split, i), pairs)
      want = np.concatenate([tok.encode(q, bos=True), [tok.sep_id], tok.encode(a, eos=True)])
      ids = batch['tokens'][b]
      np.testing.assert_array_equal(ids[:len(want)], want)
      assert (ids[len(want):] == tok.pad_id).all()
      sep = int(np.flatnonzero(ids == tok.sep_id)[0])
      np.testing.assert_array_equal(batch['loss_mask'][b],
                                    (np.arange(len(ids)) > sep) & (np.arange(len(ids)) < len(want)))
      answered = ids[batch['loss_mask'][b] == 1]
      assert answered[-1] == tok.eos_id and tok.decode(answered) == a
      assert captions.ANSWERS[batch['answer'][b]] == a
      np.testing.assert_array_equal(batch['mask'][b], np.arange(len(ids)) < len(want))
  held = {(scenes.COLOURS.index(c), scenes.KINDS.index(k)) for c, k in spec.holdout}
  lay = scenes.layout(spec, 'test_holdout', data.eval_batches[0]['label'])
  assert all(any((c, k) in held for c, k in zip(lay.colour_BO[b], lay.kind_BO[b]))
             for b in range(16))


def test_noisy_captions_are_recorded_and_come_from_their_source():
  config = _config(noise_fraction=0.25, n_train=64)
  data = image_text.build(config)
  it = data.make_train_iter()
  epoch = [next(it) for _ in range(4)]
  noisy = np.concatenate([b['noisy'] for b in epoch])
  labels = np.concatenate([b['label'] for b in epoch])
  assert noisy.sum() == 16  # exactly a quarter of the 64 training scenes
  source = captions.swap_captions(64, 0.25, config.data.seed)
  np.testing.assert_array_equal(noisy, source[labels] != labels)
  lay = scenes.layout(_spec(config), 'train', np.arange(64))
  texts = [captions.caption(lay.objects(i), _text_rng(config, 'train', i)) for i in range(64)]
  tokens = np.concatenate([b['tokens'] for b in epoch])
  for row, i in enumerate(labels):
    assert data.decode(tokens[row]) == texts[source[i]]
  assert not any(b['noisy'].any() for b in data.eval_batches)


def test_digit_captions_name_the_class():
  config = _config('digits_captions', batch=32, image_size=0, eval_batches=3)
  data = image_text.build(config)
  assert data.config_updates['model.image_size'] == 8
  assert data.config_updates['model.channels'] == 1
  test_x, test_y = images.load_arrays('digits', 'test')
  np.testing.assert_array_equal(np.concatenate([b['image'] for b in data.eval_batches]),
                                test_x[:96])
  prompts = [[t.format(name) for t in captions.PROMPT_TEMPLATES] for name in captions.DIGIT_NAMES]
  batch = next(data.make_train_iter())
  assert batch['image'].shape == (32, 8, 8, 1)
  for split_batch in (batch, data.eval_batches[2]):
    for ids, y in zip(split_batch['tokens'], split_batch['label']):
      assert data.decode(ids) in prompts[y]
  np.testing.assert_array_equal(data.eval_batches[2]['label'], test_y[64:96])
  padded = image_text.build(_config('digits_captions', batch=32, image_size=16))
  assert padded.eval_batches[0]['image'].shape == (32, 16, 16, 1)


def test_processes_read_disjoint_slices(monkeypatch):
  import jax
  data = image_text.build(_config(n_train=64))
  seen = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for proc in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda: proc)
    it = data.make_train_iter()
    labels = np.concatenate([next(it)['label'] for _ in range(4)])
    assert len(labels) == 32
    seen.append(labels)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(64))


@pytest.mark.parametrize('fields,match', [
    ({'task': 'retrieval'}, 'retrieval'), ({'eval_split': 'val'}, 'val'),
    ({'holdout': ('pink circle',)}, 'pink circle'), ({'text_len': 5}, 'text_len=5'),
    ({'holdout': (), 'eval_split': 'test_holdout'}, 'test_holdout'),
    ({'task': 'vqa', 'noise_fraction': 0.5}, 'noise_fraction=0.5'),
    ({'grid': 5}, 'grid=5'), ({'n_train': 8}, 'exceeds the 8 training examples')])
def test_bad_config_is_an_error(fields, match):
  with pytest.raises(ConfigError, match=match):
    image_text.build(_config(**fields))


def test_held_out_digits_render_without_digits_in_training():
  config = _config(digit_fraction=0.0, holdout=('blue digit',), eval_split='test_holdout')
  data = image_text.build(config)
  lay = scenes.layout(_spec(config), 'test_holdout', data.eval_batches[0]['label'])
  assert (lay.kind_BO == scenes.DIGIT).sum(1).tolist() == [1] * 16
  blue = np.all(data.eval_batches[0]['image'] == np.array([-1, -1, 1], np.float32), -1)
  assert blue.any((1, 2)).all()
  assert not (scenes.layout(_spec(config), 'train', np.arange(96)).kind_BO == scenes.DIGIT).any()
