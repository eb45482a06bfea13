"""Medusa: candidate trees, tree verification through transformer.extend, speculative decoding
that equals greedy decoding, typical acceptance, and the heads' losses and training."""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab.data.dataset import Dataset
from lab.models import transformer
from lab.nn import param_spec as ps
from lab.objectives import medusa as medusa_objective
from lab.sampling import decode, medusa, tree_attention
from lab.train import loop

GPT2 = dict(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=0, d_ff=64,
            max_len=48, norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned',
            rope_theta=10000.0, bias=True, tie_embeddings=True, dropout=0.0, init_std=0.3,
            remat=False, attention_backend='reference')
LLAMA = GPT2 | dict(norm='rmsnorm', mlp='swiglu', positions='rope', bias=False,
                    tie_embeddings=False, n_kv_heads=2)
B, PROMPT, NEW = 3, 5, 24


def _model(arch=GPT2, seed=0):
  cfg = ml_collections.FrozenConfigDict(arch)
  return cfg, ps.init(transformer.param_specs(cfg), jax.random.key(seed))


# ---------------------------------------------------------------- trees


TREES = {'medusa63': tree_attention.MEDUSA_63,
         'cartesian232': [p for d in (1, 2, 3)
                          for p in itertools.product(*(range(w) for w in (2, 3, 2)[:d]))],
         'chain': [(0,), (0, 0), (0, 0, 0)],
         'unsorted': [(1, 0, 2), (2,), (0,), (1,), (1, 0), (1, 0, 0), (1, 0, 1), (0, 3), (0, 0),
                      (0, 1), (0, 2)]}


@pytest.mark.parametrize('name', TREES)
def test_tree_mask_is_the_brute_force_ancestor_mask(name):
  paths = TREES[name]
  tree = tree_attention.build(paths)
  nodes = [()] + list(tree.paths)
  assert sorted(nodes[1:]) == sorted(tuple(p) for p in paths) and tree.size == len(paths) + 1
  want = np.array([[a == b[:len(a)] for a in nodes] for b in nodes])   # a is a prefix of b
  np.testing.assert_array_equal(tree.mask_TT, want)
  np.testing.assert_array_equal(tree.depth_T, [len(p) for p in nodes])
  assert all(tree.depth_T[i] <= tree.depth_T[i + 1] for i in range(tree.size - 1))
  leaves = {p for p in nodes if not any(q != p and q[:len(p)] == p for q in nodes)}
  got = {tuple(nodes[i] for i, ok in zip(row, valid) if ok)
         for row, valid in zip(tree.retrieve_PA, tree.valid_PA)}
  assert got == {tuple(leaf[:d] for d in range(len(leaf) + 1)) for leaf in leaves}
  # tokens: node (r_1..r_d) takes head d's r_d-th choice; the root the base model's token.
  top_BMJ = jax.random.randint(jax.random.key(0), (2, tree.depth, tree.width), 0, 1000)
  root_B = jnp.asarray([-1, -2])
  tokens_BT = np.asarray(tree_attention.tokens(tree, root_B, top_BMJ))
  for i, p in enumerate(nodes):
    want_B = root_B if not p else top_BMJ[:, len(p) - 1, p[-1]]
    np.testing.assert_array_equal(tokens_BT[:, i], want_B)
  np.testing.assert_array_equal(tree_attention.positions(tree, 7, 2)[1], 7 + tree.depth_T)


def test_cartesian_tree_counts_and_bad_paths():
  assert tree_attention.cartesian((3, 2, 2)).size == 1 + 3 + 6 + 12
  assert tree_attention.cartesian((1, 1, 1, 1)).paths == ((0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
  assert tree_attention.build(TREES['medusa63']).size == 64
  for bad, match in (([(0, 1)], 'lacks its prefix'), ([(0,), (0,)], 'repeat'),
                     ([(0,), (-1,)], 'non-negative'), ([], 'at least one')):
    with pytest.raises(ValueError, match=match):
      tree_attention.build(bad)


# ---------------------------------------------------------------- extend


def test_extend_equals_forward_for_chains_and_tree_paths():
  """Llama pieces (RoPE positions, GQA, untied head); GPT-2's learned positions are covered by
  the speculation tests below, which would diverge from greedy decoding otherwise."""
  cfg, params = _model(LLAMA)
  tokens_BT = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
  forward = jax.jit(functools.partial(transformer.forward, cfg))
  extend = jax.jit(functools.partial(transformer.extend, cfg))
  full_BTV = forward(params, tokens_BT)
  arange = lambda a, b: jnp.broadcast_to(jnp.arange(a, b), (2, b - a))
  close = functools.partial(np.testing.assert_allclose, rtol=0, atol=2e-5)

  cache = transformer.init_cache(cfg, 2, 24)
  logits, _, cache = extend(params, tokens_BT[:, :7], arange(0, 7), None, cache)
  close(logits, full_BTV[:, :7])
  assert int(cache['length']) == 0
  cache = transformer.compact_cache(cache, arange(0, 7), 7)
  chain_BTT = jnp.broadcast_to(jnp.tril(jnp.ones((7, 7), bool)), (2, 7, 7))
  logits, h_BTD, _ = extend(params, tokens_BT[:, 7:], arange(7, 14), chain_BTT, cache)
  close(logits, full_BTV[:, 7:])
  close(transformer.unembed(cfg, params, h_BTD), logits)

  # A tree after the 7-token prefix: node i's logits are those of prefix + its root-to-i path
  # (read from a forward of that sequence zero-padded to 14, which causality leaves alone).
  tree = tree_attention.cartesian((2, 2))
  nodes_BT = jax.random.randint(jax.random.key(2), (2, tree.size), 0, cfg.vocab_size)
  logits_BTV, _, tree_cache = extend(params, nodes_BT, tree_attention.positions(tree, 7, 2),
                                     jnp.broadcast_to(tree.mask_TT, (2, 7, 7)), cache)
  pad = lambda seq_BT: jnp.pad(seq_BT, ((0, 0), (0, 14 - seq_BT.shape[1])))
  for i in range(tree.size):
    chain = np.flatnonzero(tree.mask_TT[i])               # ancestors in depth order
    seq_BT = jnp.concatenate([tokens_BT[:, :7], nodes_BT[:, chain]], axis=1)
    close(logits_BTV[:, i], forward(params, pad(seq_BT))[:, seq_BT.shape[1] - 1],
          err_msg=f'node {i}')
  # Keep the path root -> (1,) -> (1, 1), then decode one more token after it.
  path_A = tree.retrieve_PA[-1]
  kept = jax.jit(transformer.compact_cache, static_argnums=2)(
      tree_cache, jnp.broadcast_to(path_A, (2, 3)), 3)
  assert int(kept['length']) == 10 and list(path_A) == [0, 2, 6]
  logits_B1V, _ = jax.jit(functools.partial(transformer.decode_step, cfg))(
      params, tokens_BT[:, :1], kept)
  seq_BT = jnp.concatenate([tokens_BT[:, :7], nodes_BT[:, path_A], tokens_BT[:, :1]], axis=1)
  close(logits_B1V[:, 0], forward(params, pad(seq_BT))[:, 10])


# ---------------------------------------------------------------- speculative = greedy


@functools.cache
def _greedy(arch_name):
  """(cfg, params, prompt_BT, greedy tokens) of a random model, computed once per arch."""
  cfg, params = _model({'gpt2': GPT2, 'llama': LLAMA}[arch_name])
  prompt_BT = jax.random.randint(jax.random.key(1), (B, PROMPT), 0, cfg.vocab_size)
  want = jax.jit(functools.partial(decode.generate, transformer, cfg, num_new=NEW,
                                  temperature=0.0))(params, prompt_BT, rng=jax.random.key(0))
  return cfg, params, prompt_BT, np.asarray(want)


@functools.cache
def _compiled(cfg, tree, draft, acceptance='greedy', temperature=1.0):
  return jax.jit(functools.partial(medusa.medusa_generate, medusa.transformer_decoder(cfg),
                                   num_new=NEW, tree=tree, draft=draft, acceptance=acceptance,
                                   temperature=temperature))


def _speculate(cfg, params, heads, prompt_BT, tree, draft=medusa.MEDUSA_DRAFT, **kw):
  tokens, stats = _compiled(cfg, tree, draft, **kw)(params, heads, prompt_BT,
                                                    rng=jax.random.key(4))
  steps = int(stats['steps'])
  advanced_N = np.asarray(stats['advanced_N'])
  assert advanced_N[:steps].min() >= 1 and not advanced_N[steps:].any()
  assert PROMPT + 1 + advanced_N.sum() >= PROMPT + NEW > PROMPT + advanced_N[:steps - 1].sum() + 1
  np.testing.assert_array_equal(advanced_N, np.asarray(stats['accepted_NB']).min(-1))
  return np.asarray(tokens), advanced_N[:steps]


def _heads(cfg, params, num_heads=3):
  lm_head = medusa.transformer_lm_head(cfg, params)
  return ps.init(medusa.head_specs(lm_head, num_heads), jax.random.key(3))


def test_greedy_speculation_equals_greedy_decoding_untrained():
  """Untrained heads on a random model, the paper's 63-node sparse tree (top-10, 4 heads)."""
  cfg, params, prompt_BT, want = _greedy('gpt2')
  tree = tree_attention.build(tree_attention.MEDUSA_63)
  got, _ = _speculate(cfg, params, _heads(cfg, params, tree.depth), prompt_BT, tree)
  np.testing.assert_array_equal(got, want)
  assert len({tuple(r) for r in want[:, PROMPT:]}) == B   # rows differ: not a trivial output


def _fit_heads(cfg, params, heads, tokens_BT1, steps=300):
  """Heads trained (Medusa-1 loss, Adam) to memorise this model's own greedy continuations."""
  h_BTD, _ = jax.jit(functools.partial(transformer.forward_hidden, cfg))(params,
                                                                        tokens_BT1[:, :-1])
  opt = optax.adam(3e-2)

  def step(carry, _):
    hd, opt_state = carry
    grads = jax.grad(lambda hd: medusa.medusa1_loss(medusa.head_cross_entropies(
        medusa.apply_heads(hd, h_BTD), tokens_BT1)[0]))(hd)
    updates, opt_state = opt.update(grads, opt_state)
    return (optax.apply_updates(hd, updates), opt_state), None

  return jax.jit(lambda hd: jax.lax.scan(step, (hd, opt.init(hd)), None, steps)[0][0])(heads)


def _second_choice_logits(heads, h_BD):
  """Medusa's heads with each head's first and second choices swapped: the right token then
  sits on rank-1 branches, so accepted paths run through later siblings."""
  logits_BMV = medusa.apply_heads(heads, h_BD[:, None])[:, 0]
  values, index = jax.lax.top_k(logits_BMV, 2)
  swap = lambda x, i, v: jnp.put_along_axis(x, i[..., None], v[..., None], axis=-1,
                                            inplace=False)
  return swap(swap(logits_BMV, index[..., 0], values[..., 1]), index[..., 1], values[..., 0])


SECOND_CHOICE_DRAFT = medusa.last_hidden_draft(_second_choice_logits)


def test_greedy_speculation_equals_greedy_decoding_with_accepting_heads():
  cfg, params, prompt_BT, want = _greedy('gpt2')
  heads = _fit_heads(cfg, params, _heads(cfg, params), jnp.asarray(want))
  tree = tree_attention.cartesian((2, 2, 2))
  for name, draft in (('medusa', medusa.MEDUSA_DRAFT), ('second choice', SECOND_CHOICE_DRAFT)):
    got, advanced = _speculate(cfg, params, heads, prompt_BT, tree, draft=draft)
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert advanced.max() == 4 and advanced.mean() > 2.5, (name, advanced)
  # The same heads before fitting accept less: the fitted heads are what made steps long.
  got, advanced = _speculate(cfg, params, _heads(cfg, params), prompt_BT, tree)
  np.testing.assert_array_equal(got, want)
  assert advanced.mean() < 2.5


def test_typical_acceptance_at_low_temperature_is_greedy():
  """As temperature -> 0 the distribution is one-hot: only the argmax passes the threshold, so
  typical acceptance (and its root draw) reproduce greedy decoding."""
  cfg, params, prompt_BT, want = _greedy('gpt2')
  got, _ = _speculate(cfg, params, _heads(cfg, params), prompt_BT,
                      tree_attention.cartesian((2, 2, 2)), acceptance='typical',
                      temperature=1e-4)
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- acceptance rules


def test_typical_acceptance_formula_on_hand_built_distributions():
  """Accept x iff p(x) > min(epsilon, delta exp(-H(p))), p = softmax(logits / temperature)."""
  probs_XV = np.array([[0.7, 0.2, 0.06, 0.04, 0.0],       # threshold epsilon
                       [0.3, 0.3, 0.3, 0.05, 0.05],       # threshold delta exp(-H) ~ 0.075
                       [0.94, 0.02, 0.02, 0.02, 0.0]])
  epsilon, delta, temperature = 0.09, 0.3, 0.5
  logits_XV = temperature * np.log(np.where(probs_XV > 0, probs_XV, 1e-30))
  entropy_X = -np.sum(np.where(probs_XV > 0, probs_XV * np.log(np.maximum(probs_XV, 1e-300)),
                               0.0), axis=-1)
  want_X = np.minimum(epsilon, delta * np.exp(-entropy_X))
  got_X = medusa.typical_threshold(jnp.asarray(logits_XV / temperature, jnp.float32), epsilon,
                                   delta)
  np.testing.assert_allclose(got_X, want_X, rtol=1e-5)
  assert want_X[0] == epsilon and 0.05 < want_X[1] < epsilon   # both branches of the min

  # verify() on a chain root -> a -> b: node 1 is judged by row 0's p, node 2 by row 1's p.
  tree = tree_attention.cartesian((1, 1))
  for a, b in itertools.product(range(5), range(5)):
    tokens_1T = jnp.asarray([[0, a, b]])
    ok, logp = medusa.verify(tree, jnp.asarray(logits_XV[None], jnp.float32), tokens_1T,
                             acceptance='typical', temperature=temperature, epsilon=epsilon,
                             delta=delta)
    want_ok = [True, probs_XV[0, a] > want_X[0], probs_XV[1, b] > want_X[1]]
    np.testing.assert_array_equal(ok[0], want_ok, err_msg=f'tokens {a}, {b}')
    np.testing.assert_allclose(np.exp(logp[0, 1:]), [probs_XV[0, a], probs_XV[1, b]],
                               atol=1e-6)
    ok, _ = medusa.verify(tree, jnp.asarray(logits_XV[None], jnp.float32), tokens_1T,
                          acceptance='greedy', temperature=1.0, epsilon=epsilon, delta=delta)
    np.testing.assert_array_equal(ok[0], [True, a == 0, b == 0])


def test_best_path_takes_the_longest_accepted_prefix_then_the_likeliest():
  tree = tree_attention.cartesian((2, 2))    # nodes: root, (0), (1), (0,0), (0,1), (1,0), (1,1)
  ok_1T = jnp.asarray([[True, True, True, False, True, True, False]])
  logp_1T = jnp.asarray([[0.0, -1.0, -0.5, -1.0, -3.0, -2.0, -0.1]])
  path, count = medusa.best_path(tree, ok_1T, logp_1T)
  # (0,1) and (1,0) both accept 3 tokens; log-likelihoods -4.0 and -2.5.
  assert int(count[0]) == 3 and list(np.asarray(path[0])) == [0, 2, 5]
  path, count = medusa.best_path(tree, ok_1T.at[0, 1:].set(False), logp_1T)
  assert int(count[0]) == 1 and int(path[0, 0]) == 0


# ---------------------------------------------------------------- heads and losses


def test_heads_and_losses_match_numpy():
  rng = np.random.default_rng(0)
  Bn, T, D, V, M = 2, 7, 6, 9, 3
  lm_head_DV = rng.standard_normal((D, V)).astype(np.float32)
  heads = ps.init(medusa.head_specs(lm_head_DV, M), jax.random.key(0))
  np.testing.assert_array_equal(heads['w_out'], np.broadcast_to(lm_head_DV, (M, D, V)))
  assert not np.asarray(heads['w_in']).any() and np.abs(heads['b_in']).max() <= D ** -0.5
  heads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), heads)
  h_BTD = rng.standard_normal((Bn, T, D))
  tokens_BT1 = rng.integers(0, V, (Bn, T + 1))
  logits = medusa.apply_heads(heads, jnp.asarray(h_BTD, jnp.float32))

  w1, b1, w2 = (np.asarray(heads[k], np.float64) for k in ('w_in', 'b_in', 'w_out'))
  for k in range(M):
    z = h_BTD @ w1[k] + b1[k]
    want = (h_BTD + z / (1 + np.exp(-z))) @ w2[k]
    np.testing.assert_allclose(logits[:, :, k], want, rtol=1e-4, atol=1e-4)
  ce, acc = medusa.head_cross_entropies(logits, jnp.asarray(tokens_BT1))
  want_ce, want_acc = [], []
  for k in range(1, M + 1):     # head k at position t predicts tokens[t + k + 1]
    z = np.asarray(logits, np.float64)[:, :T - k, k - 1]
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    target = tokens_BT1[:, k + 1:]
    want_ce.append(-np.take_along_axis(logp, target[..., None], -1).mean())
    want_acc.append((z.argmax(-1) == target).mean())
  np.testing.assert_allclose(ce, want_ce, rtol=1e-5)
  np.testing.assert_allclose(acc, want_acc)
  want_1 = sum(0.8 ** k * want_ce[k - 1] for k in range(1, M + 1))
  np.testing.assert_allclose(medusa.medusa1_loss(ce), want_1, rtol=1e-5)
  np.testing.assert_allclose(medusa.medusa1_loss(ce, 0.5),
                             sum(0.5 ** k * want_ce[k - 1] for k in range(1, M + 1)), rtol=1e-5)
  np.testing.assert_allclose(medusa.medusa2_loss(2.0, ce, 0.8, 0.3), 2.0 + 0.3 * want_1,
                             rtol=1e-5)


# ---------------------------------------------------------------- training (the Task)


def _task(mode, monkeypatch):
  """medusa_chars:tiny with a random backbone handed in (no workdir to restore), and it."""
  config = config_lib.load(str(REPO_ROOT / 'experiments/medusa_chars.py') + ':tiny,heads=2')
  config.objective_args.update(mode=mode, backbone_workdir='given')
  config.model.update(vocab_size=GPT2['vocab_size'], attention_backend='reference')
  config.train.update(lr=1e-2, warmup_steps=0, steps=40)
  config = ml_collections.FrozenConfigDict(config)
  medusa_objective.validate(config)
  backbone = jax.device_get(ps.init(transformer.param_specs(config.model), jax.random.key(5)))
  monkeypatch.setattr(medusa_objective, 'load_backbone', lambda config: backbone)
  data = Dataset(make_train_iter=None, eval_batches=[], config_updates={})
  return config, medusa_objective.make_task(config, data), backbone


def _markov_tokens(seed, shape, vocab):
  """Rows that follow one fixed permutation (t -> sigma(t)) with 10% random jumps: a head can
  read tokens t+2, t+3 off the current token, which the frozen backbone's state carries."""
  sigma = np.random.default_rng(0).permutation(vocab)
  rng = np.random.default_rng(seed)
  tokens = np.empty(shape, np.int32)
  tokens[:, 0] = rng.integers(0, vocab, shape[0])
  for t in range(1, shape[1]):
    jump = rng.random(shape[0]) < 0.1
    tokens[:, t] = np.where(jump, rng.integers(0, vocab, shape[0]), sigma[tokens[:, t - 1]])
  return tokens


def test_medusa1_task_freezes_the_backbone_and_lowers_the_heads_loss(monkeypatch):
  config, task, backbone = _task('medusa1', monkeypatch)
  assert set(task.param_specs) == {'heads'}
  setup = loop.setup(config, task)
  state = setup.init()
  np.testing.assert_array_equal(state.params['heads']['w_out'][1], backbone['embed']['tokens'].T)
  shape = (8, config.data.block_size + 1)
  batch = {'tokens': _markov_tokens(0, shape, GPT2['vocab_size'])}

  # No gradient reaches the backbone even when it is differentiated.
  grads = jax.jit(jax.grad(lambda st: task.loss_fn(state.params, st, batch, None, True)[0]))(
      state.model_state)
  assert not any(np.asarray(g).any() for g in jax.tree.leaves(grads))

  first_heads = jax.device_get(state.params['heads'])
  losses = []    # each step's loss is taken on a fresh batch before the update on it
  for i in range(config.train.steps):
    state, metrics = setup.train_step(state, {'tokens': _markov_tokens(1 + i, shape,
                                                                       GPT2['vocab_size'])})
    losses.append(float(metrics['heads_loss']))
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state['backbone']),
               backbone)
  assert not np.allclose(state.params['heads']['w_out'], first_heads['w_out'])


def test_medusa2_task_trains_backbone_and_heads(monkeypatch):
  config, task, backbone = _task('medusa2', monkeypatch)
  batch = {'tokens': _markov_tokens(0, (4, config.data.block_size + 1), GPT2['vocab_size'])}
  # The backbone's specs initialise to the given backbone; the heads as head_specs say.
  key = jax.random.key(0)
  jax.tree.map(lambda s, b: np.testing.assert_array_equal(s.init(key, s.shape, s.dtype), b),
               task.param_specs['backbone'], backbone, is_leaf=ps.is_spec)
  params = {'backbone': backbone, 'heads': ps.init(task.param_specs['heads'], key)}
  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
      lambda p: task.loss_fn(p, {}, batch, jax.random.key(1), True), has_aux=True))(params)
  ce = np.array([metrics['head1_ce'], metrics['head2_ce']])
  np.testing.assert_allclose(loss, metrics['lm_loss'] + 0.2 * (0.8 * ce[0] + 0.64 * ce[1]),
                             rtol=1e-5)
  assert np.abs(grads['backbone']['blocks']['mlp']['w_in']).max() > 0


@pytest.mark.slow
def test_two_stage_pipeline_restores_the_backbone(tmp_path):
  """gpt_chars:tiny trains a decoder; medusa_chars:tiny loads it from its workdir and trains
  heads on it; a mismatched model is a config error."""
  from lab import run
  gpt = config_lib.override(config_lib.load(str(REPO_ROOT / 'experiments/gpt_chars.py:tiny')),
                            ['train.steps=3', 'train.eval_every=0', 'train.checkpoint_every=3'])
  config, task, data = run.prepare(gpt)
  trained = loop.train(config, task, data, str(tmp_path / 'gpt'))
  spec = str(REPO_ROOT / 'experiments/medusa_chars.py:tiny')
  config = config_lib.override(config_lib.load(spec), [
      f'objective_args.backbone_workdir={tmp_path / "gpt"}', 'train.steps=4',
      'train.eval_every=0', 'train.sample_every=4', 'train.checkpoint_every=4'])
  config, task, data = run.prepare(config)
  state = loop.train(config, task, data, str(tmp_path / 'medusa'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state['backbone']),
               jax.device_get(trained.params))
  assert 'tokens per verification step' in (tmp_path / 'medusa' / 'samples.txt').read_text()
  bad = config_lib.override(config_lib.load(spec), [
      f'objective_args.backbone_workdir={tmp_path / "gpt"}', 'model.d_ff=32'])
  with pytest.raises(config_lib.ConfigError, match='model.d_ff'):
    run.prepare(bad)
