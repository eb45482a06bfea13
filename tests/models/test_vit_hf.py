"""lab.models.vit_hf against transformers' ViT (torch on CPU, float32, eval mode): last_hidden_state
of ViTModel at its own resolution and, with interpolate_pos_encoding=True, at others; the logits of
ViTForImageClassification; and the config / state-dict checks.

The reference models are tiny, with weights redrawn at std 0.2 (norm scales around 1) so that a
wrong transpose, head split, epsilon, activation or interpolation moves the outputs far beyond the
tolerance."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lab.models import vit, vit_hf
from lab.nn import param_spec as ps

_B = 2
_HF_CONFIGS = {
    # HF's defaults: exact GELU, LayerNorm eps 1e-12.
    'model': (transformers.ViTModel, dict(image_size=8, patch_size=2, num_channels=3,
                                          hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=48)),
    'classifier': (transformers.ViTForImageClassification,
                   dict(image_size=9, patch_size=3, num_channels=2, hidden_size=24,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
                        hidden_act='quick_gelu', layer_norm_eps=1e-2, num_labels=5)),
}
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.cache
def _hf_model(name: str):
  """A random-weight transformers model: weights and biases ~ N(0, 0.2), norm scales ~ N(1, 0.2)."""
  torch.manual_seed(0)
  cls, fields = _HF_CONFIGS[name]
  model = cls(transformers.ViTConfig(**fields, attn_implementation='eager'))
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      is_norm_scale = 'layernorm' in param_name and param_name.endswith('weight')
      p.normal_(mean=1.0 if is_norm_scale else 0.0, std=0.2)
  return model.eval()


def _load(name: str):
  cfg, params = vit_hf.from_hf_model(_hf_model(name))
  cfg.attention_backend = 'reference'
  return cfg, params


def _pixels(seed, C, X, Y) -> np.ndarray:
  """pixel_values in torch's layout [B, C, X, Y]."""
  return np.random.default_rng(seed).standard_normal((_B, C, X, Y)).astype(np.float32)


def _hidden(cfg, params, images_BXYC):
  return vit.encode(cfg, params, vit.with_cls(cfg, params, vit.patch_tokens(cfg, params,
                                                                            images_BXYC)))


@pytest.mark.parametrize('size, interpolate', [((8, 8), False), ((12, 12), True),
                                               ((6, 10), True)])
def test_last_hidden_state_matches_transformers(size, interpolate):
  cfg, params = _load('model')
  assert (cfg.mlp_activation, cfg.norm_eps) == ('gelu', 1e-12)
  x = _pixels(sum(size), 3, *size)
  with torch.no_grad():
    want = _hf_model('model')(torch.from_numpy(x), interpolate_pos_encoding=interpolate)
  got = jit(functools.partial(_hidden, cfg))(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  want = want.last_hidden_state.numpy()
  assert got.shape == want.shape == (_B, 1 + size[0] * size[1] // 4, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_classifier_logits_match_transformers():
  cfg, params = _load('classifier')
  assert (cfg.num_classes, cfg.mlp_activation, cfg.norm_eps, cfg.pooling) == (
      5, 'quick_gelu', 1e-2, 'cls')
  x = _pixels(1, 2, 9, 9)
  with torch.no_grad():
    want = _hf_model('classifier')(torch.from_numpy(x)).logits.numpy()
  got = jit(functools.partial(vit.forward, cfg))(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_loaded_params_match_our_specs():
  cfg, params = _load('classifier')
  want = jax.tree.map(lambda s: s.shape, vit.param_specs(cfg), is_leaf=ps.is_spec)
  assert jax.tree.map(lambda a: a.shape, params) == want


@pytest.mark.parametrize('change, match', [
    (dict(hidden_act='relu'), "hidden_act='relu'"),
    (dict(qkv_bias=False), 'qkv_bias=False'),
    (dict(attention_probs_dropout_prob=0.1), 'attention_probs_dropout_prob=0.1'),
    (dict(image_size=[8, 6]), 'image_size=\\[8, 6\\]'),
    (dict(model_type='deit'), "model_type='deit'")])
def test_unsupported_configs_raise(change, match):
  hf = _hf_model('model').config.to_dict() | change
  with pytest.raises(ValueError, match=match):
    vit_hf.config_from_hf(hf)


def test_state_dict_must_fit_the_config():
  model = _hf_model('classifier')
  cfg = vit_hf.config_from_hf(model.config.to_dict(), num_classes=5)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(ValueError, match='unused tensors'):
    vit_hf.params_from_hf(vit_hf.config_from_hf(model.config.to_dict()), state_dict)
  del state_dict['vit.layers.1.mlp.fc2.bias']
  with pytest.raises(ValueError, match="lacks 'layers.1.mlp.fc2.bias'"):
    vit_hf.params_from_hf(cfg, state_dict)
  cfg.mlp_dim = 41
  with pytest.raises(ValueError, match=r'fc1.weight has shape \(40, 24\); expected \(41, 24\)'):
    vit_hf.params_from_hf(cfg, state_dict)
