"""Zero-shot classification (CLIP sec. 3.1.4) and retrieval recall@K against NumPy: template
averaging, accuracy on planted embeddings, and recall@K by brute-force ranking."""
import jax.numpy as jnp
import numpy as np
import pytest

from lab.eval import zero_shot


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_class_embeddings(txt_LMD):
  """CLIP's prompt ensemble: for each class, the mean of its normalised prompt embeddings,
  normalised again."""
  return np.stack([np_normalize(np.mean([np_normalize(e) for e in prompts], axis=0))
                   for prompts in txt_LMD])


def np_recall(img_BD, txt_TD, owner_T, k):
  """Brute force: sort every row of cosine similarities and look for a match in the first k."""
  s = np_normalize(img_BD) @ np_normalize(txt_TD).T
  i2t = [any(owner_T[t] == b for t in np.argsort(-s[b])[:k]) for b in range(len(img_BD))]
  t2i = [owner_T[t] in np.argsort(-s[:, t])[:k] for t in range(len(txt_TD))]
  return np.mean(i2t), np.mean(t2i)


def test_prompts_fill_every_template_per_class():
  got = zero_shot.prompts(['cat', 'dog'], ['a photo of a {}.', 'a drawing of a {}.'])
  assert got == [['a photo of a cat.', 'a drawing of a cat.'],
                 ['a photo of a dog.', 'a drawing of a dog.']]
  with pytest.raises(ValueError, match="one '{}'"):
    zero_shot.prompts(['cat'], ['a photo'])


@pytest.mark.parametrize('seed', range(3))
def test_class_embeddings_average_normalised_templates(seed):
  """Templates with very different norms: the mean is over unit vectors, not raw embeddings."""
  rng = np.random.default_rng(seed)
  txt_LMD = rng.standard_normal((5, 4, 8)) * rng.uniform(0.1, 10.0, (5, 4, 1))
  got_LD = zero_shot.class_embeddings(jnp.asarray(txt_LMD, jnp.float32))
  np.testing.assert_allclose(got_LD, np_class_embeddings(txt_LMD), rtol=1e-5, atol=1e-6)
  raw_mean = np_normalize(txt_LMD.mean(1))
  assert np.abs(np.asarray(got_LD) - raw_mean).max() > 1e-2


def test_accuracy_on_planted_embeddings():
  """Images planted near their class embedding (classes orthogonal), with 3 of 12 labelled with
  a wrong class: top-1 accuracy 9/12; top-2 counts a wrong label only if it is the runner-up."""
  rng = np.random.default_rng(0)
  L, D = 4, 6
  cls_LD = np.eye(L, D)
  true_B = np.arange(12) % L
  img_BD = 3.0 * cls_LD[true_B] + 0.1 * rng.standard_normal((12, D))
  labels_B = true_B.copy()
  labels_B[[1, 5, 10]] = (true_B[[1, 5, 10]] + 1) % L
  args = (jnp.asarray(img_BD, jnp.float32), jnp.asarray(cls_LD, jnp.float32))
  np.testing.assert_array_equal(zero_shot.predict(*args), true_B)
  assert float(zero_shot.accuracy(*args, jnp.asarray(labels_B))) == pytest.approx(9 / 12)
  s_BL = np_normalize(img_BD) @ cls_LD.T
  runner_up_B = np.argsort(-s_BL, axis=1)[:, 1]
  want_top2 = np.mean((labels_B == true_B) | (labels_B == runner_up_B))
  assert float(zero_shot.accuracy(*args, jnp.asarray(labels_B), k=2)) == pytest.approx(want_top2)
  assert float(zero_shot.accuracy(*args, jnp.asarray(labels_B), k=L)) == 1.0


@pytest.mark.parametrize('seed', range(3))
def test_predict_is_argmax_cosine(seed):
  """Class embeddings of unequal norms: the prediction is by cosine, not by dot product."""
  rng = np.random.default_rng(seed)
  img_BD, cls_LD = rng.standard_normal((20, 5)), rng.standard_normal((7, 5))
  cls_LD *= rng.uniform(0.1, 10.0, (7, 1))
  got_B = zero_shot.predict(jnp.asarray(img_BD, jnp.float32), jnp.asarray(cls_LD, jnp.float32))
  np.testing.assert_array_equal(got_B, np.argmax(np_normalize(img_BD) @ np_normalize(cls_LD).T, 1))
  assert np.any(got_B != np.argmax(img_BD @ cls_LD.T, 1))


@pytest.mark.parametrize('captions', [1, 3])
@pytest.mark.parametrize('seed', range(2))
def test_recall_at_k_matches_brute_force(seed, captions):
  """B = 10 images with 1 or 3 noisy captions each (shuffled), recall@{1, 3, 5} both ways."""
  rng = np.random.default_rng(seed)
  B, D = 10, 6
  img_BD = rng.standard_normal((B, D))
  owner_T = rng.permutation(np.repeat(np.arange(B), captions))
  txt_TD = img_BD[owner_T] + 1.2 * rng.standard_normal((len(owner_T), D))
  ks = (1, 3, 5)
  got = zero_shot.retrieval_recall(jnp.asarray(img_BD, jnp.float32),
                                   jnp.asarray(txt_TD, jnp.float32), ks,
                                   None if captions == 1 else owner_T)
  assert sorted(got) == sorted(f'{d}_recall@{k}' for d in ('i2t', 't2i') for k in ks)
  for k in ks:
    i2t, t2i = np_recall(img_BD, txt_TD, owner_T if captions > 1 else np.arange(B), k)
    assert float(got[f'i2t_recall@{k}']) == pytest.approx(i2t), k
    assert float(got[f't2i_recall@{k}']) == pytest.approx(t2i), k
  assert 0 < float(got['t2i_recall@1']) < 1


def test_bad_inputs_raise():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=r'expected \[L, M, D\]'):
    zero_shot.class_embeddings(x)
  with pytest.raises(ValueError, match='k=5'):
    zero_shot.accuracy(x, x, jnp.zeros(4, jnp.int32), k=5)
  with pytest.raises(ValueError, match='ks=\\(1, 5\\)'):
    zero_shot.retrieval_recall(x, x, ks=(1, 5))
  with pytest.raises(ValueError, match='some image has no text'):
    zero_shot.retrieval_recall(x, x, ks=(1,), image_of_text_T=[0, 0, 1, 2])
  with pytest.raises(ValueError, match=r'in \[0, 4\)'):
    zero_shot.retrieval_recall(x, x, ks=(1,), image_of_text_T=[0, 1, 2, 4])
  with pytest.raises(ValueError, match='same D'):
    zero_shot.predict(x, jnp.ones((2, 5)))
