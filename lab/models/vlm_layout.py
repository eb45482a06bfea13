"""Interleaved image-text sequences: image embeddings into the text embeddings, the answer-only loss
mask, and the attention pattern.

Merging follows LLaVA (Liu et al. 2023, arXiv 2304.08485) and InternVL 1.5 (Chen et al. 2024,
arXiv 2404.16821): the tokenizer writes one placeholder id per image token (image_token_layout in
lab.data.tiling), and the connector outputs of all images, in order, replace the placeholders'
text embeddings: input_embeds[ids == image_id] = image_embeds (row-major over batch, then time).
Loss is taken on answer tokens only, as LLaVA's instruction tuning does (sec. 4.2, eq. 3).

Attention is causal over the whole sequence (LLaVA, InternVL, Qwen-VL). Optionally the tokens of
one image attend to each other bidirectionally (Gemma 3, Gemma Team 2025, arXiv 2503.19786;
PaliGemma's prefix, Beyer et al. 2024, arXiv 2407.07726): each maximal run of placeholders is
one block, every text token its own block, and t sees s iff block[s] <= block[t] (PaliGemma's
make_attn_mask), within one packed segment (blocks never cross segments). The causal choice
needs nothing here: flash_attention(causal=True, segment_ids=segments). flash_attention takes no
arbitrary mask, so image_block_attention computes the bidirectional one exactly from two
flash_attention calls merged by their log-sum-exps:
  A: s < t (strictly causal)      B: s >= t and block[s] = block[t]
disjoint, with union the block-causal mask (s < t implies block[s] <= block[t]); it costs about
twice a causal call. A layout with tile markers between tiles makes each tile its own block.
Letters: M image tokens of the whole batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lab.kernels import flash_attention


def image_token_index(ids_BT, image_id: int, n_image_tokens: int) -> np.ndarray:
  """index_BT (int32, host-side): for the k-th placeholder in row-major order (batch, then
  time) k, elsewhere -1. ValueError unless the ids hold exactly n_image_tokens placeholders."""
  is_image_BT = np.asarray(ids_BT) == image_id
  found = int(is_image_BT.sum())
  if found != n_image_tokens:
    raise ValueError(f'the token ids hold {found} image placeholders (id {image_id}) but the '
                     f'connector gave {n_image_tokens} image tokens; expected equal counts')
  return np.where(is_image_BT, np.cumsum(is_image_BT).reshape(is_image_BT.shape) - 1,
                  -1).astype(np.int32)


def merge_image_embeddings(text_BTD: jax.Array, image_MD: jax.Array,
                           index_BT: jax.Array) -> jax.Array:
  """y_BTD = image_MD[index] where index_BT >= 0, else text_BTD (LLaVA / InternVL's scatter of
  the connector outputs into the placeholder positions). image_MD may carry leading dims
  (tiles, tokens, D), flattened in order; it is cast to text_BTD's dtype."""
  D = text_BTD.shape[-1]
  if image_MD.shape[-1] != D:
    raise ValueError(f'image embeddings have width {image_MD.shape[-1]}; expected the text '
                     f'embedding width {D}')
  image_MD = image_MD.reshape(-1, D).astype(text_BTD.dtype)
  if image_MD.shape[0] == 0:
    return text_BTD
  gathered_BTD = image_MD[jnp.maximum(index_BT, 0)]
  return jnp.where((index_BT >= 0)[..., None], gathered_BTD, text_BTD)


def answer_mask(ids_BT: jax.Array, answer_start_id: int, answer_end_id: int) -> jax.Array:
  """bool_BT, True on the tokens of every answer: those after an answer_start_id (e.g. the end of
  the assistant header) up to and including the next answer_end_id (the end-of-turn token, which
  the model must learn to emit). Prompts, images, headers and padding are False. For next-token
  loss on targets ids[:, 1:], use answer_mask(ids)[:, 1:]."""
  if answer_start_id == answer_end_id:
    raise ValueError(f'answer_start_id = answer_end_id = {answer_start_id}; expected two ids')
  t_BT = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
  last = lambda is_marker: jax.lax.cummax(jnp.where(is_marker, t_BT, -1), axis=1)
  before = lambda a_BT: jnp.pad(a_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start_BT, end_BT = ids_BT == answer_start_id, ids_BT == answer_end_id
  return (before(last(start_BT)) > before(last(end_BT))) & ~start_BT


def attention_blocks(ids_BT: jax.Array, image_id: int, segment_BT: jax.Array | None = None
                     ) -> jax.Array:
  """block_BT (int32, non-decreasing): a new block starts at every token except an image
  placeholder that follows a placeholder of the same segment, so each run of image tokens is
  one block and every text token is its own."""
  is_image_BT = ids_BT == image_id
  same_BT = jnp.ones_like(is_image_BT) if segment_BT is None else \
      segment_BT == jnp.pad(segment_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  continues_BT = is_image_BT & jnp.pad(is_image_BT[:, :-1], ((0, 0), (1, 0))) & same_BT
  return (jnp.cumsum(~continues_BT, axis=1) - 1).astype(jnp.int32)


def block_causal_mask(block_BT: jax.Array, segment_BT: jax.Array | None = None) -> jax.Array:
  """mask_BTS (S = T): t sees s iff block[s] <= block[t] and segment[s] = segment[t]; with
  block_BT = arange(T) this is the causal mask."""
  mask_BTS = block_BT[:, None, :] <= block_BT[:, :, None]
  if segment_BT is not None:
    mask_BTS &= segment_BT[:, None, :] == segment_BT[:, :, None]
  return mask_BTS


def image_block_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKG: jax.Array,
                          block_BT: jax.Array, segment_BT: jax.Array | None = None, *,
                          softmax_scale: float | None = None, backend: str = 'auto'
                          ) -> jax.Array:
  """o_BTNG = softmax(scale q k^T + log block_causal_mask) v, as two flash_attention calls:
  A (s < t: queries 1..T-1 against keys 0..T-2, causal) and B (s >= t within a block: the time-
  reversed sequence, causal, with the blocks as segment ids), merged as
  o = (e^{lse_A} o_A + e^{lse_B} o_B) / (e^{lse_A} + e^{lse_B}). Query 0 has no A part."""
  kw = dict(causal=True, softmax_scale=softmax_scale, backend=backend, return_lse=True)
  flip = lambda x: jnp.flip(x, axis=1)
  o_B, lse_B = flash_attention(flip(q_BTNH), flip(k_BTKH), flip(v_BTKG),
                               segment_ids=flip(block_BT), **kw)
  o_B, lse_B = flip(o_B).astype(jnp.float32), flip(lse_B)
  if q_BTNH.shape[1] == 1:
    return o_B.astype(q_BTNH.dtype)
  seg = None if segment_BT is None else (segment_BT[:, 1:], segment_BT[:, :-1])
  o_A, lse_A = flash_attention(q_BTNH[:, 1:], k_BTKH[:, :-1], v_BTKG[:, :-1], segment_ids=seg,
                               **kw)
  o_A = jnp.pad(o_A.astype(jnp.float32), ((0, 0), (1, 0), (0, 0), (0, 0)))
  lse_A = jnp.pad(lse_A, ((0, 0), (1, 0), (0, 0)), constant_values=-jnp.inf)
  m_BTN = jax.lax.stop_gradient(jnp.maximum(lse_A, lse_B))
  w_A, w_B = jnp.exp(lse_A - m_BTN)[..., None], jnp.exp(lse_B - m_BTN)[..., None]
  return ((w_A * o_A + w_B * o_B) / (w_A + w_B)).astype(q_BTNH.dtype)
