"""Interleaved image-text layout: the scatter of image embeddings into the placeholder positions
(values and gradients), the count check, the answer-only loss mask against a token-by-token
NumPy scan, and block-causal attention (bidirectional within an image) against a float64 NumPy
softmax with the mask written out, values and gradients, on two backends."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lab.kernels.flash_attention import reference
from lab.models import vlm_layout as vl
from oracles import assert_vjp_matches_oracle

IMG, START, END = 3, 1, 2  # placeholder, answer start, answer end ids

jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


def draw_ids(rng, B, T, p_image=0.4):
  """Text ids in 4..9, with runs of image placeholders."""
  ids = rng.integers(4, 10, (B, T))
  ids[rng.random((B, T)) < p_image] = IMG
  return ids


# ------------------------------------------------------------------ scatter


def np_merge(text_BTD, image_MD, ids_BT):
  out, k = text_BTD.copy(), 0
  for b in range(ids_BT.shape[0]):
    for t in range(ids_BT.shape[1]):
      if ids_BT[b, t] == IMG:
        out[b, t], k = image_MD[k], k + 1
  assert k == len(image_MD)
  return out


@pytest.mark.parametrize('seed', range(3))
def test_merge_places_image_rows_at_placeholders(seed):
  rng = np.random.default_rng(seed)
  ids = draw_ids(rng, 2, 13)
  M = int((ids == IMG).sum())
  text, image = rng.standard_normal((2, 13, 5)), rng.standard_normal((M, 5))
  index = vl.image_token_index(ids, IMG, M)
  assert index.dtype == np.int32 and sorted(index[index >= 0].tolist()) == list(range(M))
  got = jit(vl.merge_image_embeddings)(jnp.asarray(text, jnp.float32),
                                       jnp.asarray(image, jnp.float32), index)
  np.testing.assert_array_equal(got, np_merge(text, image, ids).astype(np.float32))


def test_merge_accepts_tiles_and_keeps_text_dtype():
  rng = np.random.default_rng(4)
  ids = np.array([[5, IMG, IMG, 6, IMG, IMG, IMG, IMG, 7]])
  tiles_ITD = rng.standard_normal((3, 2, 4))  # 3 tiles of 2 tokens
  text = jnp.asarray(rng.standard_normal((1, 9, 4)), jnp.bfloat16)
  got = vl.merge_image_embeddings(text, jnp.asarray(tiles_ITD, jnp.float32),
                                  vl.image_token_index(ids, IMG, 6))
  assert got.dtype == jnp.bfloat16
  want = np_merge(np.asarray(text, np.float64), tiles_ITD.reshape(6, 4), ids)
  np.testing.assert_array_equal(np.asarray(got, np.float64),
                                np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64))


def test_merge_gradients(x64):
  rng = np.random.default_rng(5)
  ids = draw_ids(rng, 2, 7)
  M = int((ids == IMG).sum())
  index = jnp.asarray(vl.image_token_index(ids, IMG, M))
  text, image = rng.standard_normal((2, 7, 3)), rng.standard_normal((M, 3))
  check_grads(lambda t, i: vl.merge_image_embeddings(t, i, index), (text, image), order=1,
              modes=['rev'])
  ct = rng.standard_normal((2, 7, 3))
  g_text, g_image = jax.grad(lambda t, i: jnp.vdot(ct, vl.merge_image_embeddings(t, i, index)),
                             argnums=(0, 1))(text, image)
  is_image = ids == IMG
  np.testing.assert_array_equal(g_text, np.where(is_image[..., None], 0.0, ct))
  np.testing.assert_array_equal(g_image, ct[is_image])


def test_count_mismatch_error_names_both():
  ids = np.array([[5, IMG, IMG, 6], [IMG, 7, 8, 9]])
  with pytest.raises(ValueError, match='hold 3 image placeholders .id 3. but the connector gave '
                     '4 image tokens'):
    vl.image_token_index(ids, IMG, 4)
  with pytest.raises(ValueError, match='width 6; expected the text embedding width 4'):
    vl.merge_image_embeddings(jnp.zeros((2, 4, 4)), jnp.zeros((3, 6)), jnp.zeros((2, 4), int))


# ------------------------------------------------------------------ loss mask


def np_answer_mask(ids_BT):
  """Token by token: inside an answer after START; END is the answer's last token."""
  mask = np.zeros(ids_BT.shape, bool)
  for b in range(ids_BT.shape[0]):
    inside = False
    for t, tok in enumerate(ids_BT[b]):
      if tok == START:
        inside = True
      elif tok == END:
        mask[b, t], inside = inside, False
      else:
        mask[b, t] = inside
  return mask


def test_answer_mask_multi_turn_example():
  # [img img] question START answer answer END question START answer END pad pad
  ids = np.array([[IMG, IMG, 7, START, 8, 9, END, 7, START, 9, END, 0, 0]])
  want = [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]
  assert vl.answer_mask(jnp.asarray(ids), START, END)[0].astype(int).tolist() == want


@pytest.mark.parametrize('seed', range(3))
def test_answer_mask_matches_scan(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 8, (4, 40))  # markers 1, 2 frequent, unbalanced on purpose
  got = jit(vl.answer_mask, static_argnums=(1, 2))(jnp.asarray(ids), START, END)
  np.testing.assert_array_equal(got, np_answer_mask(ids))


# ------------------------------------------------------------------ attention


def np_blocks(ids_BT, seg_BT):
  block = np.zeros(ids_BT.shape, int)
  for b in range(ids_BT.shape[0]):
    for t in range(1, ids_BT.shape[1]):
      same_run = ids_BT[b, t] == IMG == ids_BT[b, t - 1] and seg_BT[b, t] == seg_BT[b, t - 1]
      block[b, t] = block[b, t - 1] + (0 if same_run else 1)
  return block


def np_mask(ids_BT, seg_BT):
  """t sees s iff same segment and (s <= t or both in one run of image tokens)."""
  B, T = ids_BT.shape
  mask = np.zeros((B, T, T), bool)
  for b in range(B):
    for t in range(T):
      for s in range(T):
        run = all(ids_BT[b, u] == IMG and seg_BT[b, u] == seg_BT[b, t]
                  for u in range(min(s, t), max(s, t) + 1))
        mask[b, t, s] = seg_BT[b, s] == seg_BT[b, t] and (s <= t or run)
  return mask


def np_attention(q, k, v, mask):
  B, T, N, H = q.shape
  K = k.shape[2]
  o = np.zeros((B, T, N, v.shape[-1]))
  for n in range(N):
    s = np.einsum('BTH,BSH->BTS', q[:, :, n], k[:, :, n // (N // K)]) / math.sqrt(H)
    s = np.where(mask, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    o[:, :, n] = np.einsum('BTS,BSG->BTG', w / w.sum(-1, keepdims=True), v[:, :, n // (N // K)])
  return o


def draw_segments(rng, B, T):
  return np.sort(rng.integers(0, 3, (B, T)), axis=1)


@pytest.mark.parametrize('seed', range(3))
def test_blocks_and_mask_match_definition(seed):
  rng = np.random.default_rng(seed)
  ids, seg = draw_ids(rng, 2, 11, 0.6), draw_segments(rng, 2, 11)
  block = vl.attention_blocks(jnp.asarray(ids), IMG, jnp.asarray(seg))
  np.testing.assert_array_equal(block, np_blocks(ids, seg))
  np.testing.assert_array_equal(vl.block_causal_mask(block, jnp.asarray(seg)), np_mask(ids, seg))
  # Blocks of one token each give flash_attention's causal mask with segment ids.
  arange = jnp.broadcast_to(jnp.arange(11), (2, 11))
  np.testing.assert_array_equal(vl.block_causal_mask(arange, jnp.asarray(seg)),
                                reference.attention_mask(11, 11, True, seg, seg))


@pytest.mark.parametrize('backend', ['reference', 'xla'])
@pytest.mark.parametrize('segments', [False, True])
def test_image_block_attention_matches_masked_softmax(backend, segments):
  rng = np.random.default_rng(int(segments))
  B, T, N, K, H, G = 2, 12, 4, 2, 8, 6
  ids = draw_ids(rng, B, T, 0.6)
  seg = draw_segments(rng, B, T) if segments else np.zeros((B, T), int)
  q, k, v = (rng.standard_normal(s) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, G)))
  block = vl.attention_blocks(jnp.asarray(ids), IMG, jnp.asarray(seg) if segments else None)
  fn = jit(functools.partial(vl.image_block_attention, backend=backend))
  got = fn(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), block,
           jnp.asarray(seg) if segments else None)
  want = np_attention(q, k, v, np_mask(ids, seg))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_image_block_attention_single_token():
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 1, 2, 4)), jnp.float32) for _ in range(3))
  got = jit(functools.partial(vl.image_block_attention, backend='reference'))(
      q, k, v, jnp.zeros((1, 1), jnp.int32))
  np.testing.assert_allclose(got, v, rtol=1e-6)


def test_image_block_attention_gradients_match_oracle():
  rng = np.random.default_rng(8)
  ids = np.array([[5, IMG, IMG, IMG, 6, 7, IMG, IMG]])
  seg = np.array([[0, 0, 0, 0, 0, 1, 1, 1]])  # a segment starts at t = 5: no A part there
  q, k, v = (rng.standard_normal(s) for s in ((1, 8, 2, 2), (1, 8, 1, 2), (1, 8, 1, 2)))
  block = vl.attention_blocks(jnp.asarray(ids), IMG, jnp.asarray(seg))
  mask = np_mask(ids, seg)
  assert_vjp_matches_oracle(
      lambda q, k, v: vl.image_block_attention(q, k, v, block, jnp.asarray(seg),
                                               backend='xla'),
      lambda q, k, v: np_attention(q, k, v, mask), (q, k, v), rng)
