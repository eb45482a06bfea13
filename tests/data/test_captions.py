"""Captions and questions parsed back and checked against the scene description they came from;
exact, recorded caption noise; digit prompts; a vocabulary that covers it all."""
import collections
import re

import numpy as np
import pytest

from lab.data import captions, scenes
from lab.data.word_tokenizer import WordTokenizer

HOLDOUT = (('red', 'circle'), ('blue', 'digit'))
NUMBER = {w: i for i, w in enumerate(('zero', 'one', 'two', 'three', 'four', 'five', 'six',
                                      'seven', 'eight', 'nine'))}
SINGULAR = {'circles': 'circle', 'squares': 'square', 'triangles': 'triangle',
            'crosses': 'cross', 'diamonds': 'diamond', 'digits': 'digit'}
PHRASE = re.compile(r'^(?:a (\w+) (\w+)|(\w+) (\w+) (\w+)|the digit (\d) in (\w+))$')


def _scene_objects(n, grid=3, seed=0, split='train'):
  spec = scenes.SceneSpec(image_size=8 * grid * 2, grid=grid, max_objects=min(5, grid * grid),
                          digit_fraction=0.3, holdout=HOLDOUT, seed=seed)
  lay = scenes.layout(spec, split, np.arange(n))
  return spec, [lay.objects(b) for b in range(n)]


def _parse_phrase(text):
  """'a red circle' | 'two blue squares' | 'the digit 7 in red' -> [(colour, kind, digit)]."""
  m = PHRASE.match(text)
  assert m, text
  if m.group(1):
    return [(m.group(1), m.group(2), -1)]
  if m.group(3):
    assert NUMBER[m.group(3)] >= 2 and m.group(5) != 'digits'
    return [(m.group(4), SINGULAR[m.group(5)], -1)] * NUMBER[m.group(3)]
  return [(m.group(7), 'digit', int(m.group(6)))]


def _items(text):
  return re.split(r', | and ', text)


def _described(objects):
  return collections.Counter((o.colour, o.kind, o.digit) for o in objects)


def _where(obj):
  words = {('middle', 'centre'): 'centre'}
  return words.get(obj.position, ' '.join(obj.position))


def _check_caption(text, objects):
  """Returns the template name after asserting the caption is true of the objects."""
  assert text.endswith('.')
  body = text[:-1]
  rel = re.match(r'^(.+?) (above|below|to the left of|to the right of) (.+)$', body)
  if rel:
    (a,), (b,) = _parse_phrase(rel.group(1)), _parse_phrase(rel.group(3))
    def ok(p, q):
      return {'above': p.row < q.row, 'below': p.row > q.row, 'to the left of': p.col < q.col,
              'to the right of': p.col > q.col}[rel.group(2)]
    assert any(ok(p, q) for p in objects for q in objects if p is not q
               and (p.colour, p.kind, p.digit) == a and (q.colour, q.kind, q.digit) == b), text
    return 'relation'
  if ' at the ' in body:
    placed = collections.Counter()
    for item in _items(body):
      phrase, where = item.split(' at the ')
      (key,) = _parse_phrase(phrase)
      placed[key + (where,)] += 1
    assert placed == collections.Counter((o.colour, o.kind, o.digit, _where(o))
                                         for o in objects), text
    return 'place'
  name = 'list'
  m = re.match(r'^(\w+) objects?: (.+)$', body)
  if m:
    assert NUMBER[m.group(1)] == len(objects) and (len(objects) == 1) == body.startswith(
        'one object:'), text
    body, name = m.group(2), 'count'
  m = re.match(r'^there (is|are) (.+)$', body)
  if m:
    body, name = m.group(2), 'there'
  listed = collections.Counter(k for item in _items(body) for k in _parse_phrase(item))
  assert listed == _described(objects), text
  return name


def test_every_caption_is_true_of_its_scene():
  for grid in (2, 3):
    _, scenes_objects = _scene_objects(400, grid)
    used = collections.Counter()
    for i, objects in enumerate(scenes_objects):
      text = captions.caption(objects, np.random.default_rng(i))
      used[_check_caption(text, objects)] += 1
    assert set(used) == set(captions.CAPTIONS) and min(used.values()) > 30, used


def test_a_scene_gets_several_templates_chosen_by_the_seed():
  _, scenes_objects = _scene_objects(3)
  objects = next(o for o in scenes_objects if len(o) > 1)
  texts = {captions.caption(objects, np.random.default_rng(s)) for s in range(40)}
  assert len(texts) >= 5
  assert (captions.caption(objects, np.random.default_rng(7))
          == captions.caption(objects, np.random.default_rng(7)))


def _answer(question, objects, pairs):
  """Re-derives a question's answer from the description (None: the question is ill-posed)."""
  q = question[:-1]
  if m := re.match(r'^what colour is the (\w+)$', q):
    found = [o.colour for o in objects if o.kind == m.group(1)]
    return found[0] if len(found) == 1 else None
  if m := re.match(r'^how many (\w+) are there$', q):
    return list(NUMBER)[sum(o.kind == SINGULAR[m.group(1)] for o in objects)]
  if m := re.match(r'^how many (\w+) objects are there$', q):
    return list(NUMBER)[sum(o.colour == m.group(1) for o in objects)]
  if m := re.match(r'^is there a (\w+) (\w+)$', q):
    assert (m.group(1), m.group(2)) in pairs  # only pairs the split may show are named
    return 'yes' if any((o.colour, o.kind) == m.groups() for o in objects) else 'no'
  if m := re.match(r'^what shape is (above|below|to the left of|to the right of) the (\w+) (\w+)$',
                   q):
    refs = [o for o in objects if (o.colour, o.kind) == (m.group(2), m.group(3))]
    if len(refs) != 1:
      return None
    ref = refs[0]
    found = [o.kind for o in objects if o is not ref and {
        'above': o.row < ref.row, 'below': o.row > ref.row, 'to the left of': o.col < ref.col,
        'to the right of': o.col > ref.col}[m.group(1)]]
    return found[0] if len(found) == 1 else None
  if m := re.match(r'^what digit is shown in (\w+)$', q):
    found = [str(o.digit) for o in objects if o.kind == 'digit' and o.colour == m.group(1)]
    return found[0] if len(found) == 1 else None
  raise AssertionError(f'unparsed question {question!r}')


@pytest.mark.parametrize('split', ['train', 'test_holdout'])
def test_every_answer_is_right_unique_and_in_the_closed_set(split):
  spec, scenes_objects = _scene_objects(600, 3, seed=1, split=split)
  pairs = scenes.split_pairs(spec, split)
  if split == 'train':
    assert not set(HOLDOUT) & set(pairs)
  kinds = collections.Counter()
  for i, objects in enumerate(scenes_objects):
    q, a = captions.question(objects, np.random.default_rng(i), pairs)
    assert a in captions.ANSWERS and q.endswith('?')
    assert _answer(q, objects, pairs) == a, (q, a, objects)
    kinds[q.split()[0] + ' ' + q.split()[1] + ('' if a not in ('yes', 'no') else ' ' + a)] += 1
  assert {'what colour', 'how many', 'is there yes', 'is there no', 'what shape',
          'what digit'} <= set(kinds), kinds
  assert abs(kinds['is there yes'] - kinds['is there no']) < 0.1 * 600  # balanced yes / no


def test_caption_noise_is_exact_recorded_and_from_other_examples():
  for n, fraction in ((1000, 0.2), (37, 0.5), (50, 1.0)):
    source = captions.swap_captions(n, fraction, seed=4)
    noisy = source != np.arange(n)
    assert noisy.sum() == round(fraction * n)
    np.testing.assert_array_equal(np.sort(source[noisy]), np.flatnonzero(noisy))  # each once
  np.testing.assert_array_equal(captions.swap_captions(100, 0.3, 4),
                                captions.swap_captions(100, 0.3, 4))
  assert not np.array_equal(captions.swap_captions(100, 0.3, 4),
                            captions.swap_captions(100, 0.3, 5))
  np.testing.assert_array_equal(captions.swap_captions(10, 0.0, 0), np.arange(10))
  with pytest.raises(ValueError, match='swaps 1 caption'):
    captions.swap_captions(10, 0.1, 0)
  with pytest.raises(ValueError, match='fraction=1.5'):
    captions.swap_captions(10, 1.5, 0)


def test_digit_names_templates_and_captions():
  assert captions.DIGIT_NAMES == tuple(NUMBER)
  assert all(t.count('{}') == 1 for t in captions.PROMPT_TEMPLATES)
  assert len(set(captions.PROMPT_TEMPLATES)) == len(captions.PROMPT_TEMPLATES) >= 4
  seen = collections.Counter()
  for i in range(300):
    label = i % 10
    text = captions.digit_caption(label, np.random.default_rng(i))
    matches = [t for t in captions.PROMPT_TEMPLATES
               if text == t.replace('{}', list(NUMBER)[label])]
    assert len(matches) == 1, text
    seen[matches[0]] += 1
  assert len(seen) == len(captions.PROMPT_TEMPLATES)


def test_vocabulary_covers_every_caption_question_and_prompt():
  tok = WordTokenizer(captions.vocabulary())
  texts = [t.format(name) for t in captions.PROMPT_TEMPLATES for name in captions.DIGIT_NAMES]
  texts += list(captions.ANSWERS)
  for grid in (2, 3):
    spec, scenes_objects = _scene_objects(300, grid, seed=2, split='test_holdout')
    pairs = scenes.split_pairs(spec, 'test_holdout')
    for i, objects in enumerate(scenes_objects):
      texts.append(captions.caption(objects, np.random.default_rng(i)))
      texts.extend(captions.question(objects, np.random.default_rng(i), pairs))
  for text in texts:
    assert tok.unk_id not in tok.encode(text), text
    assert tok.decode(tok.encode(text)) == text
