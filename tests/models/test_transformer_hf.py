"""lab.models.transformer_hf against transformers' GPT-2 and Llama (torch on CPU, float32).

The reference models are tiny, with weights redrawn at std 0.2 (norm scales around 1) so that a
wrong transpose, head split, epsilon or RoPE theta moves the logits far beyond the tolerance.
"""
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from lab.models import transformer, transformer_hf

_SMALL = dict(vocab_size=100, bos_token_id=0, eos_token_id=1)
_HF_CONFIGS = {
    'gpt2': transformers.GPT2Config(n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                    layer_norm_epsilon=1e-2, **_SMALL),
    'gpt2_untied': transformers.GPT2Config(n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                           n_inner=48, layer_norm_epsilon=3e-2,
                                           tie_word_embeddings=False, **_SMALL),
    'llama_gqa': transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32,
                                          rms_norm_eps=1e-2, rope_theta=500000.0, **_SMALL),
    'llama_mha_tied': transformers.LlamaConfig(hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=4, max_position_embeddings=32,
                                               rms_norm_eps=3e-2, rope_theta=1000.0,
                                               tie_word_embeddings=True, **_SMALL),
}
_B, _T = 2, 32


@functools.cache
def _hf_model(name: str):
  """A random-weight transformers model: weights and biases ~ N(0, 0.2), norm scales ~ N(1, 0.2)."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(_HF_CONFIGS[name],
                                                        attn_implementation='eager')
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      is_norm_scale = ('ln' in param_name or 'norm' in param_name) and param_name.endswith('weight')
      p.normal_(mean=1.0 if is_norm_scale else 0.0, std=0.2)
  return model.eval()


def _tokens_BT() -> np.ndarray:
  return np.random.default_rng(0).integers(0, _SMALL['vocab_size'], (_B, _T))


def _torch_logits(model, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BT)).logits.numpy()


@functools.cache
def _reference(name: str):
  """(model_type, saved HF state dict, torch logits on _tokens_BT()) of one reference model."""
  model = _hf_model(name)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    state_dict.pop('lm_head.weight')  # what save_pretrained writes for tied embeddings
  return model.config.model_type, state_dict, _torch_logits(model, _tokens_BT())


def _converted(name: str):
  model_type, state_dict, _ = _reference(name)
  cfg = transformer_hf.config_from_hf(_hf_model(name).config.to_dict())
  return cfg, transformer_hf.params_from_hf(cfg, state_dict, model_type)


# Compiled once per distinct (hashable, frozen) config, shared by every test that runs it.
_forward = jax.jit(transformer.forward, static_argnums=0)


def _assert_logits_close(cfg, params, logits_BTV):
  ours_BTV = _forward(ml_collections.FrozenConfigDict(cfg), params, jnp.asarray(_tokens_BT()))
  np.testing.assert_allclose(np.asarray(ours_BTV), logits_BTV, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('name', list(_HF_CONFIGS))
def test_logits_match_transformers(name):
  cfg, params = _converted(name)
  _assert_logits_close(cfg, params, _reference(name)[2])


def test_config_fields():
  cfg = transformer_hf.config_from_hf(_HF_CONFIGS['llama_gqa'].to_dict())
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps) == (4, 2, 500000.0, 1e-2)
  assert (cfg.norm, cfg.mlp, cfg.positions, cfg.bias, cfg.tie_embeddings) == (
      'rmsnorm', 'swiglu', 'rope', False, False)
  cfg = transformer_hf.config_from_hf(_HF_CONFIGS['gpt2'].to_dict())
  assert (cfg.d_ff, cfg.max_len, cfg.norm_eps, cfg.tie_embeddings) == (256, 32, 1e-2, True)
  assert (cfg.norm, cfg.mlp, cfg.positions, cfg.bias) == ('layernorm', 'gelu', 'learned', True)


@pytest.mark.parametrize('name', list(_HF_CONFIGS))
def test_config_round_trip(name):
  model_type = _HF_CONFIGS[name].model_type
  cfg = transformer_hf.config_from_hf(_HF_CONFIGS[name].to_dict())
  assert transformer_hf.config_from_hf(transformer_hf.config_to_hf(cfg, model_type)) == cfg


def test_llama_config_reads_and_writes_the_legacy_rope_theta():
  """transformers<5 reads and writes a top-level rope_theta instead of rope_parameters."""
  cfg = transformer_hf.config_from_hf(_HF_CONFIGS['llama_gqa'].to_dict())
  legacy = transformer_hf.config_to_hf(cfg, 'llama')
  del legacy['rope_parameters']
  assert transformer_hf.config_from_hf(legacy).rope_theta == 500000.0


@pytest.mark.parametrize('name', list(_HF_CONFIGS))
def test_state_dict_round_trip_is_exact(name):
  model_type, state_dict, _ = _reference(name)
  cfg, params = _converted(name)
  back = transformer_hf.params_to_hf(cfg, params, model_type)
  assert back.keys() == state_dict.keys()
  for key, value in state_dict.items():
    assert back[key].dtype == np.float32 and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_unprefixed_keys_buffers_and_tied_lm_head_load():
  """Hub GPT-2 files have no 'transformer.' prefix and keep the causal-mask buffers."""
  model_type, state_dict, _ = _reference('gpt2')
  cfg, params = _converted('gpt2')
  hub = {k.removeprefix('transformer.'): v for k, v in state_dict.items()}
  hub |= {f'h.{i}.attn.bias': np.tril(np.ones((1, 1, 32, 32), bool)) for i in range(2)}
  hub['lm_head.weight'] = hub['wte.weight']
  loaded = transformer_hf.params_from_hf(cfg, hub, model_type)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


@pytest.mark.parametrize('name', list(_HF_CONFIGS))
def test_save_pretrained_loads_in_transformers(name, tmp_path):
  cfg, params = _converted(name)
  model_type, _, logits_BTV = _reference(name)
  transformer_hf.save_pretrained(tmp_path, cfg, params, model_type)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not any(info.get(k) for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  np.testing.assert_allclose(_torch_logits(model.float().eval(), _tokens_BT()), logits_BTV,
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize('name,shard_size', [('gpt2', '50KB'), ('llama_gqa', '10GB'),
                                             ('llama_mha_tied', '50KB')])
def test_load_pretrained_reads_transformers_dir(name, shard_size, tmp_path):
  _hf_model(name).save_pretrained(tmp_path, max_shard_size=shard_size)
  assert (tmp_path / 'model.safetensors.index.json').exists() == (shard_size == '50KB')
  cfg, params = transformer_hf.load_pretrained(tmp_path)
  assert cfg == _converted(name)[0]
  _assert_logits_close(cfg, params, _reference(name)[2])


def test_load_pretrained_reads_bfloat16(tmp_path):
  model_type, state_dict, _ = _reference('llama_gqa')
  cfg, _ = _converted('llama_gqa')
  bf16 = {k: torch.from_numpy(v).bfloat16() for k, v in state_dict.items()}
  _hf_model('llama_gqa').config.save_pretrained(tmp_path)
  safetensors.torch.save_file(bf16, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  _, params = transformer_hf.load_pretrained(tmp_path)
  want = transformer_hf.params_from_hf(
      cfg, {k: v.float().numpy() for k, v in bf16.items()}, model_type)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, params, want)


def _hf_dict(name: str, **changes) -> dict:
  return _HF_CONFIGS[name].to_dict() | changes


@pytest.mark.parametrize('hf_config,field', [
    ({'model_type': 'bert', 'vocab_size': 100}, 'model_type'),
    (_hf_dict('gpt2', activation_function='relu'), 'activation_function'),
    (_hf_dict('gpt2', scale_attn_by_inverse_layer_idx=True), 'scale_attn_by_inverse_layer_idx'),
    (_hf_dict('gpt2', scale_attn_weights=False), 'scale_attn_weights'),
    (_hf_dict('llama_gqa', hidden_act='gelu'), 'hidden_act'),
    (_hf_dict('llama_gqa', attention_bias=True), 'attention_bias'),
    (_hf_dict('llama_gqa', mlp_bias=True), 'mlp_bias'),
    (_hf_dict('llama_gqa', rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'rope_scaling'),
    (_hf_dict('llama_gqa', rope_parameters={'rope_type': 'llama3', 'rope_theta': 5e5,
                                            'factor': 8.0}), 'rope_parameters'),
    (_hf_dict('llama_gqa', num_key_value_heads=3), 'n_kv_heads'),
    ({k: v for k, v in _hf_dict('llama_gqa').items() if k != 'hidden_size'}, 'hidden_size'),
])
def test_unsupported_hf_config_raises(hf_config, field):
  with pytest.raises(ValueError, match=field):
    transformer_hf.config_from_hf(hf_config)


def test_state_dict_errors_name_the_key():
  model_type, state_dict, _ = _reference('llama_gqa')
  cfg, params = _converted('llama_gqa')
  key = 'model.layers.1.self_attn.k_proj.weight'
  with pytest.raises(ValueError, match=f'missing keys.*{key}'):
    transformer_hf.params_from_hf(cfg, {k: v for k, v in state_dict.items() if k != key},
                                  model_type)
  with pytest.raises(ValueError, match='unexpected keys.*model.layers.2.mlp.up_proj.weight'):
    transformer_hf.params_from_hf(
        cfg, state_dict | {'model.layers.2.mlp.up_proj.weight': state_dict[key]}, model_type)
  with pytest.raises(ValueError, match=rf'{key} has shape \(16, 64\); expected \(32, 64\)'):
    transformer_hf.params_from_hf(cfg, state_dict | {key: np.zeros((16, 64), np.float32)},
                                  model_type)
  tied_cfg, _ = _converted('llama_mha_tied')
  tied_model_type, tied_state_dict, _ = _reference('llama_mha_tied')
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    transformer_hf.params_from_hf(
        tied_cfg, tied_state_dict | {'lm_head.weight': np.zeros((100, 64), np.float32)},
        tied_model_type)
  with pytest.raises(ValueError, match='model.norm=.rmsnorm. cannot be expressed as gpt2'):
    transformer_hf.params_to_hf(cfg, params, 'gpt2')
  with pytest.raises(ValueError, match="model_type='bert'"):
    transformer_hf.params_from_hf(cfg, state_dict, 'bert')


@pytest.mark.parametrize('name', list(_HF_CONFIGS))
def test_save_pretrained_writes_what_transformers_writes(name, tmp_path):
  cfg, params = _converted(name)
  transformer_hf.save_pretrained(tmp_path / 'ours', cfg, params, _reference(name)[0])
  _hf_model(name).save_pretrained(tmp_path / 'theirs')
  ours = safetensors.numpy.load_file(tmp_path / 'ours' / 'model.safetensors')
  theirs = safetensors.numpy.load_file(tmp_path / 'theirs' / 'model.safetensors')
  assert ours.keys() == theirs.keys()
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
  ours_config, theirs_config = (json.loads((tmp_path / d / 'config.json').read_text())
                                for d in ('ours', 'theirs'))
  assert ours_config['architectures'] == theirs_config['architectures']
