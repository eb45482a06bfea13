"""Tokenizers, corpora and checkpointable text windows."""
import numpy as np
import pytest

from lab.config import ConfigError
from lab.data import corpora, text_windows, tokenizers


def test_char_tokenizer_round_trip_and_unknown_char():
  tok = tokenizers.CharTokenizer.from_text('hello world', 'dlrow!')
  assert tok.chars == ' !dehlorw' and tok.vocab_size == 9
  ids = tok.encode('hello world!')
  assert ids.dtype == np.int32 and tok.decode(ids) == 'hello world!'
  with pytest.raises(ValueError, match="'z'"):
    tok.encode('z')


def test_byte_tokenizer_round_trip_unicode():
  tok = tokenizers.ByteTokenizer()
  text = 'naïve — ünïcödé ✓'
  ids = tok.encode(text)
  assert ids.max() < 256 and len(ids) == len(text.encode())
  assert tok.decode(ids) == text


def test_python_docs_corpus_is_real_text():
  text = corpora.python_docs()
  assert len(text) > 300_000 and 'def ' in text and 'exception' in text


def test_tiny_shakespeare_from_shared_tfds(tfds_dir):
  train = corpora.tfds_text('tiny_shakespeare', 'train', tfds_dir)
  val = corpora.tfds_text('tiny_shakespeare', 'validation', tfds_dir)
  assert (len(train), len(val)) == (1_003_854, 55_770)
  assert train.startswith('First Citizen:')


def test_missing_tfds_dataset_names_the_dir(tmp_path):
  with pytest.raises(ConfigError, match=str(tmp_path)):
    corpora.tfds_text('no_such', 'train', str(tmp_path))


def test_train_windows_are_contiguous_and_resume_exactly():
  stream = np.arange(1000, dtype=np.int32) * 7
  it = text_windows.train_windows(stream, block_size=16, batch_size=4, seed=3)
  first = [next(it)['tokens'] for _ in range(5)]
  for batch in first:
    assert batch.shape == (4, 17)
    np.testing.assert_array_equal(np.diff(batch, axis=1), 7)  # one contiguous slice per row
  state = it.get_state()
  after = [next(it)['tokens'] for _ in range(3)]
  fresh = text_windows.train_windows(stream, block_size=16, batch_size=4, seed=3)
  fresh.set_state(state)
  for a in after:
    np.testing.assert_array_equal(next(fresh)['tokens'], a)
  other_seed = text_windows.train_windows(stream, block_size=16, batch_size=4, seed=4)
  assert not np.array_equal(next(other_seed)['tokens'], first[0])


def test_eval_windows_tile_the_stream():
  stream = np.arange(200, dtype=np.int32)
  batches = text_windows.eval_windows(stream, block_size=10, batch_size=4, n_batches=3)
  rows = np.concatenate([b['tokens'] for b in batches])
  assert rows.shape == (12, 11)
  np.testing.assert_array_equal(rows[:, 0], np.arange(12) * 10)
