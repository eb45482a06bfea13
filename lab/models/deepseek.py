"""DeepSeek-V3 decoder with multi-token prediction (DeepSeek-AI, arXiv 2412.19437, §2).

Token embedding; L pre-norm blocks (V3 §2.1, Fig. 2)
  h = x + MLA(RMSNorm(x));  y = h + FFN(RMSNorm(h)),
where MLA is lab.nn.mla (eqs. 1-11) and FFN is a dense SwiGLU MLP in the first
`first_dense_layers` blocks and DeepSeekMoE (lab.nn.deepseek_moe, eqs. 12-20) in the rest; a
final RMSNorm and an untied output head. The dense and the MoE blocks are stacked separately on
a leading layer axis and each group is run with `lax.scan`.

Model STATE (not parameters): the routing bias b of every MoE layer, {'blocks': [L_moe, E]}
plus {'mtp': [mtp_depth, E]} for the MTP modules' MoE layers, float32 zeros at init
(`init_state`). It only steers the top-K choice and gets no gradient; after each training step
the objective applies b_i += gamma * sign(mean load - load_i) (`update_state`, V3 §2.1.2).

Multi-token prediction (§2.2.2, eqs. 21-25), D = mtp_depth sequential modules. With the main
model's input t_0..t_{T-1}, h^0_i the output of its last block (before the final norm) and
next tokens t_1..t_T, module k = 1..D runs on positions i = 0..T-k:
  h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]        (eq. 21, M_k: 2D -> D)
  h^k_{0:T-k} = TRM_k(h'^k_{0:T-k})                                (eq. 22)
  P^k_i = OutHead(RMSNorm(h^k_i)), predicting t_{i+k+1}             (eq. 23)
with the main model's embedding and output head. Each module's block is an MLA + DeepSeekMoE
block as in V3's release (its MTP layer is MoE-shaped, hence the 14B MTP parameters of §4.2)
and its output RMSNorm is the module's own, as in the release (`shared_head.norm`). The loss
(eqs. 24-25) is in lab.objectives.lm_deepseek; `mtp_logits` also serves speculative decoding:
the last position of module k drafts token t_{T+k}.

Config fields (`cfg` is `config.model`):
  name ('deepseek'), vocab_size, vocab_multiple (read by the data: vocab padding), d_model,
  n_layers, first_dense_layers (the first blocks with a dense FFN; at least one block is MoE),
  n_heads, q_lora_rank (d_c', 0: no query compression), kv_lora_rank (d_c), qk_nope_dim (d_h),
  qk_rope_dim (d_h^R), v_head_dim, d_ff (dense FFN width), d_ff_expert (routed and shared
  expert width), n_routed_experts (E), n_shared_experts (N_s), top_k (K_r), n_groups,
  top_k_groups (group-limited routing, M of §2.1.2), routed_scaling_factor, bias_update_speed
  (gamma), balance_alpha (alpha of eq. 17, summed over MoE layers), mtp_depth (D, 0: no MTP),
  mtp_lambda (lambda of eq. 25), rope_theta, norm_eps (every RMSNorm, MLA's latent ones
  included), max_len, fp8 (MLA projections, M_k and every expert, shared and dense FFN matmul
  in fine-grained FP8, lab.nn.fp8; embedding, router, head, norms and attention stay in the
  compute dtype, §3.3.1), attention_backend (as lab.kernels.flash_attention), moe_dispatch
  ('dense' | 'capacity' | 'expert_parallel', as lab.nn.deepseek_moe), moe_capacity_factor (for
  the two capacity dispatches), init_std (the std of every weight: V3 uses 0.006).
Decoding (`prefill`, `decode_step`, `generate`) keeps per layer only MLA's compressed cache
(c^KV and k^R) and always routes exactly (dense dispatch, no capacity).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lab.config import require
from lab.kernels import available_backends
from lab.nn import deepseek_moe, mla, mlp, norms
from lab.nn import fp8 as fp8_lib
from lab.nn import param_spec as ps
from lab.parallel.rules import constrain
from lab.sampling import decode

_DISPATCH = ('dense', 'capacity', 'expert_parallel')


def n_moe_layers(cfg) -> int:
  return cfg.n_layers - cfg.first_dense_layers


def validate(cfg) -> None:
  """One-line ConfigErrors for shapes and settings that cannot form a model."""
  for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'kv_lora_rank', 'qk_nope_dim',
              'qk_rope_dim', 'v_head_dim', 'd_ff', 'd_ff_expert', 'n_routed_experts', 'top_k',
              'n_groups', 'top_k_groups', 'max_len'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected a positive integer')
  for key in ('q_lora_rank', 'n_shared_experts', 'mtp_depth'):
    require(cfg[key] >= 0, f'model.{key}={cfg[key]}; expected an integer >= 0')
  for key in ('routed_scaling_factor', 'rope_theta', 'norm_eps', 'init_std'):
    require(cfg[key] > 0, f'model.{key}={cfg[key]}; expected > 0')
  for key in ('bias_update_speed', 'balance_alpha', 'mtp_lambda'):
    require(cfg[key] >= 0, f'model.{key}={cfg[key]}; expected >= 0')
  require(0 <= cfg.first_dense_layers < cfg.n_layers,
          f'model.first_dense_layers={cfg.first_dense_layers}; expected 0..{cfg.n_layers - 1} '
          f'(model.n_layers={cfg.n_layers}, at least one MoE layer)')
  require(cfg.qk_rope_dim % 2 == 0,
          f'model.qk_rope_dim={cfg.qk_rope_dim}; expected an even number (RoPE pairs)')
  E, G = cfg.n_routed_experts, cfg.n_groups
  require(E % G == 0, f'model.n_groups={G} does not divide model.n_routed_experts={E}')
  require(G == 1 or E // G >= 2, f'model.n_groups={G} leaves {E // G} expert per group; '
          'expected >= 2 (a group scores by its top-2 affinities)')
  require(cfg.top_k_groups <= G, f'model.top_k_groups={cfg.top_k_groups}; expected 1..{G}')
  require(cfg.top_k <= cfg.top_k_groups * (E // G),
          f'model.top_k={cfg.top_k}; expected 1..{cfg.top_k_groups * (E // G)} experts in the '
          f'{cfg.top_k_groups} kept groups')
  require(cfg.moe_dispatch in _DISPATCH,
          f'model.moe_dispatch={cfg.moe_dispatch!r}; expected one of {_DISPATCH}')
  require(cfg.moe_dispatch == 'dense' or cfg.moe_capacity_factor > 0,
          f'model.moe_capacity_factor={cfg.moe_capacity_factor}; expected > 0 with '
          f'model.moe_dispatch={cfg.moe_dispatch!r}')
  require(not (cfg.fp8 and cfg.moe_dispatch == 'expert_parallel'),
          "model.fp8=True with model.moe_dispatch='expert_parallel'; expected 'dense' or "
          "'capacity' (the expert-parallel experts have no FP8 path)")
  require(cfg.attention_backend in available_backends(),
          f'model.attention_backend={cfg.attention_backend!r}; expected one of '
          f'{available_backends()}')


# ---------------------------------------------------------------- parameters


def _norm_spec(cfg) -> ps.ParamSpec:
  return ps.ParamSpec((cfg.d_model,), ps.ones, ('embed',))


def _block_specs(cfg, moe: bool) -> dict:
  """attn_norm, attn (MLA), ffn_norm, ffn (DeepSeekMoE when `moe`, else SwiGLU of width d_ff)."""
  D, std = cfg.d_model, cfg.init_std
  if moe:
    ffn = deepseek_moe.deepseek_moe_specs(D, cfg.d_ff_expert, cfg.n_routed_experts,
                                          cfg.n_shared_experts, std=std, out_std=std)
  else:
    w_in = ps.ParamSpec((D, cfg.d_ff), ps.normal(std), ('embed', 'mlp'))
    ffn = {'w_gate': w_in, 'w_up': w_in,
           'w_down': ps.ParamSpec((cfg.d_ff, D), ps.normal(std), ('mlp', 'embed'))}
  attn = mla.mla_specs(D, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_dim,
                       cfg.qk_rope_dim, cfg.v_head_dim, std=std, out_std=std)
  return {'attn_norm': _norm_spec(cfg), 'attn': attn, 'ffn_norm': _norm_spec(cfg), 'ffn': ffn}


def _stack(tree, n: int):
  return jax.tree.map(lambda s: ps.stack(s, n), tree, is_leaf=ps.is_spec)


def param_specs(cfg) -> dict:
  """embed_VD, dense_blocks (if first_dense_layers), moe_blocks, final_norm, head_DV and, if
  mtp_depth, mtp: per module h_norm, e_norm, proj (M_k, [2D, D]), block (MoE), out_norm."""
  validate(cfg)
  D, V, std = cfg.d_model, cfg.vocab_size, cfg.init_std
  specs = {
      'embed': ps.ParamSpec((V, D), ps.normal(std), ('vocab', 'embed')),
      'moe_blocks': _stack(_block_specs(cfg, moe=True), n_moe_layers(cfg)),
      'final_norm': _norm_spec(cfg),
      'head': ps.ParamSpec((D, V), ps.normal(std), ('embed', 'vocab')),
  }
  if cfg.first_dense_layers:
    specs['dense_blocks'] = _stack(_block_specs(cfg, moe=False), cfg.first_dense_layers)
  if cfg.mtp_depth:
    specs['mtp'] = _stack({'h_norm': _norm_spec(cfg), 'e_norm': _norm_spec(cfg),
                           'proj': ps.ParamSpec((2 * D, D), ps.normal(std), (None, 'embed')),
                           'block': _block_specs(cfg, moe=True), 'out_norm': _norm_spec(cfg)},
                          cfg.mtp_depth)
  return specs


def count_params(cfg, *, include_mtp: bool = False) -> tuple[int, int]:
  """(total, active per token) from the specs alone (nothing is allocated). Active counts the
  parameters one token's forward reads: all but the routed experts, of which top_k of
  n_routed_experts per MoE layer, and one row of the embedding table. That is DeepSeek's
  convention: it reproduces V3's 37B (36.6B; 37.6B with the whole table), V2's 21B and
  V2-Lite's 2.4B (2.45B; 2.66B with the table). V3 reports both counts without the MTP module
  (671B / 37B, §1); include_mtp adds it (sharing the main model's embedding and head, which the
  release stores again, +1.85B: hence its 14B)."""
  specs = param_specs(cfg)
  if not include_mtp:
    specs.pop('mtp', None)
  leaves = jax.tree.leaves(specs, is_leaf=ps.is_spec)
  total = sum(math.prod(s.shape) for s in leaves)
  routed = sum(math.prod(s.shape) for s in leaves if 'experts' in s.axes)
  unread_embedding = (cfg.vocab_size - 1) * cfg.d_model
  return total, total - routed + routed * cfg.top_k // cfg.n_routed_experts - unread_embedding


def init_state(cfg) -> dict:
  """Routing biases, zeros: {'blocks': [L_moe, E]} and, with MTP, {'mtp': [mtp_depth, E]}."""
  state = {'blocks': jnp.zeros((n_moe_layers(cfg), cfg.n_routed_experts), jnp.float32)}
  if cfg.mtp_depth:
    state['mtp'] = jnp.zeros((cfg.mtp_depth, cfg.n_routed_experts), jnp.float32)
  return state


def update_state(cfg, state: dict, loads: dict) -> dict:
  """b + gamma sign(mean load - load) per MoE layer (V3 §2.1.2; lab.nn.deepseek_moe.update_bias),
  with loads = {'blocks': load_LE, 'mtp': load_KE} (tokens routed to each expert this step)
  held outside the gradient."""
  return {k: deepseek_moe.update_bias(state[k], jax.lax.stop_gradient(loads[k]),
                                      cfg.bias_update_speed) for k in state}


# ---------------------------------------------------------------- blocks


def _embed(params, tokens_BT):
  # A whole-vocab table to gather from (see lab.models.transformer._embed).
  return constrain(params['embed'], (None, 'act_embed'))[tokens_BT]


def _logits(cfg, params, norm_D, x_BTD):
  """OutHead(RMSNorm(x)): logits_BTV."""
  x_BTD = norms.rms_norm(x_BTD, norm_D, cfg.norm_eps)
  return constrain(jnp.einsum('BTD,DV->BTV', x_BTD, params['head']),
                   ('batch', 'length', 'act_vocab'))


def _block(cfg, p, bias_E, x_BTD, attend, dispatch: str):
  """One pre-norm block -> (x_BTD, (attention cache, routing aux)); bias_E is None for a dense
  FFN. `attend(p_attn, h_BTD) -> (y_BTD, cache)` decides where keys and values come from."""
  x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
  y_BTD, cache = attend(p['attn'], norms.rms_norm(x_BTD, p['attn_norm'], cfg.norm_eps))
  x_BTD = x_BTD + y_BTD
  h_BTD = norms.rms_norm(x_BTD, p['ffn_norm'], cfg.norm_eps)
  f = p['ffn']
  if bias_E is None:
    return x_BTD + mlp.swiglu_mlp(h_BTD, f['w_gate'], f['w_up'], f['w_down'], fp8=cfg.fp8), (
        cache, None)
  y_BTD, aux = deepseek_moe.deepseek_moe(
      f, bias_E, h_BTD, top_k=cfg.top_k, n_groups=cfg.n_groups, top_k_groups=cfg.top_k_groups,
      routed_scaling_factor=cfg.routed_scaling_factor, dispatch=dispatch,
      capacity_factor=None if dispatch == 'dense' else cfg.moe_capacity_factor, fp8=cfg.fp8)
  return x_BTD + y_BTD, (cache, aux)


def _run_blocks(cfg, params, state, x_BTD, attend, caches, dispatch: str):
  """The dense group, then the MoE group, each scanned -> (x_BTD, caches, MoE aux stacked over
  layers). `attend(p_attn, h_BTD, layer_cache)`; caches = {'dense': ..., 'moe': ...} stacked on
  the layer axis, or None."""
  caches = caches or {}
  new_caches = {}

  def run(group, biases, x_BTD):
    def body(x_BTD, xs):
      p, bias_E, cache = xs
      return _block(cfg, p, bias_E, x_BTD, lambda pa, h: attend(pa, h, cache), dispatch)
    x_BTD, (new_caches[group], aux) = jax.lax.scan(
        body, x_BTD, (params[f'{group}_blocks'], biases, caches.get(group)))
    return x_BTD, aux

  if 'dense_blocks' in params:
    x_BTD, _ = run('dense', None, x_BTD)
  x_BTD, aux = run('moe', state['blocks'], x_BTD)
  return x_BTD, new_caches, aux


def _train_attend(cfg, positions_BT):
  def attend(p, h_BTD, _):
    return mla.mla_attention(p, h_BTD, positions_BT, rope_theta=cfg.rope_theta,
                             backend=cfg.attention_backend, eps=cfg.norm_eps, fp8=cfg.fp8), None
  return attend


def main_model(cfg, params, state, tokens_BT, attend, caches, dispatch: str):
  """Embedding, the blocks, the final norm and head -> (logits_BTV, h^0_BTD, caches, MoE aux);
  h^0 is the last block's output before the final norm (the MTP input, eq. 21).
  `attend(p_attn, h_BTD, layer_cache) -> (y_BTD, layer cache)` decides where keys and values
  come from (training, prefill, decode steps, speculative blocks)."""
  h_BTD, caches, aux = _run_blocks(cfg, params, state, _embed(params, tokens_BT), attend, caches,
                                   dispatch)
  return _logits(cfg, params, params['final_norm'], h_BTD), h_BTD, caches, aux


# ---------------------------------------------------------------- training forward


def forward_with_aux(cfg, params, state, tokens_BT: jax.Array, *, rng=None, train: bool = False):
  """(logits_BTV, aux) of the main model for tokens_BT. aux = {'moe': DeepSeekMoE aux stacked
  over the MoE layers (load_E [L_moe, E], load_balance_loss, max_vio, dropped [L_moe]),
  'hidden_BTD': h^0, the last block's output before the final norm (the input of MTP, eq. 21)}.
  rng and train are accepted for the LM-model interface; V3 has no dropout, so neither changes
  the result."""
  del rng, train
  B, T = tokens_BT.shape
  if T > cfg.max_len:
    raise ValueError(f'sequence length {T} exceeds model.max_len={cfg.max_len}')
  positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
  logits_BTV, h_BTD, _, aux = main_model(cfg, params, state, tokens_BT,
                                         _train_attend(cfg, positions_BT), None, cfg.moe_dispatch)
  return logits_BTV, {'moe': aux, 'hidden_BTD': h_BTD}


def forward(cfg, params, state, tokens_BT: jax.Array) -> jax.Array:
  """logits_BTV of the main model (see forward_with_aux)."""
  return forward_with_aux(cfg, params, state, tokens_BT)[0]


def mtp_logits(cfg, params, state, hidden_BTD: jax.Array, next_tokens_BT: jax.Array):
  """MTP modules k = 1..D (eqs. 21-23) -> (logits, aux): logits[k-1] is [B, T-k+1, V], its
  position i predicting t_{i+k+1}; aux is DeepSeekMoE's aux stacked over the modules.

  hidden_BTD: h^0 of the main model on t_0..t_{T-1} (forward_with_aux's aux['hidden_BTD']);
  next_tokens_BT: t_1..t_T (the main model's targets in training; in decoding the last is the
  token just chosen, and logits[k-1][:, -1] drafts t_{T+k}).
  """
  B, T, _ = hidden_BTD.shape
  if next_tokens_BT.shape != (B, T):
    raise ValueError(f'mtp_logits next_tokens shape {next_tokens_BT.shape}; expected {(B, T)} '
                     'as the hidden states')
  if not 1 <= cfg.mtp_depth <= T:
    raise ValueError(f'mtp_logits with model.mtp_depth={cfg.mtp_depth} over {T} positions; '
                     f'expected 1 <= mtp_depth <= {T}')
  h_BTD, logits, auxes = hidden_BTD, [], []
  for k in range(cfg.mtp_depth):
    S = T - k
    attend = _train_attend(cfg, jnp.broadcast_to(jnp.arange(S), (B, S)))
    logits_BSV, h_BTD, (_, aux) = mtp_module(cfg, params, state, k, h_BTD[:, :S],
                                             next_tokens_BT[:, k:], attend, cfg.moe_dispatch)
    logits.append(logits_BSV)
    auxes.append(aux)
  return tuple(logits), jax.tree.map(lambda *a: jnp.stack(a), *auxes)


def mtp_module(cfg, params, state, k: int, h_BSD: jax.Array, tokens_BS: jax.Array, attend,
               dispatch: str):
  """MTP module k+1 (0-based k) on S positions -> (logits_BSV, h^{k+1}_BSD, (cache, routing
  aux)): eqs. 21-23 with h_BSD = h^k and tokens_BS the tokens k+1 ahead of each position.
  `attend(p_attn, h_BSD, None) -> (y_BSD, cache)` decides where keys and values come from
  (causal over the S positions in training; a cache in speculative decoding)."""
  p = jax.tree.map(lambda a: a[k], params['mtp'])
  h_BSD = norms.rms_norm(h_BSD, p['h_norm'], cfg.norm_eps)
  e_BSD = norms.rms_norm(_embed(params, tokens_BS), p['e_norm'], cfg.norm_eps)
  x_BSD = fp8_lib.linear(jnp.concatenate([h_BSD, e_BSD], -1), p['proj'], fp8=cfg.fp8)
  h_BSD, cache_aux = _block(cfg, p['block'], state['mtp'][k], x_BSD,
                            lambda pa, h: attend(pa, h, None), dispatch)
  return _logits(cfg, params, p['out_norm'], h_BSD), h_BSD, cache_aux


# ---------------------------------------------------------------- decoding


def prefill(cfg, params, state, tokens_BT: jax.Array, max_len: int):
  """Runs the prompt -> (logits_BTV, cache) with room for max_len tokens in total.

  cache = {'layers': {'dense': ..., 'moe': ...} each {'c_kv': [L, B, max_len, C],
  'k_rope': [L, B, max_len, R]}, 'length': int32}: d_c + d_h^R numbers a token and layer.
  """
  B, T = tokens_BT.shape
  if not T <= max_len <= cfg.max_len:
    raise ValueError(f'prefill max_len={max_len}; expected prompt length {T} <= max_len <= '
                     f'model.max_len={cfg.max_len}')

  def attend(p, h_BTD, _):
    y_BTD, cache = mla.mla_prefill(p, h_BTD, max_len, rope_theta=cfg.rope_theta,
                                   backend=cfg.attention_backend, eps=cfg.norm_eps, fp8=cfg.fp8)
    return y_BTD, {'c_kv': cache['c_kv'], 'k_rope': cache['k_rope']}

  logits_BTV, _, caches, _ = main_model(cfg, params, state, tokens_BT, attend, None, 'dense')
  return logits_BTV, {'layers': caches, 'length': jnp.asarray(T, jnp.int32)}


def decode_step(cfg, params, state, tokens_B1: jax.Array, cache: dict):
  """Appends one token per row at position cache['length'] -> (logits_B1V, new cache), with
  MLA's absorbed decode (lab.nn.mla.mla_decode_step). The caller keeps length < max_len."""
  length = cache['length']

  def attend(p, h_B1D, layer_cache):
    y_B1D, new = mla.mla_decode_step(p, h_B1D, {**layer_cache, 'length': length},
                                     rope_theta=cfg.rope_theta, backend=cfg.attention_backend,
                                     eps=cfg.norm_eps, fp8=cfg.fp8)
    return y_B1D, {'c_kv': new['c_kv'], 'k_rope': new['k_rope']}

  logits_B1V, _, caches, _ = main_model(cfg, params, state, tokens_B1, attend, cache['layers'],
                                        'dense')
  return logits_B1V, {'layers': caches, 'length': length + 1}


class _WithState:
  """lab.sampling.decode's model interface over (params, state) pairs."""

  @staticmethod
  def prefill(cfg, params_state, tokens_BT, max_len):
    return prefill(cfg, *params_state, tokens_BT, max_len)

  @staticmethod
  def decode_step(cfg, params_state, tokens_B1, cache):
    return decode_step(cfg, *params_state, tokens_B1, cache)


def generate(cfg, params, state, prompt_BT: jax.Array, num_new: int, rng: jax.Array,
             **sampling) -> jax.Array:
  """lab.sampling.decode.generate (sampling: temperature, top_k, top_p) with the routing bias:
  tokens_B(T+num_new). Jit it with cfg, num_new and the sampling settings static."""
  return decode.generate(_WithState, cfg, (params, state), prompt_BT, num_new, rng, **sampling)
