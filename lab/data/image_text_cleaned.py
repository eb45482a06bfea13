"""The image-text pairs CapFilt kept (lab.eval.capfilt; BLIP, Li et al. 2022, arXiv:2201.12086,
sec. 3.3), read back as a training set.

The pairs file (save_pairs / load_pairs, a .npz) holds K kept pairs: image_K (the index of a
'train' scene of lab.data.scenes), tokens_KT and mask_KT (the caption, padded as
lab.data.image_text pads it), synthetic_K (1: written by the captioner, 0: the dataset's own
caption), and the data fields the scenes were drawn with (SCENE_FIELDS, as JSON). Images are
re-rendered from the scene indices (a scene is a function of (seed, split, index) alone), so the
file stays small; a config whose scene fields differ from the file's is an error. Evaluation
batches, the tokenizer and config_updates are lab.data.image_text's for the same config (its
eval split is clean: noise is only ever put on 'train').

config.data: lab.data.image_text's fields (task 'caption') plus pairs_path.
Batches (B = train.batch_size // process_count): image f32[B, X, Y, 3], tokens i32[B, T],
mask i32[B, T], label i32[B] (the scene index), synthetic i32[B].
Letters: K kept pairs, T tokens.
"""
from __future__ import annotations

import json
import os

import grain
import jax
import numpy as np

from lab.config import require
from lab.data import image_text, scenes
from lab.data.dataset import Dataset

SCENE_FIELDS = ('seed', 'image_size', 'grid', 'max_objects', 'digit_fraction', 'glyphs',
                'data_dir', 'holdout', 'n_train', 'text_len')
ARRAYS = ('image_K', 'tokens_KT', 'mask_KT', 'synthetic_K')


def scene_fields(data_cfg) -> dict:
  """The SCENE_FIELDS of a config.data, JSON-ready (holdout as a list)."""
  return {k: list(data_cfg[k]) if k == 'holdout' else data_cfg[k] for k in SCENE_FIELDS}


def save_pairs(path: str, pairs: dict, fields: dict) -> None:
  """Writes pairs {image_K, tokens_KT, mask_KT, synthetic_K} and the scene fields to path."""
  if set(pairs) != set(ARRAYS):
    raise ValueError(f'save_pairs: arrays {sorted(pairs)}; expected {sorted(ARRAYS)}')
  K = len(pairs['image_K'])
  if any(len(pairs[k]) != K for k in ARRAYS) or pairs['tokens_KT'].shape != pairs['mask_KT'].shape:
    raise ValueError(f'save_pairs: lengths {[len(pairs[k]) for k in ARRAYS]} and token/mask '
                     'shapes differ; expected K rows in each, tokens and mask of one shape')
  if set(fields) != set(SCENE_FIELDS):
    raise ValueError(f'save_pairs: fields {sorted(fields)}; expected {sorted(SCENE_FIELDS)}')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:  # a file object: np.savez would append .npz to the name
    np.savez(f, fields=json.dumps(fields), **{k: np.asarray(pairs[k], np.int32) for k in ARRAYS})


def load_pairs(path: str) -> tuple[dict, dict]:
  """(pairs, fields) as save_pairs wrote them."""
  with np.load(path) as f:
    return {k: f[k] for k in ARRAYS}, json.loads(str(f['fields']))


def _check_fields(cfg, fields: dict, path: str) -> None:
  for key, value in scene_fields(cfg).items():
    require(fields.get(key) == value, f'data.{key}={value!r}, but data.pairs_path={path!r} was '
                                      f'written for {key}={fields.get(key)!r}')


def build(config) -> Dataset:
  """The kept pairs of data.pairs_path for training, image_text's clean eval batches."""
  cfg, batch = config.data, config.train.batch_size
  require(cfg.task == 'caption', f'data.task={cfg.task!r}; CapFilt pairs are captions, expected '
                                 '"caption"')
  require(os.path.isfile(cfg.pairs_path), f'data.pairs_path={cfg.pairs_path!r}; expected the file '
                                          'written by python -m lab.eval.capfilt')
  pairs, fields = load_pairs(cfg.pairs_path)
  _check_fields(cfg, fields, cfg.pairs_path)
  K = len(pairs['image_K'])
  n_proc = jax.process_count()
  require(batch % n_proc == 0, f'train.batch_size={batch} is not divisible by {n_proc} processes')
  require(K >= batch, f'train.batch_size={batch} exceeds the {K} pairs in {cfg.pairs_path!r}')
  base = image_text.build(config)
  spec = scenes.SceneSpec(image_size=cfg.image_size, grid=cfg.grid, max_objects=cfg.max_objects,
                          digit_fraction=cfg.digit_fraction,
                          holdout=image_text.holdout_pairs(cfg.holdout), seed=cfg.seed)
  layout = scenes.layout(spec, 'train', pairs['image_K'])
  glyphs = (scenes.Glyphs.load(cfg.glyphs, 'train', cfg.data_dir)
            if (layout.kind_BO == scenes.DIGIT).any() else None)
  arrays = {'tokens': pairs['tokens_KT'], 'mask': pairs['mask_KT'], 'label': pairs['image_K'],
            'synthetic': pairs['synthetic_K']}

  def make_batch(rows):
    return {'image': scenes.render(spec, layout.take(rows), glyphs),
            **{k: v[rows] for k, v in arrays.items()}}

  def make_train_iter():
    """Shuffled each epoch from config.seed; each process reads its own slice of every batch."""
    ds = grain.MapDataset.range(K).shuffle(seed=config.seed).repeat()[jax.process_index()::n_proc]
    ds = ds.batch(batch // n_proc, drop_remainder=True).map(make_batch)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))

  return Dataset(make_train_iter=make_train_iter, eval_batches=base.eval_batches,
                 config_updates=base.config_updates, encode=base.encode, decode=base.decode)
