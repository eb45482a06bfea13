"""DeepSeek-V3 speculative decoding: extend/compact over the MLA cache equal the full forward; the
MTP draft's cached modules equal deepseek.mtp_logits on the whole sequence after every step;
greedy self-speculation decodes exactly what greedy decoding does."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab.models import deepseek
from lab.models import deepseek_speculative as spec
from lab.sampling import mtp_draft, tree_attention

from deepseek_tiny import draw_tokens, make_cfg, make_params

CFG = make_cfg(max_len=40)    # mtp_depth 2
B = 2

forward_with_aux = jax.jit(deepseek.forward_with_aux, static_argnums=0)
mtp_logits = jax.jit(deepseek.mtp_logits, static_argnums=0)
extend = jax.jit(spec.extend, static_argnums=0)


@functools.cache
def _model(seed=0):
  params = make_params(CFG, seed=seed)
  bias = deepseek.init_state(CFG)
  bias = jax.tree.map(lambda b: 0.3 * jax.random.normal(jax.random.key(seed + 1), b.shape), bias)
  return params, bias


def test_extend_under_a_tree_mask_then_compact_equals_the_full_forward():
  """A prompt extended causally, then a tree of candidates under its ancestor mask: every node's
  logits and h^0 equal the full forward over its root-to-node path; after compacting one path,
  a further causal extend equals the forward over the accepted sequence."""
  params, bias = _model()
  P = 6
  tokens_BL = draw_tokens(0, (B, 20))
  tree = tree_attention.cartesian((2, 2))
  cache = spec.init_cache(CFG, B, 24)
  pos = lambda start, n: jnp.broadcast_to(start + jnp.arange(n), (B, n))
  _, _, cache = extend(CFG, params, bias, tokens_BL[:, :P], pos(0, P), None, cache)
  cache = spec.compact_cache(cache, pos(0, P), P)
  tree_BT = draw_tokens(1, (B, tree.size))
  mask_BTT = jnp.broadcast_to(jnp.asarray(tree.mask_TT), (B, tree.size, tree.size))
  logits_BTV, h_BTD, cache = extend(CFG, params, bias, tree_BT,
                                    tree_attention.positions(tree, P, B), mask_BTT, cache)
  for node in range(tree.size):
    path = [i for i in range(tree.size) if tree.mask_TT[node, i]]
    seq_BS = jnp.concatenate([tokens_BL[:, :P], tree_BT[:, path]], axis=1)
    want_BSV, aux = forward_with_aux(CFG, params, bias, seq_BS)
    np.testing.assert_allclose(logits_BTV[:, node], want_BSV[:, -1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h_BTD[:, node], aux['hidden_BTD'][:, -1], rtol=1e-4, atol=1e-4)
  leaf = tree.retrieve_PA[-1]            # the path through the last leaf: root, (1,), (1, 1)
  cache = spec.compact_cache(cache, jnp.broadcast_to(jnp.asarray(leaf), (B, len(leaf))),
                             len(leaf))
  more_BT = draw_tokens(2, (B, 3))
  logits_BTV, _, _ = extend(CFG, params, bias, more_BT, pos(P + len(leaf), 3), None, cache)
  seq_BS = jnp.concatenate([tokens_BL[:, :P], tree_BT[:, leaf], more_BT], axis=1)
  want_BSV, _ = forward_with_aux(CFG, params, bias, seq_BS)
  np.testing.assert_allclose(logits_BTV, want_BSV[:, -3:], rtol=1e-4, atol=1e-4)


def _oracle_drafts(params, bias, seq_BN, root_B):
  """The D draft distributions for t_{N+1}..t_{N+D} from the training-time MTP computation over
  the whole sequence t_0..t_{N-1}, root, d_1..: module k's logits at position N-1."""
  N = seq_BN.shape[1]
  tokens_BL = jnp.concatenate([seq_BN, root_B[:, None]], axis=1)
  logits = []
  for k in range(CFG.mtp_depth):
    _, aux = forward_with_aux(CFG, params, bias, tokens_BL)
    all_logits, _ = mtp_logits(CFG, params, bias, aux['hidden_BTD'],
                               jnp.pad(tokens_BL[:, 1:], ((0, 0), (0, 1))))
    logits.append(all_logits[k][:, N - 1])
    tokens_BL = jnp.concatenate([tokens_BL, jnp.argmax(logits[-1], -1)[:, None]], axis=1)
  return jnp.stack(logits, 1)


@pytest.mark.parametrize('counts', [(1, 3, 2), (3, 3, 3)])
def test_cached_mtp_draft_equals_mtp_logits_on_the_whole_sequence(counts):
  """start, then advance steps keeping `count` tokens each (A = 3: a depth-2 tree), with junk in
  the rows past `count`: after every step the draft distributions equal the oracle's."""
  params, bias = _model()
  D, A, P = CFG.mtp_depth, 3, 5
  seq_BL = draw_tokens(3, (B, 30))
  junk = np.random.default_rng(4)
  draft = mtp_draft.mtp_draft(CFG, cache_size=40)
  _, aux = forward_with_aux(CFG, params, bias, seq_BL[:, :P])
  got_BDV, state = jax.jit(draft.start)((params, bias), aux['hidden_BTD'], seq_BL[:, :P],
                                        seq_BL[:, P])
  np.testing.assert_allclose(got_BDV, _oracle_drafts(params, bias, seq_BL[:, :P], seq_BL[:, P]),
                             rtol=1e-4, atol=1e-4)
  advance = jax.jit(draft.advance)
  N = P
  for c in counts:
    _, aux = forward_with_aux(CFG, params, bias, seq_BL[:, :N + c])
    h_BAD = jnp.asarray(junk.standard_normal((B, A, CFG.d_model)), jnp.float32)
    h_BAD = h_BAD.at[:, :c].set(aux['hidden_BTD'][:, N:N + c])
    tokens_BA = jnp.asarray(junk.integers(0, CFG.vocab_size, (B, A)), jnp.int32)
    tokens_BA = tokens_BA.at[:, :c].set(seq_BL[:, N:N + c])
    got_BDV, state = advance((params, bias), state, h_BAD, tokens_BA, seq_BL[:, N + c],
                             jnp.asarray(c, jnp.int32))
    N += c
    want_BDV = _oracle_drafts(params, bias, seq_BL[:, :N], seq_BL[:, N])
    np.testing.assert_allclose(got_BDV, want_BDV, rtol=1e-4, atol=1e-4, err_msg=f'N={N}')
    assert [int(s['length']) for s in state['caches']] == [N - k for k in range(D)]
  assert got_BDV.shape == (B, D, CFG.vocab_size)


@pytest.mark.parametrize('widths', [(1, 1), (3, 1)])
def test_greedy_mtp_self_speculation_equals_greedy_decoding(widths):
  """A chain of the two modules' drafts, and a tree wide at the first level (rank-1 branches
  continue with the module-2 draft conditioned on rank 0): both decode greedy's tokens."""
  params, bias = _model(seed=5)
  prompt_BT, new = draw_tokens(6, (B, 4)), 20
  want = jax.jit(functools.partial(deepseek.generate, CFG, num_new=new, temperature=0.0))(
      params, bias, prompt_BT, rng=jax.random.key(0))
  tree = tree_attention.cartesian(widths)
  got, stats = jax.jit(functools.partial(mtp_draft.generate, CFG, num_new=new, tree=tree))(
      params, bias, prompt_BT)
  np.testing.assert_array_equal(got, want)
  steps = int(stats['steps'])
  advanced = np.asarray(stats['advanced_N'])[:steps]
  assert advanced.min() >= 1 and advanced.max() <= tree.depth + 1 and 1 + advanced.sum() >= new
  assert len({tuple(r) for r in np.asarray(want)[:, 4:]}) == B


def test_errors():
  params, bias = _model()
  with pytest.raises(ValueError, match='tree depth 3; the 2 MTP modules'):
    mtp_draft.generate(CFG, params, bias, draw_tokens(0, (B, 4)), 4,
                       tree_attention.cartesian((1, 1, 1)))
  with pytest.raises(ValueError, match='mtp_depth=0; MTP self-speculation'):
    mtp_draft.mtp_draft(make_cfg(mtp_depth=0), 8)
  draft = mtp_draft.mtp_draft(CFG, 8)
  with pytest.raises(ValueError, match='prompt length 1'):
    draft.start((params, bias), jnp.zeros((B, 1, CFG.d_model)), jnp.zeros((B, 1), jnp.int32),
                jnp.zeros((B,), jnp.int32))
