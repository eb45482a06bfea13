"""Image-text batches: generated scenes (lab.data.scenes) with captions or questions, or digit
images with CLIP-style prompts (lab.data.captions), tokenized by lab.data.word_tokenizer.

config.data.task and its batches (B = train.batch_size // process_count, T = data.text_len):
  'caption'  image f32[B, X, Y, 3], tokens i32[B, T] = <bos> caption <eos> <pad>...,
             mask i32[B, T] (1 on non-pad tokens), label i32[B] (the scene's index in its
             split), noisy i32[B] (1 where the caption is another scene's: data.noise_fraction
             of the training scenes, none in eval).
  'vqa'      image, tokens = <bos> question <sep> answer <eos> <pad>..., mask, loss_mask i32[B, T]
             (1 on the answer's tokens and its closing <eos>, what an LM learns to say), answer
             i32[B] (index in captions.ANSWERS), label.
  'digits_captions' | 'mnist_captions'
             image f32[B, X, Y, 1] (lab.data.images), tokens = <bos> prompt <eos> ..., mask,
             label i32[B] (the digit); the prompt is one of captions.PROMPT_TEMPLATES.

config.data: name ('image_text'), task, seed (the data's own: scenes and texts do not change with
the run's seed, which only shuffles), image_size (digit tasks: 0 = native), grid, max_objects,
digit_fraction, glyphs ('digits' | 'mnist', the scenes' digit glyphs), data_dir, n_train and
n_eval (scene counts; digit tasks use their whole train and test splits), holdout (e.g.
('red circle',): colour-kind pairs kept out of 'train' and 'test'), eval_split ('test' |
'test_holdout'), noise_fraction, text_len (0 = the longest sequence built), n_tiles (the
tokenizer's tile markers), eval_batches.

Scene texts of example i come from default_rng((data.seed, split, i, 2)), digit prompts from one
generator per split; training images are rendered per batch (scenes are cheap to draw, too big
to keep), so the iterator's state is grain's index state and resumes exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import jax
import numpy as np

from lab.config import ConfigError, require
from lab.data import captions, images, scenes
from lab.data.dataset import Dataset
from lab.data.word_tokenizer import WordTokenizer

TASKS = ('caption', 'vqa', 'digits_captions', 'mnist_captions')


def holdout_pairs(entries) -> tuple[tuple[str, str], ...]:
  """('red circle', 'blue digit') -> (('red', 'circle'), ('blue', 'digit'))."""
  pairs = tuple(tuple(e.split()) for e in entries)
  for entry, pair in zip(entries, pairs):
    require(len(pair) == 2 and pair[0] in scenes.COLOURS and pair[1] in scenes.KINDS,
            f'data.holdout entry {entry!r}; expected "colour kind" with a colour in '
            f'{scenes.COLOURS} and a kind in {scenes.KINDS}')
  return pairs


def _text_rng(seed: int, split: str, i: int) -> np.random.Generator:
  """Example i's text generator: stream 2 of the scene's (seed, split, i) streams."""
  return np.random.default_rng((seed, scenes.SPLITS.index(split), int(i), 2))


@dataclasses.dataclass(frozen=True)
class _Split:
  """A split before padding: token sequences (with the answer's start for 'vqa'), per-example
  arrays, and rows -> {'image': ...}."""
  sequences: list
  starts: list | None
  arrays: dict
  images: Callable[[np.ndarray], dict]


def _scene_split(cfg, spec, split: str, n: int, tokenizer, noise_fraction: float) -> _Split:
  layout = scenes.layout(spec, split, np.arange(n))
  has_digits = (layout.kind_BO == scenes.DIGIT).any()
  glyphs = scenes.Glyphs.load(cfg.glyphs, split, cfg.data_dir) if has_digits else None
  images_fn = lambda rows: {'image': scenes.render(spec, layout.take(rows), glyphs)}
  objects = [layout.objects(b) for b in range(n)]
  label = np.arange(n, dtype=np.int32)
  if cfg.task == 'caption':
    texts = [captions.caption(o, _text_rng(cfg.seed, split, i)) for i, o in enumerate(objects)]
    source = captions.swap_captions(n, noise_fraction, cfg.seed)
    return _Split([tokenizer.encode(texts[j], bos=True, eos=True) for j in source], None,
                  {'label': label, 'noisy': (source != label).astype(np.int32)}, images_fn)
  pairs = scenes.split_pairs(spec, split)
  qa = [captions.question(o, _text_rng(cfg.seed, split, i), pairs) for i, o in enumerate(objects)]
  questions = [np.concatenate([tokenizer.encode(q, bos=True), [tokenizer.sep_id]]) for q, _ in qa]
  return _Split([np.concatenate([q, tokenizer.encode(a, eos=True)]) for q, (_, a) in
                 zip(questions, qa)], [len(q) for q in questions],
                {'label': label, 'answer': np.array([captions.ANSWERS.index(a) for _, a in qa],
                                                    np.int32)}, images_fn)


def _scene_splits(cfg, tokenizer) -> tuple[_Split, _Split]:
  try:
    spec = scenes.SceneSpec(image_size=cfg.image_size, grid=cfg.grid, max_objects=cfg.max_objects,
                            digit_fraction=cfg.digit_fraction,
                            holdout=holdout_pairs(cfg.holdout), seed=cfg.seed)
  except ValueError as e:
    raise ConfigError(f'config.data: {e}') from None
  return (_scene_split(cfg, spec, 'train', cfg.n_train, tokenizer, cfg.noise_fraction),
          _scene_split(cfg, spec, cfg.eval_split, cfg.n_eval, tokenizer, 0.0))


def _digit_split(cfg, split: str, tokenizer) -> _Split:
  x_BXYC, label_B = images.load_arrays(cfg.task.removesuffix('_captions'), split, cfg.data_dir,
                                       cfg.image_size)
  rng = np.random.default_rng((cfg.seed, scenes.SPLITS.index(split), 2))  # one for the split
  sequences = [tokenizer.encode(captions.digit_caption(y, rng), bos=True, eos=True)
               for y in label_B]
  return _Split(sequences, None, {'label': label_B}, lambda rows: {'image': x_BXYC[rows]})


def _batcher(tokenizer, split: _Split, length: int):
  """rows -> the batch of those examples: images, tokens and mask padded to `length` (and a
  loss_mask of 1 from each answer's start to its <eos>), and the split's per-example arrays."""
  tokens_BT, mask_BT = tokenizer.pad(split.sequences, length)
  arrays = {'tokens': tokens_BT, 'mask': mask_BT, **split.arrays}
  if split.starts is not None:
    arrays['loss_mask'] = mask_BT * (np.arange(length)[None] >= np.array(split.starts)[:, None])
  return lambda rows: {**split.images(rows), **{k: v[rows] for k, v in arrays.items()}}


def _train_iter(n: int, batch_size: int, seed: int, make_batch):
  """A grain iterator of make_batch(rows), rows a shuffled int64[batch_size // process_count]
  slice of 0..n-1, reshuffled every epoch; each process reads its own slice. Two threads keep
  four batches ready (grain's default, 500, would render thousands of images ahead)."""
  n_proc, proc = jax.process_count(), jax.process_index()
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat()[proc::n_proc]
  ds = ds.batch(batch_size // n_proc, drop_remainder=True).map(make_batch)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def _eval(n: int, batch_size: int, n_batches: int, make_batch) -> list:
  k = min(n // batch_size, n_batches)
  require(k > 0, f'{n} eval examples and data.eval_batches={n_batches} hold no batch of '
                 f'train.batch_size={batch_size}')
  return [make_batch(np.arange(i * batch_size, (i + 1) * batch_size)) for i in range(k)]


def _validate(cfg) -> None:
  require(cfg.task in TASKS, f'data.task={cfg.task!r}; expected one of {TASKS}')
  require(cfg.eval_split in ('test', 'test_holdout'),
          f'data.eval_split={cfg.eval_split!r}; expected "test" or "test_holdout"')
  require(cfg.eval_split == 'test' or (cfg.holdout and cfg.task in ('caption', 'vqa')),
          f'data.eval_split="test_holdout" needs a scene task with data.holdout pairs, not '
          f'task={cfg.task!r} with holdout={tuple(cfg.holdout)}')
  require(cfg.noise_fraction == 0 or cfg.task == 'caption',
          f'data.noise_fraction={cfg.noise_fraction} applies to task="caption", not '
          f'{cfg.task!r}')
  require(cfg.n_train > 0 and cfg.n_eval > 0,
          f'data.n_train={cfg.n_train}, data.n_eval={cfg.n_eval}; expected positive counts')
  require(cfg.text_len >= 0, f'data.text_len={cfg.text_len}; expected 0 (auto) or a length')


def build(config) -> Dataset:
  """config_updates fill model.vocab_size (rounded up to model.vocab_multiple),
  model.image_size and model.channels where the model has them."""
  cfg, batch = config.data, config.train.batch_size
  _validate(cfg)
  tokenizer = WordTokenizer(captions.vocabulary(), cfg.n_tiles)
  if cfg.task in ('caption', 'vqa'):
    train, held = _scene_splits(cfg, tokenizer)
  else:
    train, held = (_digit_split(cfg, s, tokenizer) for s in ('train', 'test'))
  n_proc = jax.process_count()
  require(batch % n_proc == 0, f'train.batch_size={batch} is not divisible by {n_proc} processes')
  require(len(train.sequences) >= batch,
          f'train.batch_size={batch} exceeds the {len(train.sequences)} training examples')
  longest = max(len(q) for split in (train, held) for q in split.sequences)
  length = cfg.text_len or longest
  require(longest <= length, f'data.text_len={cfg.text_len} is shorter than the longest '
                             f'sequence of {longest} tokens')
  eval_batches = _eval(len(held.sequences), batch, cfg.eval_batches,
                       _batcher(tokenizer, held, length))
  train_batch = _batcher(tokenizer, train, length)
  _, size, _, channels = eval_batches[0]['image'].shape
  multiple = config.model.get('vocab_multiple', 1)
  updates = {'vocab_size': -(-tokenizer.vocab_size // multiple) * multiple,
             'image_size': size, 'channels': channels}
  return Dataset(
      make_train_iter=lambda: _train_iter(len(train.sequences), batch, config.seed, train_batch),
      eval_batches=eval_batches,
      config_updates={f'model.{k}': v for k, v in updates.items() if k in config.model},
      encode=tokenizer.encode, decode=tokenizer.decode)
