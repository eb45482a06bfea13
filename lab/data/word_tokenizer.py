"""A word-level tokenizer over a closed vocabulary, with the special tokens of image-text models.

Text is lower-cased and split into words ([a-z0-9]+), single punctuation marks and special
tokens written as <name>. Ids: <pad> = 0, <bos>, <eos>, <sep>, <unk>, then the image
placeholders <image> and <row_end>, the tile markers <tile_1> .. <tile_n>, then the vocabulary
in sorted order. A VLM sequence puts one <image> where each of its connector's image embeddings
goes (LLaVA, Liu et al. 2023, arXiv:2304.08485); a tiled image tags each tile's tokens with a
<tile_k> marker (NVLM's 1-D tile tags, Dai et al. 2024, arXiv:2409.11402) and ends each row of
tiles with <row_end>. lab.data.tiling.image_token_layout writes such layouts from image_id,
tile_ids and row_end_id.

Letters: B texts, T tokens.
"""
from __future__ import annotations

import re

import numpy as np

SPECIALS = ('<pad>', '<bos>', '<eos>', '<sep>', '<unk>', '<image>', '<row_end>')
_TOKEN = re.compile(r'<[a-z0-9_]+>|[a-z0-9]+|[^\sa-z0-9]')
_NO_SPACE_BEFORE = frozenset('.,?!:;')


def split_words(text: str) -> list[str]:
  """'A red circle, two squares.' -> ['a', 'red', 'circle', ',', 'two', 'squares', '.']."""
  return _TOKEN.findall(text.lower())


class WordTokenizer:
  """Word ids over `words` (any order, duplicates ignored), with n_tiles tile markers."""

  def __init__(self, words, n_tiles: int = 4):
    if n_tiles < 0:
      raise ValueError(f'n_tiles={n_tiles}; expected >= 0')
    specials = SPECIALS + tuple(f'<tile_{k}>' for k in range(1, n_tiles + 1))
    vocab = sorted(set(words))
    for w in vocab:
      if split_words(w) != [w] or w in specials:
        raise ValueError(f'vocabulary word {w!r}; expected one lower-case word or punctuation '
                         'mark that is not a special token')
    self.tokens = specials + tuple(vocab)
    self.n_tiles, self.n_special = n_tiles, len(specials)
    self._index = {t: i for i, t in enumerate(self.tokens)}
    self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.unk_id = range(5)
    self.image_id, self.row_end_id = 5, 6

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  def tile_id(self, k: int) -> int:
    """The id of <tile_k>, k = 1..n_tiles."""
    if not 1 <= k <= self.n_tiles:
      raise ValueError(f'tile {k}; expected 1..{self.n_tiles} (the tokenizer\'s n_tiles)')
    return len(SPECIALS) + k - 1

  @property
  def tile_ids(self) -> tuple[int, ...]:
    """The ids of <tile_1> .. <tile_n>, in order (tile_ids of lab.data.tiling's layouts)."""
    return tuple(range(len(SPECIALS), self.n_special))

  def encode(self, text: str, bos: bool = False, eos: bool = False) -> np.ndarray:
    """int32[T] ids of the words of `text`; words outside the vocabulary become <unk>."""
    ids = [self._index.get(w, self.unk_id) for w in split_words(text)]
    return np.array([self.bos_id] * bos + ids + [self.eos_id] * eos, np.int32)

  def decode(self, ids, skip_special: bool = True) -> str:
    """Text of `ids`, stopping at the first <eos>; with skip_special, special tokens (<pad>,
    <bos>, <sep>, image tokens ...) are left out, except <unk>. No space before punctuation."""
    out = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if not 0 <= i < self.vocab_size:
        raise ValueError(f'token id {i}; expected 0..{self.vocab_size - 1}')
      if skip_special and i < self.n_special and i != self.unk_id:
        continue
      word = self.tokens[i]
      out.append(word if not out or word not in _NO_SPACE_BEFORE else out.pop() + word)
    return ' '.join(out)

  def pad(self, sequences, length: int):
    """(ids int32[B, length], mask int32[B, length]): each sequence followed by <pad>, mask 1 on
    its own tokens. A sequence longer than `length` is an error, never cut."""
    longest = max(map(len, sequences), default=0)
    if longest > length:
      raise ValueError(f'a sequence of {longest} tokens exceeds length={length}')
    ids_BT = np.full((len(sequences), length), self.pad_id, np.int32)
    mask_BT = np.zeros((len(sequences), length), np.int32)
    for b, seq in enumerate(sequences):
      ids_BT[b, :len(seq)], mask_BT[b, :len(seq)] = seq, 1
    return ids_BT, mask_BT

  def encode_batch(self, texts, length: int, bos: bool = True, eos: bool = True):
    """(ids int32[B, length], mask int32[B, length]) of <bos> text <eos> each, padded."""
    return self.pad([self.encode(t, bos, eos) for t in texts], length)
