"""Zero-shot classification and image-text retrieval of a trained CLIP / SigLIP / LiT run
(lab.objectives.contrastive), as CLIP evaluates (Radford et al. 2021, arXiv:2103.00020,
sec. 3.1.4: class names in prompt templates, their embeddings averaged; retrieval recall@K).

  python -m lab.eval.zero_shot_eval --run runs/clip_scenes [--split all] [--n 1000] [--out F]

Digit runs (data.task 'digits_captions' | 'mnist_captions'): the source's test images classified
among the ten lab.data.captions.DIGIT_NAMES in its PROMPT_TEMPLATES (the training captions use
the same templates; the test images are unseen). Split 'test' only.
Scene runs (data.task 'caption'): scenes of one shape (the run's scene settings with
max_objects = 1 and no digits) classified among the 35 colour-shape pairs SHAPE_PAIRS, named as
the captions name one object ('a red circle') in the caption templates that describe a single
object (SCENE_TEMPLATES). 'test' holds seen pairs only; 'test_holdout' holds exactly the pairs
held out of training (data.holdout, which must be shapes), so its accuracy measures
compositional generalisation; colour and shape accuracy of the predicted pair are reported too.
Retrieval: recall@1 and @5 between the images and captions of the split's caption scenes
(lab.data.image_text with data.eval_split = split), caption b of image b; identical captions of
different scenes count as misses, so recall slightly understates retrieval.

Writes (and prints) JSON: {run, step, task, zero_shot: {split: {top1, top5, n[, colour,
shape]}}, retrieval: {split: {i2t_recall@1, ...}}}.
Letters: L classes, M templates, N images, T tokens, J the embedding width.
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lab.data import captions, image_text, images, scenes
from lab.data.word_tokenizer import WordTokenizer
from lab.eval import features, zero_shot
from lab.models import clip

SHAPE_PAIRS = tuple((c, k) for k in scenes.SHAPES for c in scenes.COLOURS)
SCENE_TEMPLATES = (captions.CAPTIONS['list'].format(objects='{}'),
                   captions.CAPTIONS['there'].format(be='is', objects='{}'),
                   captions.CAPTIONS['count'].format(count=captions.COUNT_WORDS[1], noun='object',
                                                     objects='{}'))
DIGIT_TASKS = ('digits_captions', 'mnist_captions')


def scene_class_names() -> list[str]:
  """'a red circle', ... for SHAPE_PAIRS, worded as a caption names one shape."""
  return [captions.ONE.format(colour=c, kind=k) for c, k in SHAPE_PAIRS]


def single_shape_scenes(data_cfg, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(images f32[N, X, Y, 3], labels i32[N] indexing SHAPE_PAIRS) of scenes 0..n-1 of split,
  drawn with the run's scene settings but one object per scene and no digit glyphs."""
  holdout = image_text.holdout_pairs(data_cfg.holdout)
  digits = [' '.join(p) for p in holdout if p[1] == 'digit']
  if digits:
    raise ValueError(f'data.holdout pairs {digits} are digits; the zero-shot scene classes are '
                     'colour-shape pairs, expected held-out shapes only')
  spec = scenes.SceneSpec(image_size=data_cfg.image_size, grid=data_cfg.grid, max_objects=1,
                          digit_fraction=0.0, holdout=holdout, seed=data_cfg.seed)
  x_NXYC, layout = scenes.generate(spec, split, np.arange(n))
  pairs = [(scenes.COLOURS[c], scenes.KINDS[k])
           for c, k in zip(layout.colour_BO[:, 0], layout.kind_BO[:, 0])]
  return x_NXYC, np.array([SHAPE_PAIRS.index(p) for p in pairs], np.int32)


def class_embeddings(encode_text, tokenizer: WordTokenizer, length: int, class_names,
                     templates) -> jax.Array:
  """cls_LJ (lab.eval.zero_shot.class_embeddings) of the L x M prompts, each tokenized as the
  training captions are (<bos> prompt <eos>, padded to `length` with its mask)."""
  texts = [t for row in zero_shot.prompts(class_names, templates) for t in row]
  ids_NT, mask_NT = tokenizer.encode_batch(texts, length)
  txt_NJ = encode_text(ids_NT, mask_NT)
  return zero_shot.class_embeddings(txt_NJ.reshape(len(class_names), len(templates), -1))


def classify(encode_image, cls_LJ: jax.Array, images_NXYC, labels_N, batch_size: int) -> dict:
  """Top-1 and top-5 zero-shot accuracy of the images against the class embeddings, and the
  top-1 predictions."""
  img_NJ = jnp.asarray(features.extract(encode_image, images_NXYC, batch_size))
  labels_N = jnp.asarray(labels_N)
  return {'top1': float(zero_shot.accuracy(img_NJ, cls_LJ, labels_N, 1)),
          'top5': float(zero_shot.accuracy(img_NJ, cls_LJ, labels_N, min(5, len(cls_LJ)))),
          'n': int(len(labels_N)), 'pred': np.asarray(zero_shot.predict(img_NJ, cls_LJ))}


def retrieval(encode_image, encode_text, batches) -> dict:
  """Recall@1, @5 (lab.eval.zero_shot.retrieval_recall) over all images and captions of the
  batches, caption b of image b."""
  img_NJ = np.concatenate([encode_image(b['image']) for b in batches])
  txt_NJ = np.concatenate([encode_text(b['tokens'], b['mask']) for b in batches])
  return {k: float(v) for k, v in zero_shot.retrieval_recall(img_NJ, txt_NJ, (1, 5)).items()}


def encoders(run):
  """(encode_image, encode_text) of a restored run, jitted; a locked (LiT) image tower comes
  from the run's state."""
  cfg = run.config.model
  params = dict(run.params['model'])
  if 'image' not in params:
    params['image'] = run.state.model_state['image']
  image = jax.jit(functools.partial(clip.encode_image, cfg))
  text = jax.jit(functools.partial(clip.encode_text, cfg))
  return (lambda x: image(params, jnp.asarray(x)),
          lambda ids, mask: np.asarray(text(params, jnp.asarray(ids), jnp.asarray(mask))))


def _caption_batches(config, split: str, n: int) -> list:
  """The caption scenes 0..n-1 of split, in batches of train.batch_size (the training split is
  built as small as the batch allows: only its texts are drawn)."""
  c = ml_collections.ConfigDict(config.to_dict())
  batch = c.train.batch_size
  c.data.update(eval_split=split, n_eval=n, eval_batches=n // batch, n_train=batch)
  return image_text.build(c).eval_batches


def evaluate(run, splits, n: int) -> dict:
  """The JSON report of the module docstring for a restored run (lab.train.restore.load)."""
  config, data = run.config, run.config.data
  if run.config.objective != 'contrastive':
    raise ValueError(f'run objective {run.config.objective!r}; expected a contrastive run')
  encode_image, encode_text = encoders(run)
  tokenizer = WordTokenizer(captions.vocabulary(), data.n_tiles)
  batch = config.train.batch_size
  out = {'step': int(run.step), 'task': data.task, 'zero_shot': {}, 'retrieval': {}}
  if data.task in DIGIT_TASKS:
    if set(splits) != {'test'}:
      raise ValueError(f'splits {list(splits)} for a digit run; its only zero-shot split is '
                       '"test"')
    x, y = images.load_arrays(data.task.removesuffix('_captions'), 'test', data.data_dir,
                              data.image_size)
    cls_LJ = class_embeddings(encode_text, tokenizer, data.text_len, captions.DIGIT_NAMES,
                              captions.PROMPT_TEMPLATES)
    result = classify(encode_image, cls_LJ, x[:n], y[:n], batch)
    out['zero_shot']['test'] = {k: v for k, v in result.items() if k != 'pred'}
    return out
  cls_LJ = class_embeddings(encode_text, tokenizer, data.text_len, scene_class_names(),
                            SCENE_TEMPLATES)
  for split in splits:
    x, y = single_shape_scenes(data, split, n)
    result = classify(encode_image, cls_LJ, x, y, batch)
    pred, want = np.array(SHAPE_PAIRS)[result.pop('pred')], np.array(SHAPE_PAIRS)[y]
    out['zero_shot'][split] = dict(result, colour=float(np.mean(pred[:, 0] == want[:, 0])),
                                   shape=float(np.mean(pred[:, 1] == want[:, 1])))
    out['retrieval'][split] = retrieval(encode_image, encode_text,
                                        _caption_batches(config, split, n))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m lab.eval.zero_shot_eval',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='workdir of a contrastive lab.run')
  parser.add_argument('--split', default='all', choices=('all', 'test', 'test_holdout'),
                      help='all: test and (for scene runs) test_holdout')
  parser.add_argument('--n', type=int, default=1000, help='images per split')
  parser.add_argument('--out', default='', help='JSON file (default: <run>/zero_shot.json)')
  args = parser.parse_args(argv)
  from lab.train import restore
  run = restore.load(args.run)
  digits = run.config.data.task in DIGIT_TASKS
  splits = ('test',) if args.split == 'all' and digits else (
      ('test', 'test_holdout') if args.split == 'all' else (args.split,))
  report = dict(run=args.run, **evaluate(run, splits, args.n))
  text = json.dumps(report, indent=2)
  with open(args.out or f'{args.run}/zero_shot.json', 'w') as f:
    f.write(text + '\n')
  print(text)
  return report


if __name__ == '__main__':
  main()
