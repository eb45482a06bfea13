"""Medusa: extra decoding heads and tree-verified speculative decoding (Cai et al. 2024).

Heads (eq. 1): M heads on the base model's last (final-normed) hidden state h_t; head k
predicts token t+k+1 (head 1 the token after next):
  p_t^(k) = softmax(W_2^(k) (SiLU(W_1^(k) h_t + b_1^(k)) + h_t)).
As in the authors' code, W_1 starts at zero (b_1 at torch's default) and W_2 as a copy of the
base model's LM head (tied or untied), so a head starts out close to the base model's own
next-token head.

Training (sec. 2.2): Medusa-1 freezes the backbone, L = sum_k lambda_k CE_k with
lambda_k = decay^k (decay 0.8); Medusa-2 trains both, L = L_LM + lambda_0 sum_k lambda_k CE_k.

Decoding (sec. 2.1, 2.3.1): the heads' top-J choices fill a candidate tree (tree_attention.py)
whose root is the base model's own next token; one base-model forward over the flattened tree
(ancestor mask, positions prefix + depth) scores every node; a node is accepted when its token
is the argmax of its parent's distribution (greedy) or passes typical acceptance
  p(x) > min(epsilon, delta exp(-H(p)));
the longest accepted root-to-leaf prefix is kept (ties: highest likelihood), its keys and values
are compacted into place in the cache, and the next root is chosen from the last kept node.

The base model and the draft come in as small interfaces (`Decoder`, `Draft`), so another
model uses the same loop: DeepSeek-V3 with its MTP modules as the draft
(lab.models.deepseek_speculative, lab.sampling.mtp_draft). Rows of a batch advance in
lockstep by the shortest accepted length among them (every row's kept tokens are still
verified), since the cache has one length.

Letters: M heads, J top-J per head, T tree nodes, A = M + 1 tokens on a path, P leaf paths,
F the residual block's width (= D), N steps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lab.models import transformer
from lab.nn import param_spec as ps
from lab.objectives.lm import cross_entropy
from lab.sampling import tree_attention
from lab.sampling.tree_attention import Tree

ACCEPTANCES = ('greedy', 'typical')


# ---------------------------------------------------------------- heads and losses


def head_specs(lm_head_DV, num_heads: int) -> dict:
  """ParamSpecs of `num_heads` Medusa heads. W_1 is zero and b_1 ~ U(-1/sqrt(D), 1/sqrt(D))
  (torch.nn.Linear's bias init, which the authors' ResBlock keeps); W_2 is the LM head copied."""
  if num_heads < 1:
    raise ValueError(f'num_heads={num_heads}; expected at least one Medusa head')
  D, V = lm_head_DV.shape
  M, bound = num_heads, D ** -0.5
  uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
  copy_head = lambda key, shape, dtype: jnp.broadcast_to(jnp.asarray(lm_head_DV, dtype), shape)
  return {'w_in': ps.ParamSpec((M, D, D), ps.zeros, (None, 'embed', 'mlp')),
          'b_in': ps.ParamSpec((M, D), uniform, (None, 'mlp')),
          'w_out': ps.ParamSpec((M, D, V), copy_head, (None, 'embed', 'vocab'))}


def apply_heads(heads: dict, h_BTD: jax.Array) -> jax.Array:
  """logits_BTMV of every head at every position (eq. 1, with the bias of the authors' code)."""
  z_BTMF = jnp.einsum('BTD,MDF->BTMF', h_BTD, heads['w_in']) + heads['b_in']
  r_BTMD = h_BTD[:, :, None] + jax.nn.silu(z_BTMF)
  return jnp.einsum('BTMD,MDV->BTMV', r_BTMD, heads['w_out'])


def head_cross_entropies(logits_BTMV: jax.Array, tokens_BT1: jax.Array):
  """(ce_M, accuracy_M): head k's mean cross-entropy and top-1 accuracy on tokens[t + k + 1],
  over the positions t whose target lies inside the row (tokens_BT1 holds T + 1 tokens)."""
  B, T, M, _ = logits_BTMV.shape
  if tokens_BT1.shape != (B, T + 1):
    raise ValueError(f'tokens shape {tokens_BT1.shape}; expected {(B, T + 1)} (inputs + 1)')
  if T <= M:
    raise ValueError(f'{T} positions leave no target for head {M}; expected more than {M}')
  ce, accuracy = [], []
  for k in range(1, M + 1):
    logits_BtV, targets_Bt = logits_BTMV[:, :T - k, k - 1], tokens_BT1[:, k + 1:]
    ce.append(cross_entropy(logits_BtV, targets_Bt))
    accuracy.append(jnp.mean((jnp.argmax(logits_BtV, -1) == targets_Bt).astype(jnp.float32)))
  return jnp.stack(ce), jnp.stack(accuracy)


def medusa1_loss(ce_M: jax.Array, decay: float = 0.8) -> jax.Array:
  """L_Medusa-1 = sum_{k=1}^M decay^k CE_k (sec. 2.2.1)."""
  return jnp.sum(decay ** jnp.arange(1, ce_M.shape[0] + 1) * ce_M)


def medusa2_loss(lm_ce: jax.Array, ce_M: jax.Array, decay: float = 0.8,
                 lambda_0: float = 0.2) -> jax.Array:
  """L_Medusa-2 = L_LM + lambda_0 L_Medusa-1 (sec. 2.2.2, combined loss)."""
  return lm_ce + lambda_0 * medusa1_loss(ce_M, decay)


# ---------------------------------------------------------------- verification


def typical_threshold(logits_XV: jax.Array, epsilon: float, delta: float) -> jax.Array:
  """min(epsilon, delta exp(-H(p))) with p = softmax(logits) (typical acceptance, sec. 2.3.1)."""
  logp_XV = jax.nn.log_softmax(logits_XV.astype(jnp.float32), axis=-1)
  p_XV = jnp.exp(logp_XV)
  entropy_X = -jnp.sum(jnp.where(p_XV > 0, p_XV * logp_XV, 0.0), axis=-1)
  return jnp.minimum(epsilon, delta * jnp.exp(-entropy_X))


def verify(tree: Tree, logits_BTV: jax.Array, tokens_BT: jax.Array, *, acceptance: str,
           temperature: float, epsilon: float, delta: float):
  """(ok_BT, logp_BT): whether each node's token is accepted under its parent's distribution
  (the root always is), and its log-probability there (temperature-scaled for typical)."""
  parent_logits_BTV = logits_BTV[:, np.maximum(tree.parent_T, 0)].astype(jnp.float32)
  if acceptance == 'typical':
    parent_logits_BTV = parent_logits_BTV / temperature
  logp_BTV = jax.nn.log_softmax(parent_logits_BTV, axis=-1)
  logp_BT = jnp.take_along_axis(logp_BTV, tokens_BT[..., None], axis=-1)[..., 0]
  if acceptance == 'greedy':
    ok_BT = tokens_BT == jnp.argmax(parent_logits_BTV, axis=-1)
  else:
    ok_BT = jnp.exp(logp_BT) > typical_threshold(parent_logits_BTV, epsilon, delta)
  return ok_BT | jnp.asarray(tree.parent_T < 0)[None], logp_BT


def best_path(tree: Tree, ok_BT: jax.Array, logp_BT: jax.Array):
  """(path_BA, count_B): the nodes of the root-to-leaf path with the longest accepted prefix
  (ties: the largest summed log-probability of that prefix) and that prefix's length (>= 1)."""
  retrieve_PA = jnp.asarray(tree.retrieve_PA)
  ok_BPA = ok_BT[:, retrieve_PA] & jnp.asarray(tree.valid_PA)
  accept_BP = jnp.sum(jnp.cumprod(ok_BPA, axis=-1), axis=-1)
  kept_BPA = jnp.arange(retrieve_PA.shape[1]) < accept_BP[..., None]
  loglik_BP = jnp.sum(jnp.where(kept_BPA, logp_BT[:, retrieve_PA], 0.0), axis=-1)
  longest_BP = accept_BP == accept_BP.max(-1, keepdims=True)
  best_B = jnp.argmax(jnp.where(longest_BP, loglik_BP, -jnp.inf), axis=-1)
  return retrieve_PA[best_B], jnp.take_along_axis(accept_BP, best_B[:, None], axis=-1)[:, 0]


def choose(logits_BV: jax.Array, key: jax.Array, *, acceptance: str, temperature: float,
           epsilon: float, delta: float) -> jax.Array:
  """The next root token_B: the argmax (greedy), or a draw from softmax(logits / temperature)
  restricted to the tokens that typical acceptance would accept (the authors' code)."""
  if acceptance == 'greedy':
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  scaled_BV = logits_BV.astype(jnp.float32) / temperature
  p_BV = jax.nn.softmax(scaled_BV, axis=-1)
  keep_BV = p_BV >= typical_threshold(scaled_BV, epsilon, delta)[:, None]
  return jax.random.categorical(key, jnp.where(keep_BV, scaled_BV, -jnp.inf)).astype(jnp.int32)


# ---------------------------------------------------------------- the decoding loop


@dataclasses.dataclass(frozen=True)
class Decoder:
  """What tree verification needs from a base model with a KV cache.

  init_cache(params, batch, size) -> an empty cache with room for `size` tokens.
  extend(params, tokens_BT, positions_BT, mask_BTT | None, cache) -> (logits_BTV, h_BTD, cache):
    runs T tokens after the cache's filled entries (mask among them; None = causal), writes
    their keys and values after them and leaves the cache's length as it was; h_BTD is the
    hidden state the draft reads (for the transformer, the final-normed one).
  compact(cache, index_BA, count) -> cache: moves the entries at length + index_BA[b, a] to
    length + a, then advances the length by count.
  max_len: positions must stay below it.
  """
  init_cache: Callable
  extend: Callable
  compact: Callable
  max_len: int


def transformer_decoder(cfg) -> Decoder:
  """lab.models.transformer as a Decoder (cache in the params' dtype)."""
  return Decoder(
      init_cache=lambda params, batch, size: transformer.init_cache(
          cfg, batch, size, params['embed']['tokens'].dtype),
      extend=functools.partial(transformer.extend, cfg),
      compact=transformer.compact_cache, max_len=cfg.max_len)


def transformer_lm_head(cfg, params) -> jax.Array:
  """lm_head_DV of lab.models.transformer: the tied embedding transposed, or the untied head."""
  return params['embed']['tokens'].T if cfg.tie_embeddings else params['head']


@dataclasses.dataclass(frozen=True)
class Draft:
  """What proposes the tree's tokens, as a small state machine carried through the loop.

  start(draft_params, h_BPD, tokens_BP, root_B) -> (logits_BMV, state): after the prompt, from
    the base model's hidden states at its P positions, the prompt and the first root token.
  advance(draft_params, state, h_BAD, tokens_BA, next_B, count) -> (logits_BMV, state): after a
    verification step that kept the first `count` nodes of the chosen path, given the base
    model's hidden states and tokens at the path's A nodes (entries from `count` on were not
    kept) and the next root token.
  logits_BMV: the M >= tree depth draft distributions for the tokens after the root.
  """
  start: Callable
  advance: Callable


def last_hidden_draft(heads_logits: Callable) -> Draft:
  """A stateless draft that reads the last kept hidden state: heads_logits(draft_params, h_BD)
  -> logits_BMV (Medusa's heads do not read the root token)."""
  def start(draft_params, h_BPD, tokens_BP, root_B):
    del tokens_BP, root_B
    return heads_logits(draft_params, h_BPD[:, -1]), ()

  def advance(draft_params, state, h_BAD, tokens_BA, next_B, count):
    del tokens_BA, next_B
    return heads_logits(draft_params, h_BAD[:, count - 1]), state

  return Draft(start=start, advance=advance)


MEDUSA_DRAFT = last_hidden_draft(lambda heads, h_BD: apply_heads(heads, h_BD[:, None])[:, 0])


def medusa_generate(decoder: Decoder, params, draft_params, prompt_BT: jax.Array, num_new: int,
                    tree: Tree, rng: jax.Array | None = None, *, draft: Draft = MEDUSA_DRAFT,
                    acceptance: str = 'greedy', temperature: float = 1.0,
                    epsilon: float = 0.09, delta: float = 0.3):
  """(tokens_B(T+num_new), stats): the prompt and num_new tokens decoded with tree speculation.

  draft proposes the tree's tokens (`Draft`; Medusa's heads by default, with draft_params the
  heads).
  acceptance: 'greedy' (the output equals greedy decoding) or 'typical' (needs rng and
  temperature > 0; epsilon and delta default to the authors' 0.09 and 0.3).
  stats: steps (verification forwards), accepted_NB (each row's accepted path length, root
  included, at step n; 0 after the last step) and advanced_N (tokens the batch advanced).
  Jit it with decoder, draft, num_new, tree and the acceptance settings static.
  """
  if acceptance not in ACCEPTANCES:
    raise ValueError(f'acceptance={acceptance!r}; expected one of {ACCEPTANCES}')
  if acceptance == 'typical' and (temperature <= 0 or rng is None):
    raise ValueError(f'typical acceptance with temperature={temperature} and rng={rng}; '
                     'expected temperature > 0 and a key')
  if num_new < 1:
    raise ValueError(f'num_new={num_new}; expected at least one token to generate')
  B, prompt_len = prompt_BT.shape
  total, A = prompt_len + num_new, tree.depth + 1
  if total + tree.depth > decoder.max_len:
    raise ValueError(f'prompt {prompt_len} + num_new {num_new} + tree depth {tree.depth} '
                     f'exceeds the model max_len={decoder.max_len}')
  rng = jax.random.key(0) if rng is None else rng   # greedy draws nothing
  pick = lambda logits_BV, key: choose(logits_BV, key, acceptance=acceptance,
                                       temperature=temperature, epsilon=epsilon, delta=delta)

  cache = decoder.init_cache(params, B, total + tree.size)
  prompt_pos_BP = jnp.broadcast_to(jnp.arange(prompt_len), (B, prompt_len))
  logits_BPV, h_BPD, cache = decoder.extend(params, prompt_BT, prompt_pos_BP, None, cache)
  cache = decoder.compact(cache, prompt_pos_BP, prompt_len)
  root_B = pick(logits_BPV[:, -1], jax.random.fold_in(rng, 0))
  draft_BMV, draft_state = draft.start(draft_params, h_BPD, prompt_BT, root_B)
  if draft_BMV.shape[1] < tree.depth:
    raise ValueError(f'the draft gives {draft_BMV.shape[1]} heads; the tree needs {tree.depth}')
  out_BL = jnp.zeros((B, total + A), jnp.int32).at[:, :prompt_len].set(prompt_BT)
  out_BL = out_BL.at[:, prompt_len].set(root_B)
  mask_BTT = jnp.broadcast_to(jnp.asarray(tree.mask_TT), (B, tree.size, tree.size))

  def body(c):
    top_BMJ = jax.lax.top_k(c['draft_BMV'][:, :tree.depth], tree.width)[1]
    tokens_BT = tree_attention.tokens(tree, c['root_B'], top_BMJ)
    positions_BT = tree_attention.positions(tree, c['n'], B)
    logits_BTV, h_BTD, cache = decoder.extend(params, tokens_BT, positions_BT, mask_BTT,
                                              c['cache'])
    ok_BT, logp_BT = verify(tree, logits_BTV, tokens_BT, acceptance=acceptance,
                            temperature=temperature, epsilon=epsilon, delta=delta)
    path_BA, count_B = best_path(tree, ok_BT, logp_BT)
    count = jnp.min(count_B)
    cache = decoder.compact(cache, path_BA, count)
    last_B1 = jnp.take_along_axis(path_BA, jnp.broadcast_to(count - 1, (B, 1)), axis=1)
    next_B = pick(jnp.take_along_axis(logits_BTV, last_B1[..., None], axis=1)[:, 0],
                  jax.random.fold_in(rng, c['step'] + 1))
    kept_BA = jnp.take_along_axis(tokens_BT, path_BA, axis=1)
    draft_BMV, draft_state = draft.advance(
        draft_params, c['draft_state'], jnp.take_along_axis(h_BTD, path_BA[..., None], axis=1),
        kept_BA, next_B, count)
    new_BA1 = jnp.where(jnp.arange(A + 1) == count, next_B[:, None],
                        jnp.pad(kept_BA, ((0, 0), (0, 1))))
    return {'n': c['n'] + count, 'cache': cache, 'root_B': next_B, 'draft_BMV': draft_BMV,
            'draft_state': draft_state,
            'out_BL': jax.lax.dynamic_update_slice(c['out_BL'], new_BA1, (0, c['n'])),
            'step': c['step'] + 1,
            'accepted_NB': c['accepted_NB'].at[c['step']].set(count_B),
            'advanced_N': c['advanced_N'].at[c['step']].set(count)}

  init = {'n': jnp.asarray(prompt_len, jnp.int32), 'cache': cache, 'root_B': root_B,
          'draft_BMV': draft_BMV, 'draft_state': draft_state, 'out_BL': out_BL,
          'step': jnp.asarray(0, jnp.int32),
          'accepted_NB': jnp.zeros((num_new, B), jnp.int32),
          'advanced_N': jnp.zeros((num_new,), jnp.int32)}
  final = jax.lax.while_loop(lambda c: c['n'] + 1 < total, body, init)
  stats = {'steps': final['step'], 'accepted_NB': final['accepted_NB'],
           'advanced_N': final['advanced_N']}
  return final['out_BL'][:, :total], stats
