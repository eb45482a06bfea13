"""DeepSeek-V3's multi-token-prediction modules as the draft of speculative decoding
(V3 §2.2 "MTP in inference"; self-speculation: the model drafts for itself, no second network).

With N tokens t_0..t_{N-1} verified and the next root t_N chosen, module k (1..D) drafts
t_{N+k} at position N-1 from h^{k-1}_{N-1} and Emb(t_{N-1+k}) (eqs. 21-23); for k >= 2 that
token is the draft d_{k-1} = argmax of module k-1, so drafts are conditioned on the top-1 chain
(use a chain tree, or one that is wide only at the first level). Each module keeps its own MLA
cache of its inputs' keys: module k's row at position p needs t_{p+k}, so only rows p <= N-k are
final ("committed", cache length N-k+1); its rows N-k+1..N-1 are speculative and recomputed
after every step. A verification step that keeps `count` = c tokens (N -> N' = N + c) then runs,
per module k, the R_k = A + k - 1 rows from its committed length (A = tree depth + 1; the first
c + k - 1 are real, the rest padding placed after them, which causal attention never lets a real
row see):
  module 1: rows N..N'-1 from the base model's h^0 at the kept path nodes;
  module k: its first row's input h^{k-1} is module k-1's output at its last committed row of
            the previous step (carried in the state), the rest module k-1's outputs of this step;
  tokens:   t_{N+1}..t_{N'-1} (kept), t_{N'} (next root), d_1..d_{k-1} (this step's drafts);
and commits the first c rows. The drafts equal lab.models.deepseek.mtp_logits on the whole
sequence (tests/sampling/test_mtp_draft.py), so self-speculation with greedy acceptance decodes
exactly what greedy decoding does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lab.models import deepseek_speculative as spec
from lab.sampling import medusa
from lab.sampling.medusa import Draft
from lab.sampling.tree_attention import Tree


def _advance_length(cache: dict, count) -> dict:
  return {**cache, 'length': cache['length'] + count}


def mtp_draft(cfg, cache_size: int) -> Draft:
  """The MTP Draft over draft_params = (model params, routing bias); each module's cache has
  `cache_size` slots (at least prompt + new tokens + tree depth + mtp_depth)."""
  D = cfg.mtp_depth
  if D < 1:
    raise ValueError(f'model.mtp_depth={D}; MTP self-speculation needs at least one module')

  def start(draft_params, h_BPD, tokens_BP, root_B):
    """Every module over the prompt's P positions (rows 0..P-1), committing rows 0..P-k."""
    params, bias = draft_params
    B, P = tokens_BP.shape
    if P < D:
      raise ValueError(f'prompt length {P}; MTP self-speculation with model.mtp_depth={D} '
                       f'needs at least {D} prompt tokens')
    caches = spec.init_mtp_cache(cfg, B, cache_size, h_BPD.dtype)
    seq_BL = jnp.concatenate([tokens_BP, root_B[:, None], jnp.zeros((B, D - 1), jnp.int32)], 1)
    h_BRD, logits, carries = h_BPD, [], []
    for k in range(D):
      logits_BRV, h_BRD, caches[k] = spec.mtp_extend(cfg, params, bias, k, h_BRD,
                                                     seq_BL[:, k + 1:k + 1 + P], caches[k])
      caches[k] = _advance_length(caches[k], P - k)
      carries.append(h_BRD[:, P - k - 1])
      logits.append(logits_BRV[:, P - 1])
      if k + 1 < D:
        seq_BL = seq_BL.at[:, P + k + 1].set(jnp.argmax(logits[-1], -1).astype(jnp.int32))
    return jnp.stack(logits, 1), {'caches': caches, 'carries': carries[:-1]}

  def advance(draft_params, state, h_BAD, tokens_BA, next_B, count):
    """Rows from each module's committed length; commits `count` rows per module."""
    params, bias = draft_params
    B, A = tokens_BA.shape
    i_L = jnp.arange(A + D - 1)
    shifted_BL = jnp.pad(tokens_BA[:, 1:], ((0, 0), (0, D)))
    seq_BL = jnp.where(i_L < count - 1, shifted_BL, jnp.where(i_L == count - 1, next_B[:, None],
                                                              0))
    caches, carries, logits = list(state['caches']), [], []
    h_BRD = h_BAD
    for k in range(D):
      if k:
        h_BRD = jnp.concatenate([state['carries'][k - 1][:, None], h_BRD], axis=1)
      R = A + k
      logits_BRV, h_BRD, caches[k] = spec.mtp_extend(cfg, params, bias, k, h_BRD, seq_BL[:, :R],
                                                     caches[k])
      caches[k] = _advance_length(caches[k], count)
      carries.append(jnp.take_along_axis(h_BRD, jnp.broadcast_to(count - 1, (B, 1, 1)), 1)[:, 0])
      draft_BV = jnp.take_along_axis(logits_BRV, jnp.broadcast_to(count + k - 1, (B, 1, 1)),
                                     1)[:, 0]
      logits.append(draft_BV)
      seq_BL = jnp.where(i_L == count + k, jnp.argmax(draft_BV, -1)[:, None].astype(jnp.int32),
                         seq_BL)
    return jnp.stack(logits, 1), {'caches': caches, 'carries': carries[:-1]}

  return Draft(start=start, advance=advance)


def generate(cfg, params, bias, prompt_BT: jax.Array, num_new: int, tree: Tree,
             rng: jax.Array | None = None, **acceptance):
  """(tokens_B(T+num_new), stats) of DeepSeek-V3 decoding with its own MTP modules as the draft,
  through lab.sampling.medusa.medusa_generate (acceptance: 'greedy' or 'typical' and its
  settings). Jit it with cfg, num_new, tree and the acceptance settings static."""
  if tree.depth > cfg.mtp_depth:
    raise ValueError(f'tree depth {tree.depth}; the {cfg.mtp_depth} MTP modules draft at most '
                     f'{cfg.mtp_depth} tokens ahead')
  size = prompt_BT.shape[1] + num_new + tree.depth + 1 + cfg.mtp_depth
  return medusa.medusa_generate(spec.decoder(cfg), (params, bias), (params, bias), prompt_BT,
                                num_new, tree, rng, draft=mtp_draft(cfg, size), **acceptance)
