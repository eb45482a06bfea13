"""Templated captions, question-answer pairs and zero-shot prompt templates for lab.data.scenes.

Captions list, count, place or relate a scene's objects ("a red circle and two blue squares.",
"a green triangle above a yellow cross.", "the digit 7 in red at the top left."); a scene's
template is drawn from its own random generator. Questions follow CLEVR's families (Johnson et
al. 2017, arXiv:1612.06890): attribute query, counting, existence, relation query, digit query,
asked only where the answer is unique and answered from the closed set ANSWERS. For CLIP's
zero-shot classifier (Radford et al. 2021, arXiv:2103.00020, Sec. 3.1.4), DIGIT_NAMES and
PROMPT_TEMPLATES are the class names and templates that lab.eval.zero_shot.prompts fills;
training captions of digit images use the same templates. Noisy captions are swapped between
examples: the web-text noise that BLIP's CapFilt (Li et al. 2022, arXiv:2201.12086, Sec. 3.3)
learns to filter.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from lab.data import scenes
from lab.data.scenes import Object
from lab.data.word_tokenizer import split_words

COUNT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
DIGIT_NAMES = COUNT_WORDS
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
           'cross': 'crosses', 'diamond': 'diamonds', 'digit': 'digits'}
RELATIONS = ('above', 'below', 'to the left of', 'to the right of')
CAPTIONS = {'list': '{objects}.', 'there': 'there {be} {objects}.',
            'count': '{count} {noun}: {objects}.', 'place': '{placed}.',
            'relation': '{a} {relation} {b}.'}
ONE, MANY, DIGIT, PLACED = ('a {colour} {kind}', '{count} {colour} {plural}',
                            'the digit {digit} in {colour}', '{object} at the {position}')
QUESTIONS = {'colour': 'what colour is the {kind}?', 'count_kind': 'how many {plural} are there?',
             'count_colour': 'how many {colour} objects are there?',
             'exists': 'is there a {colour} {kind}?',
             'relation': 'what shape is {relation} the {colour} {kind}?',
             'digit': 'what digit is shown in {colour}?'}
ANSWERS = (scenes.COLOURS + scenes.KINDS + ('yes', 'no') + COUNT_WORDS
           + tuple(str(d) for d in range(10)))
PROMPT_TEMPLATES = ('a photo of the digit {}.', 'a photo of the number {}.',
                    'a drawing of the digit {}.', 'a handwritten {}.',
                    'a blurry photo of the number {}.', 'a low resolution image of the digit {}.')


def _join(items: Sequence[str]) -> str:
  """'x' | 'x and y' | 'x, y and z'."""
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def _one(obj: Object) -> str:
  if obj.kind == 'digit':
    return DIGIT.format(digit=obj.digit, colour=obj.colour)
  return ONE.format(colour=obj.colour, kind=obj.kind)


def _position(obj: Object) -> str:
  return 'centre' if obj.position == ('middle', 'centre') else ' '.join(obj.position)


def _groups(objects: Sequence[Object]) -> list[str]:
  """Phrases of the objects, shapes of one (colour, kind) counted together in order of first
  appearance ('two blue squares'), digits one by one ('the digit 7 in red')."""
  counts = {}
  for obj in objects:
    key = (obj.colour, obj.kind) if obj.kind != 'digit' else obj
    counts.setdefault(key, [obj, 0])[1] += 1
  return [_one(obj) if n == 1 else MANY.format(count=COUNT_WORDS[n], colour=obj.colour,
                                               plural=PLURALS[obj.kind])
          for obj, n in counts.values()]


def relations(a: Object, b: Object) -> list[str]:
  """The RELATIONS that hold from a to b, by grid cell: a above b when a's row is smaller, to the
  left of b when its column is smaller (objects sit in distinct cells, so one always holds)."""
  return [r for r, holds in zip(RELATIONS, (a.row < b.row, a.row > b.row, a.col < b.col,
                                            a.col > b.col)) if holds]


def caption(objects: Sequence[Object], rng: np.random.Generator) -> str:
  """One caption of a scene, its template (of CAPTIONS; 'relation' needs two objects) and its
  object pair and relation drawn from rng."""
  names = [k for k in CAPTIONS if k != 'relation' or len(objects) > 1]
  name = names[rng.integers(len(names))]
  groups = _groups(objects)
  if name == 'relation':
    i, j = rng.choice(len(objects), 2, replace=False)
    holding = relations(objects[i], objects[j])
    return CAPTIONS[name].format(a=_one(objects[i]), b=_one(objects[j]),
                                 relation=holding[rng.integers(len(holding))])
  return CAPTIONS[name].format(
      objects=_join(groups), be='is' if groups[0].startswith(('a ', 'the ')) else 'are',
      count=COUNT_WORDS[len(objects)], noun='object' if len(objects) == 1 else 'objects',
      placed=_join([PLACED.format(object=_one(o), position=_position(o)) for o in objects]))


def _question_families(objects: Sequence[Object], pairs) -> dict[str, list]:
  """Every question with a unique answer, by family, as (QUESTIONS key, fields, answer).
  `pairs`: the (colour, kind) pairs that a 'no' existence question may name."""
  kinds = [o.kind for o in objects]
  present = {(o.colour, o.kind) for o in objects}
  out = {'colour': [('colour', {'kind': o.kind}, o.colour) for o in objects
                    if kinds.count(o.kind) == 1],
         'count': [('count_kind', {'plural': PLURALS[k]}, COUNT_WORDS[kinds.count(k)])
                   for k in scenes.KINDS]
                  + [('count_colour', {'colour': c},
                      COUNT_WORDS[sum(o.colour == c for o in objects)]) for c in scenes.COLOURS],
         'exists_yes': [('exists', {'colour': c, 'kind': k}, 'yes') for c, k in sorted(present)],
         'exists_no': [('exists', {'colour': c, 'kind': k}, 'no') for c, k in pairs
                       if (c, k) not in present],
         'relation': [], 'digit': []}
  holding = {(i, j): relations(a, b) for i, a in enumerate(objects)
             for j, b in enumerate(objects) if i != j}
  for j, ref in enumerate(objects):
    if sum((o.colour, o.kind) == (ref.colour, ref.kind) for o in objects) > 1:
      continue
    for relation in RELATIONS:
      match = [i for i in range(len(objects)) if i != j and relation in holding[i, j]]
      if len(match) == 1:
        out['relation'].append(('relation', {'relation': relation, 'colour': ref.colour,
                                             'kind': ref.kind}, kinds[match[0]]))
  for c in scenes.COLOURS:
    digits = [o.digit for o in objects if o.kind == 'digit' and o.colour == c]
    if len(digits) == 1:
      out['digit'].append(('digit', {'colour': c}, str(digits[0])))
  return out


def question(objects: Sequence[Object], rng: np.random.Generator, pairs) -> tuple[str, str]:
  """One (question, answer) of a scene: a family drawn uniformly from those with a question
  (colour, count, exists_yes, exists_no, relation, digit), then a question of it uniformly.
  `pairs` (scenes.split_pairs) bounds what a 'no' question may name, so 'train' never names a
  held-out composition."""
  families = [f for f in _question_families(objects, pairs).values() if f]
  options = families[rng.integers(len(families))]
  key, fields, answer = options[rng.integers(len(options))]
  return QUESTIONS[key].format(**fields), answer


def digit_caption(label: int, rng: np.random.Generator) -> str:
  """A caption of a digit image: one of PROMPT_TEMPLATES, drawn from rng, with its class name."""
  return PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(DIGIT_NAMES[label])


def swap_captions(n: int, fraction: float, seed: int) -> np.ndarray:
  """int64[n] caption sources: example i takes the caption of example source[i]. Exactly
  round(fraction * n) examples, drawn from default_rng((seed, 3)), are noisy; they pass their
  captions around one cycle, so every noisy example gets another example's caption."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'noise fraction={fraction}; expected a value in [0, 1]')
  k = round(fraction * n)
  if k == 1:
    raise ValueError(f'noise fraction={fraction} of {n} examples swaps 1 caption; expected 0 '
                     'or at least 2 (a caption moves to another noisy example)')
  noisy_K = np.random.default_rng((seed, 3)).choice(n, k, replace=False)
  source_N = np.arange(n)
  source_N[noisy_K] = np.roll(noisy_K, 1)
  return source_N


def vocabulary() -> tuple[str, ...]:
  """Every word and punctuation mark the templates above can produce, sorted."""
  texts = [*CAPTIONS.values(), ONE, MANY, DIGIT, PLACED, *QUESTIONS.values(), *PROMPT_TEMPLATES,
           *ANSWERS, *PLURALS.values(), *RELATIONS, *DIGIT_NAMES, 'is are object objects , and',
           *scenes.ROW_WORDS[3], *scenes.COL_WORDS[3], *scenes.ROW_WORDS[2],
           *scenes.COL_WORDS[2]]
  words = set()
  for text in texts:
    words.update(split_words(re.sub(r'\{\w*\}', ' ', text)))
  return tuple(sorted(words))
