"""Hugging Face interop for `lab.models.transformer`: GPT-2 and Llama configs and checkpoints.

Our blocks are stacked on a leading layer axis L; HF keeps one tensor per layer. The layouts
(prefix 'transformer.' for GPT-2, 'model.' for Llama; 'lm_head.weight' has none):

GPT-2 (Conv1D stores [in, out]):
  wte [V, D] = embed.tokens                    wpe [max_len, D] = embed.positions
  h.i.ln_1 / h.i.ln_2 / ln_f {weight, bias} = attn_norm / mlp_norm / final_norm {scale, bias}
  h.i.attn.c_attn.weight [D, 3NH] = [wq_DNH | wk_DKH | wv_DKH] flattened over (heads, head_dim)
  h.i.attn.c_attn.bias [3NH] = [bq | bk | bv]
  h.i.attn.c_proj {weight [NH, D], bias} = wo, bo
  h.i.mlp.c_fc {weight [D, F], bias} = w_in, b_in
  h.i.mlp.c_proj {weight [F, D], bias} = w_out, b_out
Llama (nn.Linear stores [out, in], so every matrix is transposed):
  embed_tokens [V, D] = embed.tokens           norm.weight = final_norm.scale
  layers.i.input_layernorm / post_attention_layernorm .weight = attn_norm / mlp_norm .scale
  layers.i.self_attn.{q,k,v}_proj.weight [NH | KH, D] = wq^T, wk^T, wv^T; o_proj [D, NH] = wo^T
  layers.i.mlp.{gate,up}_proj.weight [F, D] = w_gate^T, w_up^T; down_proj [D, F] = w_down^T
lm_head.weight [V, D] = head^T, present only when the embeddings are untied.

Heads are flattened head-major (index n * H + h) on both sides, and HF Llama checkpoints already
use the half-split RoPE layout that `lab.nn.rope` uses, so no permutation is needed.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes  # noqa: F401  (registers np.dtype('bfloat16'), so bf16 checkpoints can be read)
import numpy as np
import safetensors.numpy

from lab.models import transformer
from lab.nn import param_spec as ps

_GPT2_DEFAULTS = {'n_inner': None, 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
                  'resid_pdrop': 0.1, 'initializer_range': 0.02, 'scale_attn_weights': True,
                  'scale_attn_by_inverse_layer_idx': False, 'add_cross_attention': False,
                  'tie_word_embeddings': True}
_LLAMA_DEFAULTS = {'num_key_value_heads': None, 'head_dim': None, 'hidden_act': 'silu',
                   'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6,
                   'initializer_range': 0.02, 'tie_word_embeddings': False,
                   'attention_bias': False, 'mlp_bias': False, 'rope_scaling': None,
                   'rope_parameters': None, 'rope_theta': 10000.0}


def _with_defaults(hf: dict, defaults: dict, required: tuple[str, ...]) -> dict:
  missing = [key for key in required if key not in hf]
  if missing:
    raise ValueError(f'HF config (model_type={hf["model_type"]!r}) lacks fields {missing}')
  return defaults | hf


def _require(hf: dict, supported: dict) -> None:
  for key, want in supported.items():
    if hf[key] != want:
      raise ValueError(f'HF config {key}={hf[key]!r} is not supported; expected {want!r}')


def _gpt2_config(hf: dict) -> dict:
  hf = _with_defaults(hf, _GPT2_DEFAULTS, ('vocab_size', 'n_positions', 'n_embd', 'n_layer',
                                           'n_head'))
  _require(hf, {'activation_function': 'gelu_new', 'scale_attn_weights': True,
                'scale_attn_by_inverse_layer_idx': False, 'add_cross_attention': False})
  return dict(vocab_size=hf['vocab_size'], d_model=hf['n_embd'], n_layers=hf['n_layer'],
              n_heads=hf['n_head'], n_kv_heads=hf['n_head'], head_dim=0,
              d_ff=hf['n_inner'] or 4 * hf['n_embd'], max_len=hf['n_positions'],
              norm='layernorm', norm_eps=hf['layer_norm_epsilon'], mlp='gelu',
              positions='learned', rope_theta=10000.0, bias=True,
              tie_embeddings=hf['tie_word_embeddings'], dropout=hf['resid_pdrop'],
              init_std=hf['initializer_range'])


def _llama_rope_theta(hf: dict) -> float:
  """rope_theta from transformers>=5 `rope_parameters` or the older top-level field."""
  rope = hf['rope_parameters'] or {}
  if rope.get('rope_type', 'default') != 'default' or set(rope) - {'rope_type', 'rope_theta'}:
    raise ValueError(f'HF config rope_parameters={rope!r} is not supported; expected '
                     "{'rope_type': 'default', 'rope_theta': ...} (no RoPE scaling)")
  return rope.get('rope_theta', hf['rope_theta'])


def _llama_config(hf: dict) -> dict:
  hf = _with_defaults(hf, _LLAMA_DEFAULTS, ('vocab_size', 'hidden_size', 'intermediate_size',
                                            'num_hidden_layers', 'num_attention_heads'))
  _require(hf, {'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
                'rope_scaling': None})
  return dict(vocab_size=hf['vocab_size'], d_model=hf['hidden_size'],
              n_layers=hf['num_hidden_layers'], n_heads=hf['num_attention_heads'],
              n_kv_heads=hf['num_key_value_heads'] or hf['num_attention_heads'],
              head_dim=hf['head_dim'] or 0, d_ff=hf['intermediate_size'],
              max_len=hf['max_position_embeddings'], norm='rmsnorm', norm_eps=hf['rms_norm_eps'],
              mlp='swiglu', positions='rope', rope_theta=_llama_rope_theta(hf), bias=False,
              tie_embeddings=hf['tie_word_embeddings'], dropout=0.0,
              init_std=hf['initializer_range'])


def _gpt2_config_to_hf(cfg) -> dict:
  return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'],
          'vocab_size': cfg.vocab_size, 'n_positions': cfg.max_len, 'n_embd': cfg.d_model,
          'n_layer': cfg.n_layers, 'n_head': cfg.n_heads, 'n_inner': cfg.d_ff,
          'activation_function': 'gelu_new', 'layer_norm_epsilon': cfg.norm_eps,
          'resid_pdrop': cfg.dropout, 'embd_pdrop': cfg.dropout, 'attn_pdrop': 0.0,
          'initializer_range': cfg.init_std, 'scale_attn_weights': True,
          'scale_attn_by_inverse_layer_idx': False, 'tie_word_embeddings': cfg.tie_embeddings}


def _llama_config_to_hf(cfg) -> dict:
  # rope_parameters is read by transformers>=5, the top-level rope_theta by older versions.
  return {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'],
          'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
          'intermediate_size': cfg.d_ff, 'num_hidden_layers': cfg.n_layers,
          'num_attention_heads': cfg.n_heads, 'num_key_value_heads': cfg.n_kv_heads,
          'head_dim': transformer.head_dim(cfg), 'hidden_act': 'silu',
          'max_position_embeddings': cfg.max_len, 'rms_norm_eps': cfg.norm_eps,
          'rope_theta': cfg.rope_theta,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
          'attention_bias': False, 'mlp_bias': False, 'initializer_range': cfg.init_std,
          'tie_word_embeddings': cfg.tie_embeddings}


def _gpt2_supported(cfg) -> dict:
  # head_dim 0 means d_model // n_heads; an explicit head_dim must equal that.
  return {'norm': 'layernorm', 'mlp': 'gelu', 'positions': 'learned', 'bias': True,
          'n_kv_heads': cfg.n_heads, 'head_dim': cfg.head_dim and cfg.d_model // cfg.n_heads}


def _llama_supported(cfg) -> dict:
  del cfg
  return {'norm': 'rmsnorm', 'mlp': 'swiglu', 'positions': 'rope', 'bias': False}


def _gpt2_to_hf(cfg, params):
  """(top-level tensors, per-layer tensors stacked on L) in GPT-2's layout, in jnp."""
  L, D = cfg.n_layers, cfg.d_model
  b, attn, mlp = params['blocks'], params['blocks']['attn'], params['blocks']['mlp']
  top = {'transformer.wte.weight': params['embed']['tokens'],
         'transformer.wpe.weight': params['embed']['positions'],
         'transformer.ln_f.weight': params['final_norm']['scale'],
         'transformer.ln_f.bias': params['final_norm']['bias']}
  if not cfg.tie_embeddings:
    top['lm_head.weight'] = params['head'].T
  blocks = {
      'ln_1.weight': b['attn_norm']['scale'], 'ln_1.bias': b['attn_norm']['bias'],
      'attn.c_attn.weight': jnp.concatenate([attn[w].reshape(L, D, -1) for w in ('wq', 'wk', 'wv')],
                                            axis=2),
      'attn.c_attn.bias': jnp.concatenate([attn[w].reshape(L, -1) for w in ('bq', 'bk', 'bv')],
                                          axis=1),
      'attn.c_proj.weight': attn['wo'].reshape(L, -1, D), 'attn.c_proj.bias': attn['bo'],
      'ln_2.weight': b['mlp_norm']['scale'], 'ln_2.bias': b['mlp_norm']['bias'],
      'mlp.c_fc.weight': mlp['w_in'], 'mlp.c_fc.bias': mlp['b_in'],
      'mlp.c_proj.weight': mlp['w_out'], 'mlp.c_proj.bias': mlp['b_out'],
  }
  return top, blocks


def _gpt2_from_hf(cfg, top: dict, blocks: dict) -> dict:
  """Inverse of `_gpt2_to_hf`, on float32 numpy arrays; GPT-2 has as many kv heads as heads."""
  L, D, N, H = cfg.n_layers, cfg.d_model, cfg.n_heads, transformer.head_dim(cfg)
  wq, wk, wv = np.split(blocks['attn.c_attn.weight'], 3, axis=2)
  bq, bk, bv = np.split(blocks['attn.c_attn.bias'], 3, axis=1)
  params = {
      'embed': {'tokens': top['transformer.wte.weight'],
                'positions': top['transformer.wpe.weight']},
      'blocks': {
          'attn_norm': {'scale': blocks['ln_1.weight'], 'bias': blocks['ln_1.bias']},
          'attn': {'wq': wq.reshape(L, D, N, H), 'wk': wk.reshape(L, D, N, H),
                   'wv': wv.reshape(L, D, N, H),
                   'wo': blocks['attn.c_proj.weight'].reshape(L, N, H, D),
                   'bq': bq.reshape(L, N, H), 'bk': bk.reshape(L, N, H), 'bv': bv.reshape(L, N, H),
                   'bo': blocks['attn.c_proj.bias']},
          'mlp_norm': {'scale': blocks['ln_2.weight'], 'bias': blocks['ln_2.bias']},
          'mlp': {'w_in': blocks['mlp.c_fc.weight'], 'b_in': blocks['mlp.c_fc.bias'],
                  'w_out': blocks['mlp.c_proj.weight'], 'b_out': blocks['mlp.c_proj.bias']},
      },
      'final_norm': {'scale': top['transformer.ln_f.weight'], 'bias': top['transformer.ln_f.bias']},
  }
  if not cfg.tie_embeddings:
    params['head'] = top['lm_head.weight'].T
  return params


def _llama_to_hf(cfg, params):
  """(top-level tensors, per-layer tensors stacked on L) in Llama's layout, in jnp."""
  L, D = cfg.n_layers, cfg.d_model
  b, attn, mlp = params['blocks'], params['blocks']['attn'], params['blocks']['mlp']
  top = {'model.embed_tokens.weight': params['embed']['tokens'],
         'model.norm.weight': params['final_norm']['scale']}
  if not cfg.tie_embeddings:
    top['lm_head.weight'] = params['head'].T
  blocks = {
      'input_layernorm.weight': b['attn_norm']['scale'],
      'self_attn.q_proj.weight': attn['wq'].reshape(L, D, -1).swapaxes(1, 2),
      'self_attn.k_proj.weight': attn['wk'].reshape(L, D, -1).swapaxes(1, 2),
      'self_attn.v_proj.weight': attn['wv'].reshape(L, D, -1).swapaxes(1, 2),
      'self_attn.o_proj.weight': attn['wo'].reshape(L, -1, D).swapaxes(1, 2),
      'post_attention_layernorm.weight': b['mlp_norm']['scale'],
      'mlp.gate_proj.weight': mlp['w_gate'].swapaxes(1, 2),
      'mlp.up_proj.weight': mlp['w_up'].swapaxes(1, 2),
      'mlp.down_proj.weight': mlp['w_down'].swapaxes(1, 2),
  }
  return top, blocks


def _llama_from_hf(cfg, top: dict, blocks: dict) -> dict:
  """Inverse of `_llama_to_hf`, on float32 numpy arrays."""
  L, D, N, K = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads
  H = transformer.head_dim(cfg)

  def in_out(name):
    return blocks[name].swapaxes(1, 2)

  params = {
      'embed': {'tokens': top['model.embed_tokens.weight']},
      'blocks': {
          'attn_norm': {'scale': blocks['input_layernorm.weight']},
          'attn': {'wq': in_out('self_attn.q_proj.weight').reshape(L, D, N, H),
                   'wk': in_out('self_attn.k_proj.weight').reshape(L, D, K, H),
                   'wv': in_out('self_attn.v_proj.weight').reshape(L, D, K, H),
                   'wo': in_out('self_attn.o_proj.weight').reshape(L, N, H, D)},
          'mlp_norm': {'scale': blocks['post_attention_layernorm.weight']},
          'mlp': {'w_gate': in_out('mlp.gate_proj.weight'), 'w_up': in_out('mlp.up_proj.weight'),
                  'w_down': in_out('mlp.down_proj.weight')},
      },
      'final_norm': {'scale': top['model.norm.weight']},
  }
  if not cfg.tie_embeddings:
    params['head'] = top['lm_head.weight'].T
  return params


@dataclasses.dataclass(frozen=True)
class _Format:
  """How one HF model_type names, lays out and configures the model."""
  prefix: str
  block: str  # per-layer key prefix, formatted with the layer index
  embed: str  # the token embedding, which a tied lm_head.weight must equal
  buffers: re.Pattern  # non-parameter buffers that older checkpoints store; ignored on load
  config_from_hf: Callable
  config_to_hf: Callable
  supported: Callable  # cfg -> {field: value} that the format can express
  to_hf: Callable
  from_hf: Callable


_FORMATS = {
    'gpt2': _Format('transformer.', 'transformer.h.{}.', 'transformer.wte.weight',
                    re.compile(r'transformer\.h\.\d+\.attn\.(masked_)?bias'), _gpt2_config,
                    _gpt2_config_to_hf, _gpt2_supported, _gpt2_to_hf, _gpt2_from_hf),
    'llama': _Format('model.', 'model.layers.{}.', 'model.embed_tokens.weight',
                     re.compile(r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq'),
                     _llama_config, _llama_config_to_hf, _llama_supported, _llama_to_hf,
                     _llama_from_hf),
}


def _format(model_type: str, cfg=None) -> _Format:
  """The format of model_type; with cfg, checks that the format can express that model."""
  if model_type not in _FORMATS:
    raise ValueError(f'model_type={model_type!r} is not supported; expected one of '
                     f'{tuple(_FORMATS)}')
  fmt = _FORMATS[model_type]
  if cfg is not None:
    for key, want in fmt.supported(cfg).items():
      if cfg[key] != want:
        raise ValueError(f'model.{key}={cfg[key]!r} cannot be expressed as {model_type}; '
                         f'expected {want!r}')
  return fmt


def config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """The model config of an HF GPT-2 or Llama config dict; unsupported settings are errors."""
  fields = _format(hf_config.get('model_type')).config_from_hf(hf_config)
  cfg = ml_collections.ConfigDict(dict(
      fields, norm_eps=float(fields['norm_eps']), rope_theta=float(fields['rope_theta']),
      dropout=float(fields['dropout']), init_std=float(fields['init_std']), remat=False,
      attention_backend='auto'))
  transformer.validate(cfg)
  return cfg


def config_to_hf(cfg, model_type: str) -> dict:
  """The HF config dict (as in config.json) that describes the model of cfg."""
  # Our vocabularies have no special tokens; without explicit None transformers assumes GPT-2's.
  return _format(model_type, cfg).config_to_hf(cfg) | {'bos_token_id': None, 'eos_token_id': None}


def _hf_shapes(cfg, fmt: _Format) -> tuple[dict, dict]:
  """Shapes of (top-level, one layer's) HF tensors, traced from the specs without allocating."""
  top, blocks = jax.eval_shape(lambda p: fmt.to_hf(cfg, p),
                               ps.shapes(transformer.param_specs(cfg)))
  return ({name: x.shape for name, x in top.items()},
          {name: x.shape[1:] for name, x in blocks.items()})


def _canonical(state_dict: dict, fmt: _Format) -> dict:
  """Keys with the model prefix (added where missing), without non-parameter buffers."""
  out = {}
  for key, value in state_dict.items():
    if not key.startswith((fmt.prefix, 'lm_head.')):
      key = fmt.prefix + key
    if not fmt.buffers.fullmatch(key):
      out[key] = value
  return out


def params_from_hf(cfg, state_dict: dict[str, np.ndarray], model_type: str) -> dict:
  """Our float32 params from an HF state dict (numpy arrays; the model prefix is optional).

  A tied model may carry lm_head.weight (as torch's state_dict() does) if it equals the
  embedding. Any missing or unexpected key, or a tensor of the wrong shape, is a ValueError.
  """
  fmt = _format(model_type, cfg)
  state_dict = _canonical(state_dict, fmt)
  if cfg.tie_embeddings and 'lm_head.weight' in state_dict:
    lm_head = state_dict.pop('lm_head.weight')
    if fmt.embed in state_dict and not np.array_equal(lm_head, state_dict[fmt.embed]):
      raise ValueError(f'lm_head.weight differs from {fmt.embed} but the config ties them')
  top_shapes, block_shapes = _hf_shapes(cfg, fmt)
  expected = dict(top_shapes)
  for name, shape in block_shapes.items():
    expected |= {fmt.block.format(i) + name: shape for i in range(cfg.n_layers)}
  missing = sorted(expected.keys() - state_dict.keys())
  unexpected = sorted(state_dict.keys() - expected.keys())
  if missing or unexpected:
    raise ValueError(f'{model_type} state dict does not match the config: missing keys '
                     f'{missing}, unexpected keys {unexpected}')
  for key, shape in expected.items():
    if tuple(state_dict[key].shape) != shape:
      raise ValueError(f'{model_type} state dict {key} has shape {tuple(state_dict[key].shape)}; '
                       f'expected {shape}')
  top = {name: np.asarray(state_dict[name], np.float32) for name in top_shapes}
  blocks = {name: np.stack([np.asarray(state_dict[fmt.block.format(i) + name], np.float32)
                            for i in range(cfg.n_layers)])
            for name in block_shapes}
  return jax.tree.map(jnp.asarray, fmt.from_hf(cfg, top, blocks))


def params_to_hf(cfg, params, model_type: str) -> dict[str, np.ndarray]:
  """The HF state dict of params (lm_head only when untied), the exact inverse of params_from_hf."""
  fmt = _format(model_type, cfg)
  top, blocks = fmt.to_hf(cfg, params)
  state_dict = {name: np.asarray(x) for name, x in top.items()}
  for name, x_L in blocks.items():
    x_L = np.asarray(x_L)
    state_dict |= {fmt.block.format(i) + name: x_L[i] for i in range(cfg.n_layers)}
  return state_dict


def load_pretrained(path) -> tuple[ml_collections.ConfigDict, dict]:
  """(cfg, params) from an HF model directory: config.json and one or more *.safetensors."""
  path = pathlib.Path(path)
  hf_config = json.loads((path / 'config.json').read_text())
  cfg = config_from_hf(hf_config)
  index = path / 'model.safetensors.index.json'
  if index.exists():
    weight_map = json.loads(index.read_text())['weight_map']
    files = [path / name for name in sorted(set(weight_map.values()))]
  else:
    files = sorted(path.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {path}')
  state_dict = {}
  for file in files:
    state_dict |= safetensors.numpy.load_file(file)
  return cfg, params_from_hf(cfg, state_dict, hf_config['model_type'])


def save_pretrained(path, cfg, params, model_type: str) -> None:
  """Writes config.json and model.safetensors that transformers' `from_pretrained` loads."""
  path = pathlib.Path(path)
  hf_config = config_to_hf(cfg, model_type)
  state_dict = params_to_hf(cfg, params, model_type)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(hf_config, indent=2) + '\n')
  safetensors.numpy.save_file(state_dict, path / 'model.safetensors', metadata={'format': 'pt'})
