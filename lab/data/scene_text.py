"""Text-only scene documents for pre-training a VLM's language model: each generated scene of
lab.data.scenes written as one caption followed by one question about it and its answer,

  <bos> caption question <sep> answer <eos>

(lab.data.captions' templates, lab.data.word_tokenizer's ids), so the LM learns the captions'
language and to answer a question from the text before it: the VQA layout of lab.data.image_text
with the caption where the image tokens go. Documents are concatenated into one stream and cut
into windows of block_size + 1 tokens (lab.data.text_windows), the batches of lab.objectives.lm.
Training documents describe 'train' scenes, evaluation documents 'test' scenes, so neither holds
a held-out (colour, kind) pair: a VLM's test_holdout compositions stay unseen in text too.

config.data: name ('scene_text'), seed, image_size, grid, max_objects, digit_fraction, holdout
(as lab.data.image_text: the same values describe the same scenes), n_train and n_eval (scene
counts), n_tiles (the tokenizer's tile markers, so ids match the image-text data), block_size,
eval_batches. Scene i's caption and question come from default_rng((data.seed, split, i, 4)), a
stream that lab.data.image_text's texts (stream 2) do not use.
"""
from __future__ import annotations

import numpy as np

from lab.config import ConfigError, require
from lab.data import captions, image_text, scenes, text_windows
from lab.data.dataset import Dataset
from lab.data.word_tokenizer import WordTokenizer

_TEXT_STREAM = 4


def documents(spec: scenes.SceneSpec, split: str, n: int, seed: int,
              tokenizer: WordTokenizer) -> list[np.ndarray]:
  """int32 ids of the documents of scenes 0..n-1 of `split`, one per scene."""
  layout = scenes.layout(spec, split, np.arange(n))
  pairs = scenes.split_pairs(spec, split)
  docs = []
  for i in range(n):
    objects = layout.objects(i)
    rng = np.random.default_rng((seed, scenes.SPLITS.index(split), i, _TEXT_STREAM))
    text = captions.caption(objects, rng)
    question, answer = captions.question(objects, rng, pairs)
    docs.append(np.concatenate([tokenizer.encode(f'{text} {question}', bos=True),
                                [tokenizer.sep_id], tokenizer.encode(answer, eos=True)]))
  return docs


def build(config) -> Dataset:
  """config_updates fill model.vocab_size (rounded up to model.vocab_multiple)."""
  cfg, batch = config.data, config.train.batch_size
  require(cfg.n_train > 0 and cfg.n_eval > 0,
          f'data.n_train={cfg.n_train}, data.n_eval={cfg.n_eval}; expected positive counts')
  try:
    spec = scenes.SceneSpec(image_size=cfg.image_size, grid=cfg.grid, max_objects=cfg.max_objects,
                            digit_fraction=cfg.digit_fraction,
                            holdout=image_text.holdout_pairs(cfg.holdout), seed=cfg.seed)
  except ValueError as e:
    raise ConfigError(f'config.data: {e}') from None
  tokenizer = WordTokenizer(captions.vocabulary(), cfg.n_tiles)
  train_ids, eval_ids = (np.concatenate(documents(spec, split, n, cfg.seed, tokenizer))
                         for split, n in (('train', cfg.n_train), ('test', cfg.n_eval)))
  multiple = config.model.get('vocab_multiple', 1)
  return Dataset(
      make_train_iter=lambda: text_windows.train_windows(train_ids, cfg.block_size, batch,
                                                         config.seed),
      eval_batches=text_windows.eval_windows(eval_ids, cfg.block_size, batch, cfg.eval_batches),
      config_updates={'model.vocab_size': -(-tokenizer.vocab_size // multiple) * multiple},
      encode=tokenizer.encode, decode=tokenizer.decode)
