"""lab.eval.zero_shot_eval on planted models and on a real tiny one. Planted encoders that know
each image's class (looked up from the image itself) and read the class name out of each prompt
give top-1 = 1 on digits and on seen and held-out scene compositions; one that swaps two classes
loses exactly their images; planted retrieval embeddings give the recall counted by hand. The
single-shape scenes are checked against their layouts, drawn independently; a randomly
drawn tiny LiT model (its tower in the state) gets the top-1 of a NumPy
re-derivation; the command line writes its report as JSON."""
import functools
import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO_ROOT

from lab import config as config_lib
from lab import run as run_lib
from lab.data import captions, images, scenes
from lab.data.word_tokenizer import WordTokenizer
from lab.eval import zero_shot_eval as zse
from lab.models import clip
from lab.nn import param_spec as ps
from lab.train import restore

HOLDOUT = ('red circle', 'green square', 'blue triangle', 'yellow cross', 'magenta diamond')


def planted_run(data: str):
  """A Run-like contrastive run of clip_scenes.py:data=<data>,tiny (no parameters needed)."""
  config = config_lib.load(str(REPO_ROOT / f'experiments/clip_scenes.py:data={data},tiny'))
  return types.SimpleNamespace(config=ml_collections.FrozenConfigDict(config), step=6)


def planted_encoders(names, class_of_image, swap=()):
  """encode_image: one-hot of class_of_image(x) per image; encode_text: one-hot of the class
  whose name (as whole words) the decoded prompt contains, with the classes in `swap`
  exchanged."""
  tokenizer = WordTokenizer(captions.vocabulary())
  L = len(names)
  perm = np.arange(L)
  if swap:
    perm[list(swap)] = perm[list(swap[::-1])]

  def encode_image(x_NXYC):  # traceable: the evaluation jits it (lab.eval.features.extract)
    one_hot = lambda x: np.eye(L, dtype=np.float32)[[class_of_image(a) for a in np.asarray(x)]]
    return jax.pure_callback(one_hot, jax.ShapeDtypeStruct((len(x_NXYC), L), jnp.float32),
                             x_NXYC)

  def encode_text(ids_NT, mask_NT):
    out = []
    for ids in np.asarray(ids_NT):
      text = ' ' + tokenizer.decode(ids).replace('.', ' ') + ' '
      hits = [l for l in range(L) if f' {names[l]} ' in text]
      assert len(hits) == 1, (text, hits)
      out.append(np.eye(L)[perm[hits[0]]])
    return np.asarray(out, np.float32)
  return encode_image, encode_text


def _image_key(x) -> bytes:
  return np.asarray(x, np.float32).tobytes()


def test_digit_run_planted_encoders(monkeypatch):
  run = planted_run('digits')
  x, y = images.load_arrays('digits', 'test')
  label = {_image_key(a): int(b) for a, b in zip(x, y)}
  enc = planted_encoders(captions.DIGIT_NAMES, lambda a: label[_image_key(a)])
  monkeypatch.setattr(zse, 'encoders', lambda run: enc)
  out = zse.evaluate(run, ('test',), 200)
  assert out['zero_shot'] == {'test': {'top1': 1.0, 'top5': 1.0, 'n': 200}}
  assert out['retrieval'] == {} and out['task'] == 'digits_captions'
  # Swapping 'three' and 'eight' misclassifies exactly the threes and eights.
  enc = planted_encoders(captions.DIGIT_NAMES, lambda a: label[_image_key(a)], swap=(3, 8))
  monkeypatch.setattr(zse, 'encoders', lambda run: enc)
  top1 = zse.evaluate(run, ('test',), 200)['zero_shot']['test']['top1']
  assert top1 == pytest.approx(1 - np.isin(y[:200], (3, 8)).mean())
  with pytest.raises(ValueError, match='its only zero-shot split is "test"'):
    zse.evaluate(run, ('test', 'test_holdout'), 200)


def test_single_shape_scenes_are_their_layouts():
  """Labels index SHAPE_PAIRS by the object's drawn colour and kind; 'test' never shows a
  held-out pair and 'test_holdout' shows only held-out pairs."""
  data = planted_run('scenes').config.data
  spec = scenes.SceneSpec(image_size=32, grid=3, max_objects=1, digit_fraction=0.0,
                          holdout=tuple(tuple(h.split()) for h in HOLDOUT), seed=0)
  assert tuple(data.holdout) == HOLDOUT and data.seed == 0
  for split in ('test', 'test_holdout'):
    x, labels = zse.single_shape_scenes(data, split, 60)
    want_x, layout = scenes.generate(spec, split, np.arange(60))
    np.testing.assert_array_equal(x, want_x)
    assert (layout.count_B == 1).all()
    names = [f'{scenes.COLOURS[c]} {scenes.KINDS[k]}'
             for c, k in zip(layout.colour_BO[:, 0], layout.kind_BO[:, 0])]
    assert [' '.join(zse.SHAPE_PAIRS[l]) for l in labels] == names
    assert all((n in HOLDOUT) == (split == 'test_holdout') for n in names)
  assert len(zse.SHAPE_PAIRS) == 35 and zse.scene_class_names()[0] == 'a red circle'
  assert zse.SCENE_TEMPLATES == ('{}.', 'there is {}.', 'one object: {}.')
  bad = ml_collections.ConfigDict(data.to_dict())
  bad.holdout = ('blue digit',)
  with pytest.raises(ValueError, match=r"data.holdout pairs \['blue digit'\] are digits"):
    zse.single_shape_scenes(bad, 'test', 4)


def test_scene_classification_and_retrieval_planted():
  """Planted encoders classify every single-shape scene right (colour and shape too); in
  retrieval, images and captions planted at the first scene with the same caption give
  recall@1 = the fraction of distinct captions and recall@5 = 1."""
  data = planted_run('scenes').config.data
  tokenizer = WordTokenizer(captions.vocabulary())
  names = [n.removeprefix('a ') for n in zse.scene_class_names()]
  for split in ('test', 'test_holdout'):
    x, y = zse.single_shape_scenes(data, split, 48)
    label = {_image_key(a): int(b) for a, b in zip(x, y)}
    encode_image, encode_text = planted_encoders(names, lambda a: label[_image_key(a)])
    cls_LJ = zse.class_embeddings(encode_text, tokenizer, data.text_len,
                                  zse.scene_class_names(), zse.SCENE_TEMPLATES)
    result = zse.classify(encode_image, cls_LJ, x, y, 16)
    assert (result['top1'], result['top5'], result['n']) == (1.0, 1.0, 48)
    np.testing.assert_array_equal(result['pred'], y)

    batches = zse._caption_batches(planted_run('scenes').config, split, 48)
    texts = [tuple(t) for b in batches for t in b['tokens']]
    first = {}
    for i, t in enumerate(texts):
      first.setdefault(t, i)
    image_text = {_image_key(a): texts[i] for i, a in enumerate(
        np.concatenate([b['image'] for b in batches]))}
    one_hot = lambda rows: np.eye(48, dtype=np.float32)[[first[r] for r in rows]]
    recall = zse.retrieval(lambda x: one_hot([image_text[_image_key(a)] for a in np.asarray(x)]),
                           lambda ids, mask: one_hot([tuple(r) for r in np.asarray(ids)]),
                           batches)
    distinct = len(first) / len(texts)
    assert len(texts) == 48 and max(texts.count(t) for t in first) <= 5 and distinct < 1
    assert recall == pytest.approx({'i2t_recall@1': distinct, 't2i_recall@1': distinct,
                                    'i2t_recall@5': 1.0, 't2i_recall@5': 1.0})


def np_zero_shot_top1(img_NJ, txt_LMJ, labels_N) -> float:
  """CLIP sec. 3.1.4 in float64: class l = normalise(mean_m normalise(e_lm)); argmax cosine."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  cls_LJ = unit(unit(np.float64(txt_LMJ)).mean(1))
  return float(np.mean((unit(np.float64(img_NJ)) @ cls_LJ.T).argmax(1) == labels_N))


def test_lit_scene_run_with_a_tiny_model(monkeypatch, tmp_path):
  """evaluate() of a randomly drawn tiny model whose image tower sits in the state (a LiT run):
  its top-1 equals a NumPy re-derivation from the model's own embeddings, and the command line
  writes the report as JSON."""
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/clip_scenes.py:tiny')),
      ['model.attention_backend=reference'])
  config, task, _ = run_lib.prepare(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                        task.param_specs['model'], is_leaf=ps.is_spec)
  cfg, data = config.model, config.data
  x, y = zse.single_shape_scenes(data, 'test_holdout', 32)
  fast = lambda f: jax.jit(functools.partial(f, cfg),
                           compiler_options={'xla_backend_optimization_level': 0})
  img = fast(clip.encode_image)(params, x)
  texts = [t.format(n) for n in zse.scene_class_names() for t in zse.SCENE_TEMPLATES]
  ids, mask = WordTokenizer(captions.vocabulary()).encode_batch(texts, data.text_len)
  txt = fast(clip.encode_text)(params, ids, mask).reshape(35, 3, -1)
  want = np_zero_shot_top1(img, txt, y)
  state = {'image': params.pop('image')}
  run = types.SimpleNamespace(config=config, step=6, params={'model': params},
                              state=types.SimpleNamespace(model_state=state))
  monkeypatch.setattr(restore, 'load', lambda workdir: run)
  out = tmp_path / 'zs.json'
  report = zse.main(['--run', 'planted', '--n', '32', '--out', str(out)])
  assert json.loads(out.read_text()) == report
  assert set(report['zero_shot']) == set(report['retrieval']) == {'test', 'test_holdout'}
  assert report['zero_shot']['test_holdout']['top1'] == pytest.approx(want)
  assert set(report['retrieval']['test']) == {'i2t_recall@1', 't2i_recall@1', 'i2t_recall@5',
                                              't2i_recall@5'}
