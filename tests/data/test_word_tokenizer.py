"""The word tokenizer: splitting, special ids, round trips, padding and masks, unknown words."""
import numpy as np
import pytest

from lab.data.word_tokenizer import SPECIALS, WordTokenizer, split_words

WORDS = ('a', 'red', 'circle', 'and', 'two', 'blue', 'squares', '.', ',', '?', 'is', 'there')


def test_split_lowercases_and_splits_punctuation():
  assert split_words('A Red circle, two  BLUE squares.') == ['a', 'red', 'circle', ',', 'two',
                                                             'blue', 'squares', '.']
  assert split_words('<image><image> is there a 7?') == ['<image>', '<image>', 'is', 'there',
                                                        'a', '7', '?']


def test_special_ids_and_vocab_order():
  tok = WordTokenizer(WORDS + ('red',), n_tiles=3)  # duplicates ignored
  assert tok.tokens[:7] == ('<pad>', '<bos>', '<eos>', '<sep>', '<unk>', '<image>', '<row_end>')
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
  assert tok.tokens[tok.image_id] == '<image>' and tok.tokens[tok.row_end_id] == '<row_end>'
  assert [tok.tokens[tok.tile_id(k)] for k in (1, 2, 3)] == ['<tile_1>', '<tile_2>', '<tile_3>']
  assert tok.tile_ids == tuple(tok.tile_id(k) for k in (1, 2, 3))
  assert WordTokenizer(WORDS, n_tiles=0).tile_ids == ()
  assert tok.vocab_size == len(SPECIALS) + 3 + len(WORDS)
  assert list(tok.tokens[tok.n_special:]) == sorted(WORDS)
  with pytest.raises(ValueError, match='tile 4'):
    tok.tile_id(4)


def test_round_trip_with_bos_eos_and_specials_in_text():
  tok = WordTokenizer(WORDS, n_tiles=2)
  text = 'is there a red circle, and two blue squares?'
  ids = tok.encode(text, bos=True, eos=True)
  assert ids.dtype == np.int32 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  want = [tok.tokens.index(w) for w in split_words(text)]
  np.testing.assert_array_equal(ids[1:-1], want)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode('A  RED circle .')) == 'a red circle.'
  with_image = tok.encode('<image> <tile_2> a circle')
  np.testing.assert_array_equal(with_image[:2], [tok.image_id, tok.tile_id(2)])
  assert tok.decode(with_image) == 'a circle'
  assert tok.decode(with_image, skip_special=False) == '<image> <tile_2> a circle'


def test_unknown_words_become_unk_and_decode_stops_at_eos():
  tok = WordTokenizer(WORDS)
  ids = tok.encode('a green circle <foo>')
  np.testing.assert_array_equal(ids, [tok.tokens.index('a'), tok.unk_id,
                                      tok.tokens.index('circle'), tok.unk_id])
  assert tok.decode(ids) == 'a <unk> circle <unk>'
  tail = np.concatenate([tok.encode('a circle', eos=True), tok.encode('two squares')])
  assert tok.decode(tail) == 'a circle'
  with pytest.raises(ValueError, match='token id 99'):
    tok.decode([99])


def test_encode_batch_pads_with_masks_and_refuses_to_cut():
  tok = WordTokenizer(WORDS)
  texts = ['a red circle.', 'two blue squares, and a circle.', '']
  ids_BT, mask_BT = tok.encode_batch(texts, length=12)
  assert ids_BT.shape == mask_BT.shape == (3, 12) and ids_BT.dtype == mask_BT.dtype == np.int32
  lengths = [len(split_words(t)) + 2 for t in texts]
  np.testing.assert_array_equal(mask_BT.sum(1), lengths)
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(mask_BT[b], np.arange(12) < n)
    assert (ids_BT[b, n:] == tok.pad_id).all() and (ids_BT[b, :n] != tok.pad_id).all()
    assert tok.decode(ids_BT[b]) == tok.decode(tok.encode(texts[b]))
  with pytest.raises(ValueError, match='of 10 tokens exceeds length=8'):
    tok.encode_batch(texts, length=8)


@pytest.mark.parametrize('words,match', [(('red circle',), 'red circle'), (('<pad>',), '<pad>'),
                                         (('Red',), 'Red')])
def test_bad_vocabulary_is_an_error(words, match):
  with pytest.raises(ValueError, match=match):
    WordTokenizer(words)
