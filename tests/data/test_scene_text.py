"""lab.data.scene_text: each document re-derived from the scene's objects and its own random
stream; training text never names a held-out pair; LM windows of the stream."""
import ml_collections
import numpy as np

from lab.data import captions, scene_text, scenes
from lab.data.word_tokenizer import WordTokenizer

SPEC = scenes.SceneSpec(image_size=32, grid=3, max_objects=4, digit_fraction=0.3,
                        holdout=(('red', 'circle'), ('blue', 'square')), seed=3)
TOKENIZER = WordTokenizer(captions.vocabulary(), 0)


def test_documents_are_caption_question_sep_answer():
  docs = scene_text.documents(SPEC, 'train', 40, 3, TOKENIZER)
  layout = scenes.layout(SPEC, 'train', np.arange(40))
  for i, doc in enumerate(docs):
    rng = np.random.default_rng((3, 0, i, 4))
    objects = layout.objects(i)
    caption = captions.caption(objects, rng)
    question, answer = captions.question(objects, rng, scenes.split_pairs(SPEC, 'train'))
    words = [TOKENIZER.tokens[t] for t in doc]
    assert words == (['<bos>'] + [TOKENIZER.tokens[t] for t in TOKENIZER.encode(caption)]
                     + [TOKENIZER.tokens[t] for t in TOKENIZER.encode(question)]
                     + ['<sep>', answer, '<eos>'])
    assert answer in captions.ANSWERS


def test_training_text_never_names_a_held_out_pair():
  text = ' '.join(TOKENIZER.decode(d) for d in scene_text.documents(SPEC, 'train', 300, 3,
                                                                      TOKENIZER))
  assert 'red circle' not in text and 'blue square' not in text
  assert 'red square' in text and 'blue circle' in text  # the seen pairs do occur


def test_build_cuts_windows_of_the_stream():
  config = ml_collections.ConfigDict(dict(
      seed=0, train=dict(batch_size=4), model=dict(vocab_size=0, vocab_multiple=8),
      data=dict(name='scene_text', seed=3, image_size=32, grid=3, max_objects=4,
                digit_fraction=0.3, holdout=('red circle', 'blue square'), n_tiles=0,
                n_train=30, n_eval=20, block_size=16, eval_batches=2)))
  data = scene_text.build(config)
  assert data.config_updates == {'model.vocab_size': -(-TOKENIZER.vocab_size // 8) * 8}
  train = next(data.make_train_iter())['tokens']
  assert train.shape == (4, 17)
  stream = np.concatenate(scene_text.documents(SPEC, 'train', 30, 3, TOKENIZER))
  starts = [next(s for s in range(len(stream) - 16) if (stream[s:s + 17] == w).all())
            for w in train]
  assert len(starts) == 4
  evals = np.concatenate(scene_text.documents(SPEC, 'test', 20, 3, TOKENIZER))
  np.testing.assert_array_equal(data.eval_batches[0]['tokens'][0], evals[:17])
