"""The DeepSeek-V3 decoder and its objective: V3's parameter count from specs against a formula
written from the paper's shapes; shapes and causality; prefill + absorbed decode equal the full
forward; the MTP modules and loss (eqs. 21-25) against a float64 re-computation indexed from the
full token sequence; the aux-loss-free bias update (direction, no gradient, it balances a skewed
router); FP8 tracks float32; and a short training run through lab.train.loop."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO_ROOT
from lab import config as config_lib
from lab.config import ConfigError
from lab.models import deepseek
from lab.nn import deepseek_moe, mla, norms
from lab.objectives import lm_deepseek

from deepseek_tiny import draw_tokens, make_cfg, make_params

B, T = 2, 10
CFG = make_cfg()  # every test shares it (and so its compiled functions) unless it needs another

forward_with_aux = jax.jit(deepseek.forward_with_aux, static_argnums=0)
mtp_logits = jax.jit(deepseek.mtp_logits, static_argnums=0)


def forward(cfg, params, state, tokens_BT):
  return forward_with_aux(cfg, params, state, tokens_BT)[0]


# ---------------------------------------------------------------- parameter count


def v3_count_formula() -> tuple[int, int, int]:
  """(total, active, MTP) of DeepSeek-V3 from its published shapes (§4.2), term by term."""
  V, D, L, L_dense, N = 129280, 7168, 61, 3, 128
  Q, C, H, R, G, F_dense, F, E, K = 1536, 512, 128, 64, 128, 18432, 2048, 256, 8
  mla_ = D * Q + Q + Q * N * (H + R) + D * (C + R) + C + C * N * (H + G) + N * G * D
  dense_ffn, expert, router = 3 * D * F_dense, 3 * D * F, D * E
  layer_norms = 2 * D
  dense_layer = mla_ + dense_ffn + layer_norms
  moe_total = mla_ + E * expert + expert + router + layer_norms
  moe_active = mla_ + K * expert + expert + router + layer_norms
  total = V * D + L_dense * dense_layer + (L - L_dense) * moe_total + D + D * V
  active = D + L_dense * dense_layer + (L - L_dense) * moe_active + D + D * V
  mtp = 3 * D + 2 * D * D + moe_total
  return total, active, mtp


def test_v3_parameter_count_from_specs():
  """671.03B total and 36.63B active (paper: 671B / 37B, §1), 11.61B in the MTP module (the
  release's 14B stores the embedding and head again: + 2 V D = 13.46B)."""
  config = config_lib.load(str(REPO_ROOT / 'experiments/deepseek_v3.py'))
  cfg = ml_collections.FrozenConfigDict(config.model)
  total, active = deepseek.count_params(cfg)
  total_mtp, active_mtp = deepseek.count_params(cfg, include_mtp=True)
  want_total, want_active, want_mtp = v3_count_formula()
  assert (total, active) == (want_total, want_active) == (671_026_404_352, 36_625_610_752)
  assert total_mtp - total == want_mtp == 11_610_067_968
  assert active_mtp - active == want_mtp - (256 - 8) * 3 * 7168 * 2048
  assert abs(total / 671e9 - 1) < 1e-3 and abs(active / 37e9 - 1) < 0.011
  assert abs((want_mtp + 2 * 129280 * 7168) / 14e9 - 1) < 0.04


# ---------------------------------------------------------------- forward, causality, decoding


def test_forward_shapes_loads_and_causality():
  cfg = CFG
  params, state = make_params(cfg), deepseek.init_state(cfg)
  tokens_BT = draw_tokens(0, (B, T))
  logits_BTV, aux = forward_with_aux(cfg, params, state, tokens_BT)
  assert logits_BTV.shape == (B, T, 23) and aux['hidden_BTD'].shape == (B, T, 16)
  assert aux['moe']['load_E'].shape == (2, 8) and aux['moe']['max_vio'].shape == (2,)
  np.testing.assert_array_equal(aux['moe']['load_E'].sum(-1), B * T * 2)
  t = 6
  changed_BT = tokens_BT.at[:, t].set((tokens_BT[:, t] + 1) % 23)
  logits2_BTV, _ = forward_with_aux(cfg, params, state, changed_BT)
  np.testing.assert_array_equal(logits2_BTV[:, :t], logits_BTV[:, :t])
  assert np.abs(logits2_BTV[:, t:] - logits_BTV[:, t:]).min(-1).max() > 1e-4


def test_prefill_and_decode_steps_match_forward():
  cfg = CFG
  params = make_params(cfg, seed=3)
  state = {'blocks': 0.05 * jax.random.normal(jax.random.PRNGKey(4), (2, 8)),
           'mtp': jnp.zeros((2, 8))}
  tokens_BT = draw_tokens(1, (B, T))
  want_BTV = forward(cfg, params, state, tokens_BT)
  P = 4

  @jax.jit
  def prefill_then_decode(params, state, tokens_BT):
    logits_BPV, cache = deepseek.prefill(cfg, params, state, tokens_BT[:, :P], T)
    def step(cache, token_B):
      logits_B1V, cache = deepseek.decode_step(cfg, params, state, token_B[:, None], cache)
      return cache, logits_B1V[:, 0]
    cache, logits_SBV = jax.lax.scan(step, cache, tokens_BT[:, P:].T)
    return jnp.concatenate([logits_BPV, logits_SBV.swapaxes(0, 1)], 1), cache

  got_BTV, cache = prefill_then_decode(params, state, tokens_BT)
  assert cache['layers']['moe']['c_kv'].shape == (2, B, T, 6)  # d_c + d_h^R a token and layer
  assert cache['layers']['dense']['k_rope'].shape == (1, B, T, 4)
  assert int(cache['length']) == T
  np.testing.assert_allclose(got_BTV, want_BTV, rtol=1e-5, atol=1e-5)
  P = T - 2  # generate 3 tokens, so that greedy[:, :-1] has T tokens
  greedy = jax.jit(deepseek.generate, static_argnums=(0, 4), static_argnames='temperature')(
      cfg, params, state, tokens_BT[:, :P], 3, jax.random.PRNGKey(0), temperature=0.0)
  logits_B3V = forward(cfg, params, state, greedy[:, :-1])[:, P - 1:]
  np.testing.assert_array_equal(greedy[:, P:], logits_B3V.argmax(-1))


# ---------------------------------------------------------------- multi-token prediction


def np_rms(x, g):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * g


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@functools.partial(jax.jit, static_argnums=0)
def reference_block(cfg, p, bias_E, x_BSD):
  """x + MLA(RMSNorm(x)), then + DeepSeekMoE(RMSNorm(.)): the V3 block from the nn layers."""
  pos_BS = jnp.broadcast_to(jnp.arange(x_BSD.shape[1]), x_BSD.shape[:2])
  x_BSD = x_BSD + mla.mla_attention(p['attn'], norms.rms_norm(x_BSD, p['attn_norm']), pos_BS,
                                    rope_theta=cfg.rope_theta)
  y_BSD, _ = deepseek_moe.deepseek_moe(
      p['ffn'], bias_E, norms.rms_norm(x_BSD, p['ffn_norm']), top_k=cfg.top_k,
      n_groups=cfg.n_groups, top_k_groups=cfg.top_k_groups,
      routed_scaling_factor=cfg.routed_scaling_factor)
  return x_BSD + y_BSD


def test_mtp_logits_and_loss_match_recomputation():
  """Module k at position i reads h^{k-1}_i and Emb(t_{i+k}) and predicts t_{i+k+1}, indexed here
  in the full sequence t_0..t_T; L_MTP = lambda/D sum_k (1/T) sum_i -log P^k_i[t_{i+k+1}]."""
  cfg = CFG
  params, state = make_params(cfg, seed=5), deepseek.init_state(cfg)
  state['mtp'] = 0.05 * jax.random.normal(jax.random.PRNGKey(6), (2, 8))
  tokens = np.asarray(draw_tokens(2, (B, T + 1)))
  _, aux = forward_with_aux(cfg, params, state, jnp.asarray(tokens[:, :T]))
  logits, mtp_aux = mtp_logits(cfg, params, state, aux['hidden_BTD'], jnp.asarray(tokens[:, 1:]))
  assert [l.shape for l in logits] == [(B, T, 23), (B, T - 1, 23)]
  assert mtp_aux['load_E'].shape == (2, 8)

  emb, head = np.asarray(params['embed'], np.float64), np.asarray(params['head'], np.float64)
  h = np.asarray(aux['hidden_BTD'], np.float64)
  nll_sum = 0.0
  for k in (1, 2):
    p = jax.tree.map(lambda a: a[k - 1], params['mtp'])
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    S = T - k + 1
    x = np.stack([np.concatenate([np_rms(h[b, i], p64['h_norm']),
                                  np_rms(emb[tokens[b, i + k]], p64['e_norm'])]) @ p64['proj']
                  for b in range(B) for i in range(S)]).reshape(B, S, -1)        # eq. 21
    h = np.asarray(reference_block(cfg, p['block'], state['mtp'][k - 1],
                                   jnp.asarray(x, jnp.float32)), np.float64)     # eq. 22
    want_logits = np_rms(h, p64['out_norm']) @ head                             # eq. 23
    np.testing.assert_allclose(logits[k - 1], want_logits, rtol=1e-4, atol=1e-4)
    logp = np_log_softmax(want_logits)
    nll_sum += sum(-logp[b, i, tokens[b, i + k + 1]] / T
                   for b in range(B) for i in range(S) if i + k + 1 <= T) / B   # eq. 24
  want = 0.3 / 2 * nll_sum                                                      # eq. 25
  got = lm_deepseek.mtp_loss(logits, jnp.asarray(tokens[:, 1:]), 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


SAMPLE_OFF = dict(num=0, length=1, prompt='', temperature=1.0, top_k=0, top_p=1.0)


def tiny_task(cfg):
  config = ml_collections.ConfigDict({'model': dict(cfg), 'data': {'block_size': T},
                                      'sample': SAMPLE_OFF})
  lm_deepseek.validate(config)
  return lm_deepseek.make_task(ml_collections.FrozenConfigDict(config), None)


def test_objective_total_bias_update_and_no_bias_gradient():
  """loss = CE + L_MTP + alpha sum_layers L_Bal / alpha; the loss records this batch's loads and
  leaves the bias alone; after_step moves it by gamma sign(mean - load) per layer; the loss does
  not move with b (its tangent along a random direction is exactly 0, so the gradient is 0)."""
  cfg = CFG
  task = tiny_task(cfg)
  params, state = make_params(cfg, seed=7), lm_deepseek.init_state(cfg)
  state['bias']['blocks'] = 0.05 * jax.random.normal(jax.random.PRNGKey(8), (2, 8))
  bias = state['bias']
  batch = {'tokens': draw_tokens(3, (B, T + 1))}
  direction = jax.tree.map(lambda b: jax.random.normal(jax.random.PRNGKey(9), b.shape), state)

  @jax.jit
  def loss_and_bias_tangent(params, state):
    f = lambda s: task.loss_fn(params, s, batch, None, True)
    out, (tangent, _) = jax.jvp(f, (state,), (direction,))
    return out, tangent

  (loss, (metrics, new_state)), tangent = loss_and_bias_tangent(params, state)
  assert tangent == 0.0

  _, aux = forward_with_aux(cfg, params, bias, batch['tokens'][:, :-1])
  logits, mtp_aux = mtp_logits(cfg, params, bias, aux['hidden_BTD'], batch['tokens'][:, 1:])
  balance = aux['moe']['load_balance_loss'].sum() + mtp_aux['load_balance_loss'].sum()
  np.testing.assert_allclose(loss, metrics['loss'] + metrics['mtp_loss'] + 0.1 * balance,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics['mtp_loss'],
                             lm_deepseek.mtp_loss(logits, batch['tokens'][:, 1:], 0.3), rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_state['bias'], bias)
  stepped = task.after_step(params, new_state, 1)
  for name, load_LE in (('blocks', aux['moe']['load_E']), ('mtp', mtp_aux['load_E'])):
    np.testing.assert_array_equal(new_state['load'][name], load_LE)
    np.testing.assert_array_equal(stepped['load'][name], 0.0)
    load_LE = np.asarray(load_LE, np.float64)
    over = load_LE > load_LE.mean(-1, keepdims=True)
    under = load_LE < load_LE.mean(-1, keepdims=True)
    assert over.any() and under.any()
    step_LE = np.asarray(stepped['bias'][name]) - np.asarray(bias[name])
    np.testing.assert_allclose(step_LE, 0.01 * (under.astype(float) - over), atol=1e-7)


def test_bias_moves_once_per_step_from_the_summed_micro_batch_loads():
  """With train.grad_accum = 2 the bias moves by exactly +-gamma (or 0) per step, in the
  direction of the two micro-batches' summed loads, and every micro-batch routes with the
  step's starting bias."""
  from lab.train import loop, optimizers, step
  cfg = CFG
  task = tiny_task(cfg)
  config = config_lib.load(str(REPO_ROOT / 'experiments/deepseek_tiny.py') + ':tiny')
  config.model.update(dict(cfg))
  config.train.update(grad_accum=2, batch_size=2 * B)
  config = ml_collections.FrozenConfigDict(config)
  optimizer = optimizers.make(config.train)
  state = loop.init_state(config, task, optimizer)
  tokens = draw_tokens(11, (2 * B, T + 1))
  new_state, _ = jax.jit(step.make_train_step(config.train, task, optimizer))(
      state, {'tokens': tokens})
  bias = state.model_state['bias']
  load = {'blocks': 0.0, 'mtp': 0.0}
  for half in (tokens[:B], tokens[B:]):
    _, aux = forward_with_aux(cfg, state.params, bias, half[:, :-1])
    _, mtp_aux = mtp_logits(cfg, state.params, bias, aux['hidden_BTD'], half[:, 1:])
    load = {'blocks': load['blocks'] + np.asarray(aux['moe']['load_E'], np.float64),
            'mtp': load['mtp'] + np.asarray(mtp_aux['load_E'], np.float64)}
  for name, load_LE in load.items():
    want = 0.01 * np.sign(load_LE.mean(-1, keepdims=True) - load_LE)
    np.testing.assert_allclose(new_state.model_state['bias'][name] - bias[name], want,
                               atol=1e-7)
    np.testing.assert_array_equal(new_state.model_state['load'][name], 0.0)


def test_bias_updates_balance_a_skewed_router():
  """A bias of +1 on experts 0 and 1 sends them every token (MaxVio = 8/2 - 1 = 3); steps of
  b += gamma sign(mean load - load), forward only, bring MaxVio down (Wang et al. 2024, Alg. 1)."""
  cfg = CFG
  params = make_params(cfg, seed=9)
  state = {'blocks': jnp.zeros((2, 8)).at[:, :2].set(1.0)}  # forward reads only the blocks' bias
  tokens_BT = draw_tokens(4, (B, T))
  vios = []
  for _ in range(150):
    _, aux = forward_with_aux(cfg, params, state, tokens_BT)
    state = deepseek.update_state(cfg, state, {'blocks': aux['moe']['load_E']})
    vios.append(np.asarray(aux['moe']['max_vio']))
  np.testing.assert_allclose(vios[0], 3.0)
  assert np.mean(vios[-10:], axis=0).max() < 1.0, vios[-10:]


# ---------------------------------------------------------------- FP8 and config errors


def test_fp8_tracks_float32_at_init():
  """At V3-like init (std 0.02) FP8 changes the logits by a fraction of a percent, not 0, and
  routes the same; the loss is the same to 1e-3."""
  params = make_params(make_cfg(init_std=0.02), seed=11)  # the same shapes as CFG's
  state = deepseek.init_state(CFG)
  tokens_BT = draw_tokens(5, (B, T + 1))
  (logits, aux), (logits8, aux8) = (forward_with_aux(c, params, state, tokens_BT[:, :-1])
                                    for c in (CFG, make_cfg(fp8=True)))
  rel = np.linalg.norm(logits8 - logits) / np.linalg.norm(logits)
  assert 1e-4 < rel < 0.02, rel
  np.testing.assert_array_equal(aux8['moe']['load_E'], aux['moe']['load_E'])
  ce, ce8 = (lm_deepseek.cross_entropy(l, tokens_BT[:, 1:]) for l in (logits, logits8))
  assert abs(ce8 / ce - 1) < 1e-3, (ce, ce8)


@pytest.mark.parametrize('updates, match', [
    (dict(first_dense_layers=3), 'first_dense_layers=3; expected 0..2'),
    (dict(n_groups=3), 'n_groups=3 does not divide'),
    (dict(top_k=5), r'top_k=5; expected 1..4'),
    (dict(qk_rope_dim=3), 'qk_rope_dim=3'),
    (dict(moe_dispatch='expert_parallel', fp8=True), 'fp8=True'),
    (dict(moe_dispatch='sparse'), "moe_dispatch='sparse'"),
])
def test_config_errors(updates, match):
  with pytest.raises(ConfigError, match=match):
    deepseek.validate(make_cfg(**updates))


# ---------------------------------------------------------------- training end to end


@pytest.mark.slow
def test_tiny_experiment_trains(tmp_path):
  from lab import run
  from lab.train import loop, metrics_log
  config = config_lib.override(
      config_lib.load(str(REPO_ROOT / 'experiments/deepseek_tiny.py') + ':tiny'),
      ['train.steps=30', 'train.lr=1e-2', 'train.eval_every=30', 'train.checkpoint_every=30'])
  config, task, data = run.prepare(config)
  state = loop.train(config, task, data, str(tmp_path))
  records = [r for r in metrics_log.read(tmp_path / 'metrics.jsonl') if 'loss' in r]
  losses = [r['loss'] for r in records]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
  assert {'mtp_loss', 'moe_max_vio', 'moe_balance_loss'} <= set(records[-1])
  assert np.abs(np.asarray(state.model_state['bias']['blocks'])).max() > 0
