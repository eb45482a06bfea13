"""Character and byte tokenizers: text <-> int32 ids."""
from __future__ import annotations

import numpy as np


class CharTokenizer:
  """One id per distinct character of the corpus, in sorted order (nanoGPT's shakespeare_char)."""

  def __init__(self, chars: str):
    self.chars = ''.join(sorted(set(chars)))
    self._index = {c: i for i, c in enumerate(self.chars)}

  @classmethod
  def from_text(cls, *texts: str) -> CharTokenizer:
    return cls(''.join(set().union(*map(set, texts))))

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._index[c] for c in text), np.int32, len(text))
    except KeyError as e:
      raise ValueError(f'character {e.args[0]!r} is not in the tokenizer vocabulary') from None

  def decode(self, ids) -> str:
    """Ids past the vocabulary (padding ids of a padded model vocab) decode as U+FFFD."""
    n = len(self.chars)
    return ''.join(self.chars[i] if i < n else '\ufffd' for i in map(int, ids))


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; any text encodes, decoding replaces broken sequences."""
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode('utf-8', errors='replace')


def make(name: str, *texts: str):
  if name == 'char':
    return CharTokenizer.from_text(*texts)
  if name == 'byte':
    return ByteTokenizer()
  raise ValueError(f'tokenizer={name!r}; expected "char" or "byte"')
