"""Character- or byte-level text for language models.

config.data: source ('python_docs' | 'tfds'), tfds_name, data_dir, tokenizer ('char' | 'byte'),
block_size, val_fraction (python_docs only; TFDS text has its own validation split),
eval_batches.
"""
from __future__ import annotations

from lab.config import ConfigError
from lab.data import corpora, text_windows, tokenizers
from lab.data.dataset import Dataset


def _texts(cfg) -> tuple[str, str]:
  if cfg.source == 'python_docs':
    return corpora.split_text(corpora.python_docs(), cfg.val_fraction)
  if cfg.source == 'tfds':
    return (corpora.tfds_text(cfg.tfds_name, 'train', cfg.data_dir),
            corpora.tfds_text(cfg.tfds_name, 'validation', cfg.data_dir))
  raise ConfigError(f'data.source={cfg.source!r}; expected "python_docs" or "tfds"')


def _round_up(n: int, multiple: int) -> int:
  """Vocab padded for vocab-parallel sharding (as nanoGPT pads GPT-2's 50257 to 50304); the
  extra ids never occur in the data, so training pushes their logits down."""
  return -(-n // multiple) * multiple


def build(config) -> Dataset:
  cfg = config.data
  train_text, val_text = _texts(cfg)
  tokenizer = tokenizers.make(cfg.tokenizer, train_text, val_text)
  train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
  batch = config.train.batch_size
  return Dataset(
      make_train_iter=lambda: text_windows.train_windows(train_ids, cfg.block_size, batch,
                                                         config.seed),
      eval_batches=text_windows.eval_windows(val_ids, cfg.block_size, batch, cfg.eval_batches),
      config_updates={'model.vocab_size': _round_up(tokenizer.vocab_size,
                                                    config.model.get('vocab_multiple', 1))},
      encode=tokenizer.encode, decode=tokenizer.decode)
