"""BLIP retrieval: recall from a score matrix against hand-made rankings and against
lab.eval.zero_shot on cosine scores; ITM re-scoring touches exactly each row's and column's k
most similar candidates, with the ITM match logit plus the similarity computed pair by pair."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lab.eval import blip_retrieval
from lab.eval.zero_shot import retrieval_recall
from lab.models import blip
from lab.nn import param_spec as ps


def test_recall_from_scores_by_hand():
  score = np.array([[0.9, 0.1, 0.0],    # rows: image 0's text ranks 1st, image 1's 2nd,
                    [0.8, 0.5, 0.1],    # image 2's 3rd; columns: text 0's image 1st,
                    [0.7, 0.6, 0.2]])   # text 1's 2nd (below image 2), text 2's 1st
  got = blip_retrieval.recall_from_scores(score, (1, 2))
  assert got == {'i2t_recall@1': 1 / 3, 't2i_recall@1': 2 / 3, 'i2t_recall@2': 2 / 3,
                 't2i_recall@2': 1.0}
  tie = blip_retrieval.recall_from_scores(np.ones((2, 2)), (1,))  # ties count against the pair
  assert tie == {'i2t_recall@1': 0.0, 't2i_recall@1': 0.0}


def test_recall_from_cosine_scores_equals_zero_shot_recall():
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((20, 5)), rng.standard_normal((20, 5))
  img_n = img / np.linalg.norm(img, axis=1, keepdims=True)
  txt_n = txt / np.linalg.norm(txt, axis=1, keepdims=True)
  want = retrieval_recall(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), (1, 5))
  got = blip_retrieval.recall_from_scores(img_n @ txt_n.T, (1, 5))
  assert got == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-6)


def test_itm_scores_rescore_the_top_k_candidates():
  cfg = ml_collections.ConfigDict(dict(
      image_size=16, channels=3, vocab_size=12, max_len=5, embed_dim=4,
      attention_backend='reference',
      vision=dict(patch_size=8, d_model=8, n_layers=1, n_heads=2, mlp_dim=8),
      text=dict(d_model=8, n_layers=1, n_heads=2, mlp_dim=8)))
  params = ps.init(blip.param_specs(cfg), jax.random.key(0))
  rng = np.random.default_rng(1)
  N, k = 6, 2
  tokens = rng.integers(5, 12, (N, 5)).astype(np.int32)
  batches = [{'image': rng.standard_normal((3, 16, 16, 3)).astype(np.float32),
              'tokens': tokens[i:i + 3], 'mask': np.ones((3, 5), np.int32)} for i in (0, 3)]
  emb = blip_retrieval.embed(cfg, params, batches)
  i2t, t2i = blip_retrieval.itm_scores(cfg, params, emb, k, chunk=4)
  sim = emb['img_NJ'] @ emb['txt_NJ'].T
  logit = jax.jit(lambda t, m, i: blip.itm_logits(cfg, params, t, m, i)[:, 1])
  for b in range(N):
    top = np.argsort(-sim[b])[:k]
    assert set(np.flatnonzero(np.isfinite(i2t[b]))) == set(top)
    want = np.asarray(logit(tokens[top], np.ones((k, 5), np.int32), emb['img_NSW'][[b] * k]))
    np.testing.assert_allclose(i2t[b, top], want + sim[b, top], rtol=1e-5, atol=1e-5)
    top = np.argsort(-sim[:, b])[:k]
    assert set(np.flatnonzero(np.isfinite(t2i[:, b]))) == set(top)
    want = np.asarray(logit(tokens[[b] * k], np.ones((k, 5), np.int32), emb['img_NSW'][top]))
    np.testing.assert_allclose(t2i[top, b], want + sim[top, b], rtol=1e-5, atol=1e-5)
  out = blip_retrieval.evaluate(cfg, params, batches, (1,), rerank=k)
  assert set(out) == {'i2t_recall@1', 't2i_recall@1', 'itm_i2t_recall@1', 'itm_t2i_recall@1'}
